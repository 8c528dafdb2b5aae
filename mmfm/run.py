"""A run built from its config by the library: model, objective, streams, training and evaluation.

    run = build_run(load_config("configs/demo_shapes.yaml"))   # run.cfg is the resolved config
    metrics = train(cfg, "runs/demo", resume="latest")
    metrics = evaluate(model, cfg)

``mmfm train`` / ``mmfm eval`` (and their shells ``tools/train.py`` / ``tools/eval.py``) call these.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset

from mmfm import zoo
from mmfm.config import Config, load_config, save_config
from mmfm.data.collate import make_collate
from mmfm.data.formats import answer_index, normalize_answer, read_json
from mmfm.engine.trainer import Stream
from mmfm.errors import ConfigError, ModelError
from mmfm.fileio import atomic_write_text
from mmfm.models.io import build_model, load_model, save_model
from mmfm.models.model import MMFM
from mmfm.tasks import get_task, list_tasks
from mmfm.tasks.objective import TaskObjective


@dataclass
class Run:
    cfg: Config              # resolved: every value the run uses is filled in
    model: nn.Module
    objective: TaskObjective
    streams: dict[str, Stream]


def build_run(cfg: Config, world_size: int = 1) -> Run:
    tasks = {name: get_task(name) for name in cfg.train.tasks}
    answers = answer_lists(cfg, tasks.values())
    model = initial_model(cfg, answers)
    tokenizer = model.tokenizer if isinstance(model, MMFM) else None
    streams = {name: Stream(name, task.training_data(cfg, answers), _batch_size(cfg, task, world_size),
                            make_collate(tokenizer, task.text_keys), cfg.train.tasks[name])
               for name, task in tasks.items()}
    warmup = cfg.objective.alpha_warmup_steps or _epoch_steps(next(iter(streams.values())), cfg)
    cfg = replace(cfg, objective=replace(cfg.objective, alpha_warmup_steps=warmup))
    return Run(cfg, model, TaskObjective(model, cfg.objective, list(tasks), warmup), streams)


def _epoch_steps(stream: Stream, cfg: Config) -> int:
    """Optimizer steps of one epoch of a stream (the default distillation ramp); a shard stream whose size
    no manifest gives ramps over train.warmup_steps."""
    size = getattr(stream.dataset, "num_samples", None) if isinstance(stream.dataset, IterableDataset) \
        else len(stream.dataset)
    return max(1, size // cfg.train.batch_size if size else cfg.train.warmup_steps)


def answer_lists(cfg: Config, tasks) -> dict[str, list[str]]:
    """Answer head -> answer list, for every head the run's tasks train."""
    files = {}
    for task in tasks:
        files.update(task.answer_lists(cfg, cfg.model.fuses))
    return {head: [str(answer) for answer in read_json(path)] for head, path in files.items()}


def preprocess_of(cfg: Config) -> dict:
    return {"image_size": cfg.data.image_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "num_frames": cfg.data.num_frames}


def initial_model(cfg: Config, answers: dict) -> nn.Module:
    """A fresh model of ``cfg.model``, started from ``train.init`` when given (timm ViT or mmfm checkpoint)."""
    model = build_model(with_local_tokenizer(cfg.model), answers, preprocess_of(cfg), cfg.train.attention_backend)
    if isinstance(model, MMFM):
        model.temp.data.fill_(cfg.objective.temp)
        model.trunk.set_grad_checkpointing(cfg.train.grad_checkpointing)
    init = cfg.train.init
    if init.startswith("timm:"):
        import timm

        model.trunk.load_timm(timm.create_model(init[5:], pretrained=True, img_size=cfg.model.img_size))
    elif init:
        source = load_model(resolve_checkpoint(init, quiet=True))
        relisted = _relisted_heads(model, source)
        _load_fitting(model, source, init, skip=tuple(f"{name}." for head in relisted
                                                      for name in _answer_classifiers(model, head)))
        for head in relisted:
            _carry_answer_rows(model, source, head)
    return model


