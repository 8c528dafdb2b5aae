"""Typed configuration: dataclasses loaded from YAML, dotted command-line overrides, unknown keys are errors.

    cfg = load_config("configs/demo_shapes.yaml", ["train.max_steps=50", "data.root=/data/shapes"])

A config has five blocks: ``model`` (an architecture: ``model.arch`` names a preset of
``mmfm/architectures`` and the block's other keys override it), ``objective``, ``data``, ``train`` (whose
``tasks`` maps task streams of ``mmfm.tasks.list_tasks()`` to mixing weights) and ``eval``. Every key is
declared below with its default; a misspelt key fails with the closest valid name.
"""

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmfm.errors import ConfigError

FAMILIES = ("mmfm", "segmentation", "tokenizer")
# The objective's loss terms and their default weights (objective.loss_weights; words: caption-word classification;
# recon_* .. lfq_*: the video tokenizer's, mmfm/tasks/tokenizer.py, with MAGVIT-v2's LFQ weights).
LOSS_WEIGHTS = {"itc": 1.0, "itm": 1.0, "itm_rank": 0.0, "mlm": 1.0, "qa": 1.0, "words": 0.0,
                "recon_l1": 0.0, "recon_l2": 1.0, "perceptual": 0.0, "lfq_entropy": 0.1, "lfq_commit": 0.25}


@dataclass
class ModelConfig:
    """An mmfm architecture (what a checkpoint stores): a preset from ``mmfm/architectures`` + overrides."""

    arch: str = ""                   # a preset name (mmfm.list_models(pretrained=False)); keys below override it
    family: str = "mmfm"
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    fusion_layer: int = 4            # layers [0, fusion_layer) unimodal, the rest fuse [text ; vision]
    fusion_mode: str = "joint"       # joint: all of [text ; vision] updated; cross: text tokens only
    vision_depth: int = 0            # cross mode: vision's unimodal layers (0: fusion_layer, -1: all depth layers)
    img_size: int = 64
    patch_size: int = 8
    context_length: int = 40
    max_frames: int = 16
    embed_dim: int = 128             # ITC projection size
    drop_path: float = 0.0
    rolling: bool = True             # temporal token rolling for videos, unimodal and joint passes
    text_bigram: bool = True         # add a projection of the previous word to each text token (word order)
    vision_tokenizer: str = "patch"  # mmfm.list_vision_tokenizers(): patch, conv, backbone, tubelet, cvivit, ...
    vision_tokenizer_kwargs: dict = field(default_factory=dict)
    itm_pair_features: bool = False  # ITM also reads the product of the pair's ITC features (models/model.py)
    answer_pair_features: bool = False  # answer heads also read question [CLS] * image [CLS] (MLB pooling)
    word_head: bool = False          # the vision [CLS] classifies its caption's words (objective.loss_weights.words)
    word_bigram_buckets: int = 4096  # ... and its hashed word pairs (0: words only)

    @property
    def fuses(self) -> bool:
        """Whether the architecture has fusion layers (ITM, MLM and answer heads need them)."""
        return self.fusion_layer < self.depth


@dataclass
class SegmentationModelConfig:
    """A timm dense-prediction network (``family: segmentation``, e.g. P2AT) and its number of classes."""

    arch: str = ""
    family: str = "segmentation"
    backbone: str = "p2at_small"
    backbone_kwargs: dict = field(default_factory=dict)
    num_classes: int = 7             # classes including background
    fuses = False


@dataclass
class TokenizerModelConfig:
    """A C-ViViT video tokenizer with discrete codes (``family: tokenizer``, mmfm/tokenizers/cvivit.py)."""

    arch: str = ""
    family: str = "tokenizer"
    img_size: int = 64
    patch_size: int = 8              # spatial compression: one token per patch x patch pixels
    tubelet_size: int = 4            # temporal compression after the first frame: clips of 1 + k * tubelet_size
    width: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    spatial_depth: int = 2           # encoder layers within a token-frame (the decoder mirrors the encoder)
    temporal_depth: int = 2          # causal encoder layers along time, per grid position
    quantizer: str = "fsq"           # fsq | lfq (vector-quantize-pytorch)
    levels: list = field(default_factory=lambda: [8, 5, 5, 5])  # fsq: levels per code dimension (product = codes)
    codebook_size: int = 1024        # lfq: a power of two (one bit per code dimension)
    num_codebooks: int = 1           # codes per token, each from the codebook (codes gain a last axis when > 1)
    fuses = False


MODEL_CONFIGS = {"mmfm": ModelConfig, "segmentation": SegmentationModelConfig, "tokenizer": TokenizerModelConfig}


