"""What a task is, the registry that lists them, and the data helpers tasks share.

A task declares its training stream (its name), default mixing weight, model family, the dataset it
builds from the data config, the text keys its collate tokenizes, the answer heads it needs, its loss on
the shared model (a ``TaskLoss``, built from the pure functions of ``mmfm.objectives``) and its evaluation
(the ``eval.metrics`` names it serves). ``list_tasks()`` is the only list of tasks: config validation,
stream building, the run's objective, evaluation, inference and the zoo read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmfm.data.collate import make_collate
from mmfm.data.formats import resolve
from mmfm.data.shards import MediaReader, ShardSource, ShardStream, expand_shards
from mmfm.data.transforms import eval_transform, train_transform
from mmfm.errors import ConfigError

if TYPE_CHECKING:
    from mmfm.config import Config, ObjectiveConfig
    from mmfm.tasks.objective import TaskObjective

_REGISTRY: dict[str, Task] = {}


class Task:
    name: ClassVar[str] = ""
    family: ClassVar[str] = "mmfm"          # the model family it trains (model.family)
    modality: ClassVar[str] = "image"       # image | video: video streams use train.video_batch_size
    default_weight: ClassVar[float] = 1.0   # mixing weight when train.tasks lists the task without one
    metrics: ClassVar[tuple[str, ...]] = ()  # the eval.metrics names its evaluate() serves
    text_keys: ClassVar[tuple[str, ...]] = ()  # batch text fields the collate tokenizes
    answers_questions: ClassVar[bool] = False  # trains the answer head named after it (inference asks it)

    def answer_lists(self, cfg: Config, fuses: bool) -> dict[str, str]:
        """Answer head -> answer-list file, for the heads this task trains."""
        return {}

    def needs_momentum(self, settings: ObjectiveConfig) -> bool:
        """Whether its loss reads the momentum (EMA) model."""
        return False

    def build_dataset(self, cfg: Config, answers: dict[str, list[str]]) -> Dataset:
        """Its map-style training dataset, from the annotation file of the data config."""
        raise NotImplementedError

    def shard_decoder(self, cfg: Config, answers: dict[str, list[str]]):
        """``(record, rng) -> sample``: its training samples from webdataset records (mmfm.data.shards)."""
        raise ConfigError(f"task {self.name!r} cannot train from shards; remove its data.sources entries")

    def training_data(self, cfg: Config, answers: dict[str, list[str]]) -> Dataset:
        """A `ShardStream` over the task's ``data.sources`` when it has some, else `build_dataset`."""
        sources = shard_sources(cfg, self.name)
        if not sources:
            return self.build_dataset(cfg, answers)
        return ShardStream(sources, self.shard_decoder(cfg, answers), mode=cfg.data.shard_mode, seed=cfg.train.seed,
                           shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error)

    def build_loss(self, settings: ObjectiveConfig, model: nn.Module) -> TaskLoss:
        """Its loss with the run's objective settings (the ``objective`` config block)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, cfg: Config, wanted: set[str], quiet: bool = True) -> dict:
        """The metrics of ``wanted`` (a subset of ``metrics``) whose annotation files exist."""
        return {}

    def write_figures(self, model: nn.Module, cfg: Config, output: Path) -> None:
        """Figures of an evaluated model beside its metrics.json (the tokenizer's reconstructions); none by default."""


class TaskLoss(nn.Module):
    """A task's loss: ``forward(batch, run) -> {"loss": ..., <logged values>}``; ``run`` is the run's
    ``TaskObjective`` (the model, the momentum model, the distillation weight)."""

    def forward(self, batch: dict, run: TaskObjective) -> dict:
        raise NotImplementedError


def register_task(task_class: type[Task]) -> type[Task]:
    """Class decorator: adds the task to the registry under its ``name``."""
    if not task_class.name:
        raise ValueError(f"{task_class.__name__} has no name")
    _REGISTRY[task_class.name] = task_class()
    return task_class


def unregister_task(name: str) -> None:
    _REGISTRY.pop(name, None)


def list_tasks() -> list[str]:
    return list(_REGISTRY)


def get_task(name: str) -> Task:
    if name not in _REGISTRY:
        raise ConfigError(f"task {name!r} is not registered; tasks: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def answer_task_of(head: str) -> Task | None:
    """The task whose answer head is ``head`` (the head a VQA-style task trains is named after it)."""
    task = _REGISTRY.get(head)
    return task if task is not None and task.answers_questions else None


def answer_heads_by_modality() -> dict[str, str]:
    """Modality (image | video) -> the answer head that answers questions about it."""
    return {task.modality: name for name, task in _REGISTRY.items() if task.answers_questions}


# ---- data helpers shared by tasks ------------------------------------------------------------------

def data_path(cfg: Config, relative: str) -> str:
    """A file under data.root that must exist."""
    path = resolve(cfg.data.root, relative)
    if not Path(path).exists():
        raise ConfigError(f"data file {path!r} does not exist (data.root={cfg.data.root!r}); generate "
                          "ShapesWorld with `python tools/make_data.py shapes --out DIR` or fix the path")
    return path


def optional_path(cfg: Config, relative: str) -> str | None:
    """A file under data.root, or None when it is not configured or absent (its evaluation is skipped)."""
    path = resolve(cfg.data.root, relative)
    return path if relative and Path(path).exists() else None


def shard_sources(cfg: Config, task: str) -> list[ShardSource]:
    """The ``data.sources`` entries of ``task``, their patterns resolved against data.root."""
    return [ShardSource(tuple(expand_shards(s["shards"], cfg.data.root)), float(s.get("weight", 1.0)), str(s["shards"]))
            for s in cfg.data.sources if s.get("task", "image_text") == task]


def media_reader(cfg: Config, modality: str) -> MediaReader:
    """How shard records' media are decoded for training (random frame sampling, the data limits)."""
    return MediaReader(modality, cfg.data.num_frames, "random", cfg.data.max_pixels, cfg.data.max_video_pixels)


def transform(cfg: Config, train: bool):
    norm = {"mean": tuple(cfg.data.mean), "std": tuple(cfg.data.std)}
    if not train:
        return eval_transform(cfg.data.image_size, **norm)
    scale = cfg.data.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.crop_scale={scale}: give [low, high] with 0 < low <= high <= 1 "
                          "([1, 1] turns cropping off)")
    return train_transform(cfg.data.image_size, scale=tuple(scale), flip=cfg.data.hflip, **norm)


def dataset_kwargs(cfg: Config) -> dict:
    return {"root": cfg.data.root, "seed": cfg.train.seed, "on_error": cfg.data.on_error,
            "max_pixels": cfg.data.max_pixels, "max_video_pixels": cfg.data.max_video_pixels}


def eval_loader(dataset: Dataset, cfg: Config) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                      collate_fn=make_collate(None))
