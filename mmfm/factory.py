"""Config -> model, training streams and evaluation: the glue shared by tools/train.py and tools/eval.py."""

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mmfm.config import Config, ModelConfig
from mmfm.data import (
    BindingDataset,
    ImageTextDataset,
    QuestionBank,
    RetrievalEvalDataset,
    VideoQADataset,
    VideoRetrievalEvalDataset,
    VideoTextDataset,
    VQADataset,
)
from mmfm.data.collate import make_collate
from mmfm.data.formats import read_json, resolve
from mmfm.data.negatives import CaptionNegatives
from mmfm.data.transforms import eval_transform, train_transform
from mmfm.engine.trainer import Stream
from mmfm.errors import ConfigError
from mmfm.models.model import MMFM, config_from_checkpoint, load_pretrained
from mmfm.objectives.tasks import ANSWER_HEAD_OF

DEFAULT_STREAMS = {
    "pretrain": {"image_text": 1.0, "video_text": 1.0},
    "retrieval": {"image_text": 1.0},
    "vqa": {"vqa": 1.0},
    "video_qa": {"video_qa": 1.0},
}


def task_streams(cfg: Config) -> dict[str, float]:
    streams = cfg.train.tasks or DEFAULT_STREAMS.get(cfg.task)
    if not streams:
        raise ConfigError(f"task {cfg.task!r} needs train.tasks (stream -> weight), e.g. "
                          "{image_text: 1.0, vqa: 0.5}")
    return dict(streams)


def _path(cfg: Config, relative: str) -> str:
    path = resolve(cfg.data.root, relative)
    if not Path(path).exists():
        raise ConfigError(f"data file {path!r} does not exist (data.root={cfg.data.root!r}); generate "
                          "ShapesWorld with `python tools/make_data.py shapes --out DIR` or fix the path")
    return path


def _questions_ride_along(cfg: Config) -> bool:
    return cfg.data.qa_with_captions and cfg.model.fusion_layer < cfg.model.depth


def answer_heads(cfg: Config, streams) -> set[str]:
    """The answer heads a run trains: its answer streams, plus those fed by ``data.qa_with_captions``.

    Questions riding on alignment batches train a head only through the fusion layers, so a
    contrastive-only model (``model.fusion_layer`` = depth) gets no head from them, and no VQA figures
    from a head it never trained.
    """
    heads = {s for s in streams if s in ANSWER_HEAD_OF.values()}
    if _questions_ride_along(cfg):
        heads |= {ANSWER_HEAD_OF[s] for s in streams if s in ANSWER_HEAD_OF}
    return heads


def with_answers(cfg: Config, streams) -> Config:
    """Fill model.answers from the answer streams' lists and model.preprocess from the data block."""
    answers = dict(cfg.model.answers)
    heads = answer_heads(cfg, streams)
    if "vqa" in heads and "vqa" not in answers:
        answers["vqa"] = read_json(_path(cfg, cfg.data.answer_list))
    if "video_qa" in heads and "video_qa" not in answers:
        answers["video_qa"] = read_json(_path(cfg, cfg.data.video_answer_list))
    preprocess = {"image_size": cfg.data.image_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                  "num_frames": cfg.data.num_frames}
    return replace(cfg, model=replace(cfg.model, answers=answers, preprocess=preprocess))


def build_model(cfg: ModelConfig) -> MMFM:
    """A fresh model, or one initialised from an mmfm checkpoint given as ``model.init``."""
    if cfg.init and not cfg.init.startswith("timm:"):
        return _init_from_checkpoint(cfg)
    return MMFM(cfg)


def _init_from_checkpoint(cfg: ModelConfig) -> MMFM:
    path = Path(cfg.init)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"model.init={cfg.init!r}: no such checkpoint (expected a model.safetensors)")
    source = load_pretrained(path)
    model = MMFM(replace(cfg, init=""))
    own = model.state_dict()
    fitting = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return model


def _transforms(cfg: Config, train: bool):
    norm = {"mean": tuple(cfg.data.mean), "std": tuple(cfg.data.std)}
    if train:
        scale = cfg.data.crop_scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"data.crop_scale={scale}: give [low, high] with 0 < low <= high <= 1 "
                              "([1, 1] turns cropping off)")
        return train_transform(cfg.data.image_size, scale=tuple(scale), flip=cfg.data.hflip, **norm)
    return eval_transform(cfg.data.image_size, **norm)


def _dataset_kwargs(cfg: Config) -> dict:
    return {"root": cfg.data.root, "seed": cfg.train.seed, "on_error": cfg.data.on_error}