@dataclass
class ObjectiveConfig:
    """ALBEF's objective settings: the run's training knobs, not part of the architecture."""

    temp: float = 0.07               # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    momentum: float = 0.995          # EMA of the momentum encoder; 0 = no momentum encoder
    queue_size: int = 4096           # momentum features kept per alignment stream; 0 = none
    alpha: float = 0.4               # momentum-distillation weight, ramped from 0
    alpha_warmup_steps: int = 0      # optimizer steps of the ramp; 0 = one epoch of the first stream
    mlm_prob: float = 0.15
    itc_positives: str = "image_id"  # image_id: every key of the same image/video; diagonal: ALBEF pretraining
    loss_weights: dict = field(default_factory=lambda: dict(LOSS_WEIGHTS))  # a term left out keeps its default


@dataclass
class DataConfig:
    root: str = "data/shapes"
    image_text: str = "annotations/pretrain.json"
    video_text: str = "annotations/video_train.json"
    vqa: str = "annotations/vqa_train.json"
    answer_list: str = "annotations/answer_list.json"
    video_qa: str = "annotations/videoqa_train.json"
    video_answer_list: str = "annotations/videoqa_answer_list.json"
    segmentation: str = "annotations/seg_train.json"
    image_size: int = 64
    num_frames: int = 8
    hflip: bool = True
    crop_scale: list = field(default_factory=lambda: [0.5, 1.0])  # random-resized-crop area; [1, 1] = no crop
    negative_words: list = field(default_factory=list)  # word groups for ITM caption negatives (data/negatives.py)
    negative_replace_prob: float = 0.0  # share of caption negatives that replace a word instead of swapping two
    qa_with_captions: bool = False   # image/video-text samples also carry one of their questions (data.vqa, ...)
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: int = 2
    on_error: str = "skip"           # skip | raise
    max_bad_fraction: float = 0.01
    max_pixels: int = 64_000_000          # per image or video frame, read from the header; larger = bad sample
    max_video_pixels: int = 300_000_000   # per clip: num_frames x H x W decoded pixels; larger = bad sample
    # webdataset shards: [{shards: PATTERN, weight: W, task: NAME}, ...]; a task with sources streams them
    # (mixed by weight) instead of reading its annotation file (mmfm/data/shards.py, docs/training.md)
    sources: list = field(default_factory=list)
    shard_mode: str = "epoch"        # epoch: every sample once per epoch, exact resume | resampled: with replacement
    shuffle_buffer: int = 1000       # raw records per reader held for shuffling (memory: records x their size)


@dataclass
class TrainConfig:
    # task stream -> mixing weight (mmfm.tasks.list_tasks()); a list of names takes each task's default weight
    tasks: dict = field(default_factory=lambda: {"image_text": 1.0})
    batch_size: int = 64             # global batch of image streams
    video_batch_size: int = 0        # global batch of video streams (0 = batch_size)
    lr: float = 1e-4
    fusion_lr_scale: float = 1.0     # lr multiplier of the fusion layers and the ITM / answer heads
    layer_decay: float = 1.0         # layer-wise lr decay: lr * layer_decay ** (layers between it and the heads)
    freeze: list = field(default_factory=list)  # model parts left untrained (mmfm.models.model.PARTS)
    ema_decay: float = 0.0           # > 0: model.safetensors holds an EMA of the weights (timm ModelEmaV3)
    weight_decay: float = 0.02
    warmup_steps: int = 100
    max_steps: int = 1000
    max_minutes: float = 0.0         # > 0: also stop (and anneal the schedule) by wall time
    grad_accum: int = 1
    clip_grad: float = 1.0
    precision: str = "fp32"          # fp32 | bf16
    grad_checkpointing: bool = False
    seed: int = 0
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    threads: int = 0                 # torch intra-op threads, 0 = torch default
    init: str = ""                   # "", "timm:<vit name>" (ImageNet ViT weights), or an mmfm checkpoint
    attention_backend: str = "auto"  # auto | xformers | sdpa | math (fixed per attention module)


@dataclass
class EvalConfig:
    retrieval: str = "annotations/retrieval_test.json"
    retrieval_novel: str = "annotations/retrieval_test_novel.json"
    binding: str = "annotations/binding_test.json"
    vqa: str = "annotations/vqa_test.json"
    video_retrieval: str = "annotations/video_test.json"
    video_qa: str = "annotations/videoqa_test.json"
    segmentation: str = "annotations/seg_test.json"
    zeroshot: str = ""    # an ImageFolder (ROOT/class_name/*.jpg) for the zeroshot metric; "" = none
    zeroshot_scenes: str = "annotations/scenes_test.json"  # ShapesWorld: its single-object images' shape / colour
    zeroshot_templates: list = field(default_factory=list)  # prompt templates, "{}" = the class; [] = the defaults
    metrics: list = field(default_factory=lambda: ["retrieval", "binding", "vqa"])
    k_test: int = 16
    rerank_score: str = "itm+itc"    # ITM re-rank score: itm+itc (LAVIS) or itm (ALBEF's Retrieval.py)
    batch_size: int = 256