def with_local_tokenizer(model_cfg):
    """``model.vision_tokenizer_kwargs.checkpoint`` may name a zoo model (``mmfm-cvivit-shapes``): it becomes
    that model's verified local file."""
    kwargs = getattr(model_cfg, "vision_tokenizer_kwargs", None) or {}
    checkpoint = kwargs.get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint or Path(checkpoint).exists():
        return model_cfg
    local = str(resolve_checkpoint(checkpoint, quiet=True))
    return replace(model_cfg, vision_tokenizer_kwargs={**kwargs, "checkpoint": local})


def _load_fitting(model: nn.Module, source: nn.Module, name: str, skip: tuple[str, ...] = ()) -> None:
    """Every tensor of ``source`` whose name and shape the new model shares, except those under ``skip``
    (heads of new answer lists and other changed shapes start fresh); a warning when most start fresh."""
    own = model.state_dict()
    fitting = {k: v for k, v in source.state_dict().items()
               if k in own and own[k].shape == v.shape and not k.startswith(skip)}
    model.load_state_dict(fitting, strict=False)
    if len(fitting) < len(own) / 2:
        warnings.warn(f"train.init={name}: only {len(fitting)} of the model's {len(own)} tensors fit its weights, "
                      "the rest start fresh; give the config the model block of that checkpoint (for a zoo "
                      "model, its architecture in `mmfm zoo info NAME`)", stacklevel=2)


def _relisted_heads(model: nn.Module, source: nn.Module) -> list[str]:
    """Answer heads the init model has with another answer list than the new model's."""
    if not (isinstance(model, MMFM) and isinstance(source, MMFM)):
        return []
    return [head for head, names in model.answers.items() if source.answers.get(head, names) != names]


def _answer_classifiers(model: MMFM, head: str) -> dict[str, nn.Linear]:
    """The layers of an answer head with one output row per answer, by state-dict name."""
    layers = {f"answer_heads.{head}.{len(model.answer_heads[head]) - 1}": model.answer_heads[head][-1]}
    if head in model.answer_pair_heads:
        layers[f"answer_pair_heads.{head}"] = model.answer_pair_heads[head]
    return layers


def _carry_answer_rows(model: MMFM, source: MMFM, head: str) -> None:
    """A new answer list keeps what the init model learnt of the answers it shares with the old one: their
    classifier (and pair-feature) rows are copied; the other answers start fresh."""
    old_index = answer_index(source.answers[head])
    pairs = [(k, old_index[normalize_answer(a)]) for k, a in enumerate(model.answers[head])
             if normalize_answer(a) in old_index]
    if not pairs:
        return
    new_rows, old_rows = (torch.tensor(rows) for rows in zip(*pairs))
    trained = _answer_classifiers(source, head)
    with torch.no_grad():
        for name, layer in _answer_classifiers(model, head).items():
            if name in trained and layer.weight.shape[1:] == trained[name].weight.shape[1:]:
                layer.weight[new_rows] = trained[name].weight[old_rows]
                layer.bias[new_rows] = trained[name].bias[old_rows]


def _batch_size(cfg: Config, task, world_size: int) -> int:
    batch = cfg.train.batch_size
    if task.modality == "video" and cfg.train.video_batch_size:
        batch = cfg.train.video_batch_size
    if batch % world_size:
        raise ConfigError(f"the {task.name} batch of {batch} does not split over {world_size} processes")
    return batch // world_size


def train(cfg: Config, output: str | Path, resume: str | None = None, quiet: bool = False,
          run_eval: bool = True) -> dict:
    """Train, save OUTPUT/model.safetensors (the weight EMA with train.ema_decay, the raw weights then in
    OUTPUT/model_raw.safetensors), evaluate it, and write metrics.json, curves.png, config.yaml and the figures
    of the tasks that evaluate it (a tokenizer's reconstructions.png)."""
    from mmfm.engine.trainer import Trainer, make_accelerator, plot_history

    output = Path(output)
    accelerator = make_accelerator(cfg.train)
    run = build_run(cfg, accelerator.num_processes)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, output / "config.yaml")
    trainer = Trainer(run.cfg.train, output, accelerator, quiet=quiet)
    metrics = trainer.fit(run.objective, run.streams, num_workers=cfg.data.num_workers, resume=resume,
                          max_bad_fraction=cfg.data.max_bad_fraction)
    if accelerator.is_main_process:
        model = run.model
        if trainer.ema is not None:  # train.ema_decay: the EMA is the run's model, the raw weights stay beside it
            save_model(run.model, output / "model_raw.safetensors")
            model = trainer.ema.module
        save_model(model, output / "model.safetensors")
        if run_eval:
            metrics.update(timed_evaluate(model, run.cfg, quiet))
            write_figures(model, run.cfg, output)
        write_metrics(output / "metrics.json", metrics)
        plot_history(output)
    accelerator.wait_for_everyone()
    return metrics