def _caption_negatives(word_groups: list, replace_prob: float = 0.0) -> CaptionNegatives | None:
    if not word_groups:
        return None
    if not all(isinstance(g, list) and all(isinstance(w, str) for w in g) for g in word_groups):
        raise ConfigError("data.negative_words must be a list of word groups, e.g. [[red, green], [circle, star]]")
    if not 0.0 <= replace_prob <= 1.0:
        raise ConfigError(f"data.negative_replace_prob={replace_prob}: give a probability in [0, 1]")
    try:
        return CaptionNegatives(word_groups, replace_prob)
    except ValueError as err:
        raise ConfigError(f"data.negative_words: {err}") from None


def build_streams(cfg: Config, tokenizer, world_size: int = 1) -> dict[str, Stream]:
    """One Stream per weighted task stream of the config, with per-process batch sizes."""
    kwargs, transform = _dataset_kwargs(cfg), _transforms(cfg, train=True)
    frames = cfg.data.num_frames
    negatives = _caption_negatives(cfg.data.negative_words, cfg.data.negative_replace_prob)
    answer_sets = {
        "vqa": lambda: VQADataset(_path(cfg, cfg.data.vqa), transform=transform,
                                  answer_list=cfg.model.answers["vqa"], **kwargs),
        "video_qa": lambda: VideoQADataset(_path(cfg, cfg.data.video_qa), num_frames=frames, transform=transform,
                                           answer_list=cfg.model.answers["video_qa"], **kwargs),
    }

    def questions(stream: str) -> QuestionBank | None:
        return QuestionBank(answer_sets[ANSWER_HEAD_OF[stream]]()) if _questions_ride_along(cfg) else None

    makers = {
        **answer_sets,
        "image_text": lambda: ImageTextDataset(_path(cfg, cfg.data.image_text), transform=transform,
                                               negatives=negatives, questions=questions("image_text"), **kwargs),
        "video_text": lambda: VideoTextDataset(_path(cfg, cfg.data.video_text), num_frames=frames,
                                               transform=transform, sampling="random", negatives=negatives,
                                               questions=questions("video_text"), **kwargs),
    }
    streams = {}
    for name, weight in task_streams(cfg).items():
        if name not in makers:
            raise ConfigError(f"train.tasks.{name}: this stream needs `task: segmentation` and its own model")
        keys = ("question",) if name in ("vqa", "video_qa") else ("text", "negative_text", "question")
        batch = cfg.train.batch_size
        if name.startswith("video") and cfg.train.video_batch_size:
            batch = cfg.train.video_batch_size
        if batch % world_size:
            raise ConfigError(f"the {name} batch of {batch} does not split over {world_size} processes")
        streams[name] = Stream(name, makers[name](), batch // world_size, make_collate(tokenizer, keys), weight)
    return streams


# ---- evaluation -----------------------------------------------------------------------------------

def _eval_loader(dataset, cfg: Config):
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                      collate_fn=make_collate(None))


def _maybe(cfg: Config, relative: str) -> str | None:
    path = resolve(cfg.data.root, relative)
    return path if relative and Path(path).exists() else None