@dataclass
class Config:
    model: ModelConfig | SegmentationModelConfig | TokenizerModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _parse_number(text: str, key: str) -> float:
    """YAML 1.1 reads ``1e-3`` as a string; accept any Python float literal."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"config key {key!r} must be a number, got {text!r}") from None


def _coerce(value, kind, key: str):
    origin = typing.get_origin(kind) or kind
    if origin in (int, float) and isinstance(value, str):
        value = _parse_number(value, key)
    if origin is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if origin in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if origin is int and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        value = int(value)
    if origin in (dict, list) and not isinstance(value, origin):
        raise ConfigError(f"config key {key!r} must be a {origin.__name__}, got {value!r}")
    if origin is str and not isinstance(value, str):
        value = str(value)
    return float(value) if origin is float else value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from nested dicts; unknown keys raise ConfigError naming the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"config block {prefix.rstrip('.') or '<top>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + key!r}{_closest(key, names)}")
        kind = hints[key]
        if cls is TrainConfig and key == "tasks" and isinstance(value, list):
            value = dict.fromkeys(value)
        if cls is Config and key == "model":
            values[key] = model_config(value or {}, f"{prefix}model.")
        elif dataclasses.is_dataclass(kind):
            values[key] = from_dict(kind, value or {}, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, kind, prefix + key)
    return cls(**values)


def model_config(block: dict, prefix: str = "model.",
                 presets: bool = True) -> ModelConfig | SegmentationModelConfig | TokenizerModelConfig:
    """A model block: the preset named by its ``arch`` (if any, and ``presets``), overridden by the block's
    own keys. A checkpoint's stored block is complete and read with ``presets=False``."""
    from mmfm.architectures import architecture

    if not isinstance(block, dict):
        raise ConfigError(f"config block {prefix.rstrip('.')!r} must be a mapping, got {block!r}")
    merged = {**(architecture(block["arch"]) if presets and block.get("arch") else {}), **block}
    family = merged.get("family", "mmfm")
    if family not in MODEL_CONFIGS:
        raise ConfigError(f"{prefix}family={family!r}: use one of {', '.join(FAMILIES)}")
    return from_dict(MODEL_CONFIGS[family], merged, prefix)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a block")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _override_value(key.strip(), raw) if raw else "")
    return tree


def _override_value(key: str, raw: str):
    """An override's value as plain YAML data; a tag (``!!python/object:...``, ``!!binary``) is refused,
    since no config value needs one and safe_load either fails on it or builds a non-config type."""
    try:
        if any(isinstance(token, yaml.TagToken) for token in yaml.scan(raw)):
            raise ConfigError(f"override {key}={raw!r}: YAML tags (!!...) are not accepted; give a plain value")
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}={raw!r} is not a valid YAML value ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line (its str spans several, with a caret under the culprit)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or str(err).splitlines()[0]}{where}"


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "tasks":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
    cfg = from_dict(Config, _merge(data, parse_overrides(list(overrides))))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    _validate_tasks(cfg)
    if cfg.train.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision={cfg.train.precision!r}: use fp32 or bf16")
    if cfg.train.fusion_lr_scale <= 0:
        raise ConfigError(f"train.fusion_lr_scale={cfg.train.fusion_lr_scale}: must be > 0 (1 = the base lr)")
    _validate_finetune(cfg)
    if cfg.objective.queue_size > 0 and cfg.objective.momentum <= 0:
        # Measured: without the EMA teacher the queue holds stale online features that the drifting encoder
        # separates trivially, the temperature falls to its 0.001 clamp and ITC stays at chance.
        raise ConfigError(f"objective.queue_size={cfg.objective.queue_size} needs objective.momentum > 0: the "
                          "queue holds the momentum encoder's features, and with objective.momentum=0 ITC "
                          "collapses; set objective.queue_size=0 or objective.momentum=0.995")
    _validate_loss_weights(cfg)
    _require_choice("objective.itc_positives", cfg.objective.itc_positives, ("image_id", "diagonal"))
    _require_choice("eval.rerank_score", cfg.eval.rerank_score, ("itm+itc", "itm"))
    _require_choice("data.on_error", cfg.data.on_error, ("skip", "raise"))
    _validate_sources(cfg)
    for key in ("max_pixels", "max_video_pixels"):
        if getattr(cfg.data, key) < 1:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)}: give a positive number of pixels")