def evaluate(model: nn.Module, cfg: Config, quiet: bool = True) -> dict:
    """Every evaluation of ``eval.metrics`` that a task of the model's family serves; a flat metrics dict."""
    wanted = set(cfg.eval.metrics)
    model.eval()
    metrics: dict = {}
    for task in _evaluating_tasks(model, cfg):
        metrics.update(task.evaluate(model, cfg, wanted, quiet))
    return metrics


def write_figures(model: nn.Module, cfg: Config, output: Path) -> None:
    """The figures of the tasks that evaluate the model (``Task.write_figures``), into ``output``."""
    for task in _evaluating_tasks(model, cfg):
        task.write_figures(model, cfg, output)


def _evaluating_tasks(model: nn.Module, cfg: Config) -> list:
    """The tasks of the model's family that serve a metric of ``eval.metrics``."""
    wanted, family = set(cfg.eval.metrics), model.arch_dict()["family"]
    return [get_task(name) for name in list_tasks()
            if get_task(name).family == family and wanted & set(get_task(name).metrics)]


def timed_evaluate(model: nn.Module, cfg: Config, quiet: bool = True) -> dict:
    start = time.perf_counter()
    metrics = evaluate(model, cfg, quiet)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    return metrics


def write_metrics(path: Path, metrics: dict) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


# ---- `mmfm train` / `mmfm eval` -------------------------------------------------------------------

def register(subparsers) -> None:
    """Add the ``train`` and ``eval`` commands; each sets ``args.func(args) -> exit code``."""
    parser = subparsers.add_parser("train", help="train a model from a YAML config")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--output", default=None, help="run directory (default runs/<config name>)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    _quiet_argument(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    parser.set_defaults(func=cmd_train)

    parser = subparsers.add_parser("eval", help="evaluate a trained model; writes OUTPUT/metrics.json")
    parser.add_argument("--checkpoint", required=True, help="run directory, .safetensors file or zoo name")
    parser.add_argument("--config", required=True, help="YAML config whose data/eval blocks to use")
    parser.add_argument("--output", required=True, help="directory for metrics.json")
    _quiet_argument(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k_test=32")
    parser.set_defaults(func=cmd_eval)


def _quiet_argument(parser) -> None:
    """``--quiet`` after the command too (``mmfm train ... --quiet``), as well as ``mmfm --quiet train``."""
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    output = Path(args.output or Path("runs") / Path(args.config).stem)
    metrics = train(cfg, output, resume=args.resume, quiet=args.quiet, run_eval=not args.no_eval)
    if not args.quiet:
        print({k: v for k, v in metrics.items() if "/" not in k})
    return 0


def cmd_eval(args) -> int:
    cfg = load_config(args.config, args.overrides)
    model = load_model(resolve_checkpoint(args.checkpoint, args.quiet), cfg.train.attention_backend)
    metrics = timed_evaluate(model, cfg, quiet=args.quiet)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    write_metrics(output / "metrics.json", metrics)
    write_figures(model, cfg, output)
    print({k: v for k, v in metrics.items() if "/" not in k})
    return 0


def resolve_checkpoint(value: str, quiet: bool = False) -> Path:
    """``--checkpoint``: an existing run directory or file (a path wins), else a zoo name (downloaded once,
    verified, cached)."""
    if Path(value).exists():
        return Path(value)
    if value in zoo.list_models():
        return zoo.resolve(value, quiet=quiet)
    raise ModelError(f"--checkpoint {value}: no such run directory or .safetensors file, and no model of "
                     f"that name in the model zoo ({zoo.manifest_path()}); pass a path, or a name that "
                     "`mmfm zoo list` shows")