@torch.no_grad()
def evaluate(model: MMFM, cfg: Config, quiet: bool = True) -> dict:
    """Every evaluation named in ``eval.metrics`` whose annotation file exists; a flat metrics dict."""
    from mmfm.evaluation.retrieval import evaluate_binding, evaluate_retrieval
    from mmfm.evaluation.vqa import evaluate_vqa

    model.eval()
    kwargs, transform = _dataset_kwargs(cfg), _transforms(cfg, train=False)
    frames, k_test, wanted = cfg.data.num_frames, cfg.eval.k_test, set(cfg.eval.metrics)
    metrics: dict = {}
    if "retrieval" in wanted and (path := _maybe(cfg, cfg.eval.retrieval)):
        ds = RetrievalEvalDataset(path, transform=transform, **kwargs)
        metrics.update(evaluate_retrieval(model, _eval_loader(ds, cfg), ds, "image", k_test, quiet))
    if "novel" in wanted and (path := _maybe(cfg, cfg.eval.retrieval_novel)):
        ds = RetrievalEvalDataset(path, transform=transform, **kwargs)
        novel = evaluate_retrieval(model, _eval_loader(ds, cfg), ds, "image", k_test, quiet)
        metrics.update({f"novel_{k}": v for k, v in novel.items()})
    if "binding" in wanted and (path := _maybe(cfg, cfg.eval.binding)):
        metrics.update(evaluate_binding(model, _eval_loader(BindingDataset(path, transform=transform, **kwargs), cfg)))
    if "vqa" in wanted and "vqa" in model.cfg.answers and (path := _maybe(cfg, cfg.eval.vqa)):
        ds = VQADataset(path, transform=transform, answer_list=model.cfg.answers["vqa"], **kwargs)
        metrics.update(evaluate_vqa(model, _eval_loader(ds, cfg), "vqa", "vqa"))
    if "video_retrieval" in wanted and (path := _maybe(cfg, cfg.eval.video_retrieval)):
        ds = VideoRetrievalEvalDataset(path, num_frames=frames, transform=transform, **kwargs)
        video = evaluate_retrieval(model, _eval_loader(ds, cfg), ds, "video", k_test, quiet)
        metrics.update({_video_key(k): v for k, v in video.items()})
    if "video_qa" in wanted and "video_qa" in model.cfg.answers and (path := _maybe(cfg, cfg.eval.video_qa)):
        ds = VideoQADataset(path, num_frames=frames, transform=transform,
                            answer_list=model.cfg.answers["video_qa"], **kwargs)
        metrics.update(evaluate_vqa(model, _eval_loader(ds, cfg), "video_qa", "videoqa"))
    return metrics


def _video_key(name: str) -> str:
    """Video retrieval's text-side keys get a vid_ prefix: txt_r1 -> vid_txt_r1, itc_txt_r1 -> itc_vid_txt_r1."""
    itc, base = ("itc_", name[4:]) if name.startswith("itc_") else ("", name)
    return itc + ("vid_" + base if base.startswith(("txt", "r_mean")) else base)


def load_checkpoint_model(path: str | Path) -> MMFM:
    """A trained model from a run directory (its model.safetensors) or a .safetensors file."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no model.safetensors here; pass a run directory written by tools/train.py")
    config_from_checkpoint(file)
    return load_pretrained(file)


def write_metrics(path: Path, metrics: dict) -> None:
    from mmfm.engine.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


# ---- segmentation (task: segmentation) ------------------------------------------------------------

def build_segmentation(cfg: Config, world_size: int = 1):
    """``task: segmentation`` -> (SegmentationModel, SegmentationObjective, {"segmentation": Stream})."""
    from mmfm.backbones.adapter import SegmentationModel
    from mmfm.data import SegmentationDataset
    from mmfm.objectives.segmentation import SegmentationObjective

    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split over {world_size} processes")
    model = SegmentationModel(cfg.model)
    dataset = SegmentationDataset(_path(cfg, cfg.data.segmentation), transform=_transforms(cfg, train=True),
                                  **_dataset_kwargs(cfg))
    stream = Stream("segmentation", dataset, cfg.train.batch_size // world_size, make_collate(None))
    return model, SegmentationObjective(model), {"segmentation": stream}


@torch.no_grad()
def evaluate_segmentation(model, cfg: Config, quiet: bool = True) -> dict:
    """``miou`` (and per-class ``iou``, None for classes absent from the split) on ``eval.segmentation``."""
    import math

    from tqdm import tqdm

    from mmfm.data import SegmentationDataset
    from mmfm.evaluation.segmentation import SegmentationMeter

    model.eval()
    device = next(model.parameters()).device
    dataset = SegmentationDataset(_path(cfg, cfg.eval.segmentation), transform=_transforms(cfg, train=False),
                                  **_dataset_kwargs(cfg))
    meter = SegmentationMeter(model.cfg.num_classes)
    for batch in tqdm(_eval_loader(dataset, cfg), desc="segmentation", disable=quiet):
        meter.update(model(batch["image"].to(device)), batch["mask"].to(device))
    result = meter.compute()
    return {"miou": result["miou"], "iou": [None if math.isnan(iou) else round(iou, 4) for iou in result["iou"]]}


def load_segmentation_model(path: str | Path):
    """A trained segmentation model from a run directory or its model.safetensors (strict)."""
    from safetensors.torch import load_model

    from mmfm.backbones.adapter import SegmentationModel

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no model.safetensors here; pass a run directory written by tools/train.py")
    cfg = config_from_checkpoint(file)
    kwargs = {k: v for k, v in cfg.backbone_kwargs.items() if k not in ("pretrained", "pretrained_file")}
    model = SegmentationModel(replace(cfg, backbone_kwargs=kwargs))
    load_model(model, str(file), strict=True)
    return model.eval()