def _validate_loss_weights(cfg: Config) -> None:
    for term, weight in cfg.objective.loss_weights.items():
        if term not in LOSS_WEIGHTS:
            raise ConfigError(f"objective.loss_weights.{term}: not a loss term; use {', '.join(LOSS_WEIGHTS)}"
                              f"{_closest(term, tuple(LOSS_WEIGHTS))}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise ConfigError(f"objective.loss_weights.{term}={weight!r}: give a number >= 0")
    if cfg.objective.loss_weights.get("words", 0) > 0 and not getattr(cfg.model, "word_head", False):
        raise ConfigError("objective.loss_weights.words > 0 needs model.word_head=true (the head it trains)")


SOURCE_KEYS = ("shards", "weight", "task")


def _validate_sources(cfg: Config) -> None:
    """``data.sources`` entries: a shard pattern, a positive weight, a task that train.tasks trains."""
    _require_choice("data.shard_mode", cfg.data.shard_mode, ("epoch", "resampled"))
    if cfg.data.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer={cfg.data.shuffle_buffer}: give a number of records >= 0")
    for k, source in enumerate(cfg.data.sources):
        where = f"data.sources[{k}]"
        if not isinstance(source, dict):
            raise ConfigError(f"{where} must be a mapping like {{shards: DIR/{{00000..00009}}.tar, weight: 1.0, "
                              f"task: image_text}}, got {source!r}")
        for key in source:
            if key not in SOURCE_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key; use {', '.join(SOURCE_KEYS)}"
                                  f"{_closest(key, SOURCE_KEYS)}")
        if not isinstance(source.get("shards"), (str, list)) or not source["shards"]:
            raise ConfigError(f"{where}.shards: give a shard pattern (a directory, glob, brace pattern or URL)")
        weight = source.setdefault("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise ConfigError(f"{where}.weight={weight!r}: the mixing weight must be a number > 0")
        task = source.setdefault("task", "image_text")
        if task not in cfg.train.tasks:
            raise ConfigError(f"{where}.task={task!r} is not trained by this run; add it to train.tasks "
                              f"({', '.join(cfg.train.tasks)})")


def _validate_finetune(cfg: Config) -> None:
    """``train.layer_decay`` in (0, 1], ``train.ema_decay`` in [0, 1), ``train.freeze`` names parts of the model."""
    from mmfm.models.model import PARTS

    train = cfg.train
    if not 0 < train.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay={train.layer_decay}: give a number in (0, 1] (1 = no layer decay, "
                          "0.65-0.85 is usual for fine-tuning)")
    if not 0 <= train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={train.ema_decay}: give a number in [0, 1) (0 = no EMA, e.g. 0.999)")
    parts = PARTS if cfg.model.family == "mmfm" else ()
    for name in train.freeze:
        if name not in parts:
            choices = f"use {', '.join(parts)}" if parts else f"a {cfg.model.family} model declares no parts"
            raise ConfigError(f"train.freeze: {name!r} is not a part of the model; {choices}"
                              f"{_closest(str(name), parts)}")


def _require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: use one of {', '.join(choices)}{_closest(value, choices)}")


def _validate_tasks(cfg: Config) -> None:
    """``train.tasks`` and ``eval.metrics`` against the task registry; one model family for all tasks."""
    from mmfm.tasks import get_task, list_tasks

    names = list_tasks()
    if not cfg.train.tasks:
        raise ConfigError(f"train.tasks is empty: give task streams and weights, e.g. {{image_text: 1.0}} "
                          f"(tasks: {', '.join(names)})")
    for name, weight in cfg.train.tasks.items():
        if name not in names:
            raise ConfigError(f"train.tasks.{name} is not a task; use {', '.join(names)}{_closest(name, names)}")
        if weight is None:
            weight = cfg.train.tasks[name] = get_task(name).default_weight
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise ConfigError(f"train.tasks.{name}={weight!r}: the mixing weight must be a number > 0")
        family = get_task(name).family
        if family != cfg.model.family:
            raise ConfigError(f"train.tasks.{name} trains a {family!r} model but model.family is "
                              f"{cfg.model.family!r}; pick a model.arch of family {family!r}")
    metrics = sorted({m for n in names for m in get_task(n).metrics})
    for metric in cfg.eval.metrics:
        if metric not in metrics:
            raise ConfigError(f"eval.metrics: {metric!r} is not an evaluation; use {', '.join(metrics)}"
                              f"{_closest(metric, metrics)}")


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config as YAML; passed back to ``load_config`` it reproduces the run."""
    from mmfm.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
