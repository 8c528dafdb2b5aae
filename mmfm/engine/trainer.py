"""The training loop: accelerate devices / mixed precision / DDP, task-stream mixing, atomic checkpoints,
exact resume, progress bar, TensorBoard, history and curves.

The loop only knows an ``Objective`` (below) and the datasets of its streams; it never imports a concrete
model or task.
"""

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from mmfm.config import TrainConfig
from mmfm.data.collate import BadSampleTracker
from mmfm.data.sampling import EpochSampler
from mmfm.engine.checkpoint import (
    load_checkpoint,
    read_data_state,
    read_train_state,
    resolve_resume,
    save_checkpoint,
    stream_positions,
)
from mmfm.engine.finetune import freeze_parts, layer_lr_scales, weight_ema
from mmfm.engine.schedule import lr_factor, stream_schedule
from mmfm.fileio import atomic_write_text


class Objective(torch.nn.Module):
    """What the Trainer trains: ``forward(stream, batch) -> dict`` of losses (``"loss"`` is optimised, the
    rest logged); ``after_step()`` runs once per optimizer step (EMA updates, step counters);
    ``fusion_parameters()`` are trained at ``lr * train.fusion_lr_scale``. The fine-tuning controls
    (``mmfm/engine/finetune.py``) read ``parameter_parts()`` (``train.freeze``), ``parameter_layers()``
    (``train.layer_decay``) and ``trained_model()`` (``train.ema_decay``)."""

    def forward(self, stream: str, batch: dict) -> dict:
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    def fusion_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def parameter_parts(self) -> dict[str, list[torch.nn.Parameter]]:
        """Named parts of the model that ``train.freeze`` can freeze; {} = none declared."""
        return {}

    def parameter_layers(self) -> dict[str, int]:
        """Parameter name -> layer for layer-wise lr decay, 0 (embeddings) up to the heads (timm's
        ``param_groups_layer_decay`` convention); {} = none declared."""
        return {}

    def trained_model(self) -> torch.nn.Module:
        """The module a run saves and evaluates, and the one ``train.ema_decay`` averages."""
        return self


@dataclass
class Stream:
    """One source of training batches: a dataset, its per-process batch size and collate function."""

    name: str
    dataset: Dataset
    batch_size: int
    collate_fn: object
    weight: float = 1.0


class RankBatchSampler:
    """Cuts the global sample stream into global batches and yields this rank's slice of each."""

    def __init__(self, sampler: EpochSampler, batch_size: int, rank: int, world: int):
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __iter__(self):
        global_batch = self.batch_size * self.world
        chunk = []
        for index in self.sampler:
            chunk.append(index)
            if len(chunk) == global_batch:
                yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                chunk = []


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator of a run: CPU unless CUDA is there, bf16 if asked, DDP tolerant of per-stream heads."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        # The schedule counts optimizer steps: accelerate's default steps a prepared scheduler once per process
        # per step (world size 2 ended the warm-up and the cosine twice as early).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(cfg.seed)
    return accelerator


def param_groups(objective: Objective, weight_decay: float, lr: float, fusion_lr_scale: float = 1.0,
                 layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups of the parameters that require grad: no decay on norms, biases, embeddings, positions and
    the temperature (what modules list in ``no_weight_decay()``, timm's convention); the objective's
    ``fusion_parameters()`` (fusion layers and the heads on them) at ``lr * fusion_lr_scale``; with
    ``layer_decay`` < 1 each lr also times its layer's ``finetune.layer_lr_scales``."""
    skip = set()
    for name, module in objective.named_modules():
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{name}.{n}" if name else n for n in module.no_weight_decay()}
    fusion = {id(p) for p in objective.fusion_parameters()}
    scales = layer_lr_scales(objective, layer_decay)
    groups: dict[tuple[float, bool, bool], list] = {}
    for name, param in objective.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim < 2 or name in skip or any(name.endswith(f".{s}") for s in skip))
        # Top layer first, so group 0 (whose lr the run logs) keeps the base lr's schedule.
        groups.setdefault((-scales.get(name, 1.0), decays, id(param) in fusion), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             "lr": lr * -neg_scale * (fusion_lr_scale if in_fusion else 1.0)}
            for (neg_scale, decays, in_fusion), params in sorted(groups.items())]


def make_optimizer(objective: Objective, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`, after freezing the parts ``train.freeze`` names (before accelerate's
    prepare, as DDP only reduces the gradients of parameters that require grad when it wraps the model).
    On CPU torch's default AdamW updates the parameters one by one (~9% of a demo step); the fused kernel
    does the same update in one pass. CUDA already defaults to multi-tensor."""
    freeze_parts(objective, cfg.freeze)
    groups = param_groups(objective, cfg.weight_decay, cfg.lr, cfg.fusion_lr_scale, cfg.layer_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=True if device.type == "cpu" else None)


class Trainer:
    def __init__(self, cfg: TrainConfig, output: Path, accelerator: Accelerator, quiet: bool = False):
        self.cfg, self.output, self.accelerator, self.quiet = cfg, Path(output), accelerator, quiet
        self._pending: dict[str, list[float]] = {}
        self._positions: dict[str, dict] = {}  # shard stream -> {reader slot: its position}
        self._layout: dict = {}

    # ---- data -------------------------------------------------------------------------------------

    def _loader(self, stream: Stream, batches_done: int, num_workers: int, positions: dict):
        acc = self.accelerator
        workers = {"num_workers": num_workers, "persistent_workers": num_workers > 0,
                   "prefetch_factor": 4 if num_workers > 0 else None}
        if isinstance(stream.dataset, IterableDataset):
            stream.dataset.configure(stream.batch_size, stream.collate_fn, rank=acc.process_index,
                                     world=acc.num_processes, num_workers=num_workers, batches_done=batches_done,
                                     positions=positions)
            return iter(DataLoader(stream.dataset, batch_size=None, **workers))
        sampler = EpochSampler(len(stream.dataset), seed=self.cfg.seed,
                               start=batches_done * stream.batch_size * acc.num_processes)
        batches = RankBatchSampler(sampler, stream.batch_size, acc.process_index, acc.num_processes)
        return iter(DataLoader(stream.dataset, batch_sampler=batches, collate_fn=stream.collate_fn, **workers))

    def _iterators(self, streams: dict[str, Stream], schedule: list[str], start_micro: int, num_workers: int,
                   data_state: dict):
        workers = max(1, num_workers // len(streams)) if num_workers > 0 else 0
        self._layout = {"processes": self.accelerator.num_processes, "workers": workers}
        positions = stream_positions(data_state, self._layout)
        self._positions = {name: dict(positions.get(name, {})) for name in streams}
        return {name: self._loader(stream, sum(1 for s in schedule[:start_micro] if s == name), workers,
                                   positions.get(name, {}))
                for name, stream in streams.items()}

    def _data_state(self) -> dict:
        """Collective: the shard streams' reader positions of every process, for the checkpoint."""
        parts = [self._positions]
        if self.accelerator.num_processes > 1:
            parts = gather_object(parts)
        merged: dict[str, dict] = {}
        for part in parts:
            for name, slots in part.items():
                merged.setdefault(name, {}).update({str(slot): state for slot, state in slots.items()})
        return {"layout": self._layout, "streams": {name: slots for name, slots in merged.items() if slots}}

    def _to_device(self, batch: dict) -> dict:
        device = self.accelerator.device
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- loop -------------------------------------------------------------------------------------

    def fit(self, objective: Objective, streams: dict[str, Stream], *, num_workers: int = 0,
            resume: str | None = None, max_bad_fraction: float = 0.01) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if not isinstance(objective, Objective):
            raise TypeError(f"Trainer.fit takes an mmfm.engine.trainer.Objective, got {type(objective).__name__}")
        optimizer = make_optimizer(objective, cfg, acc.device)
        budget_s = cfg.max_minutes * 60
        state = {"step": 0, "elapsed": 0.0, "samples": 0, "num_seen": 0, "num_bad": 0}
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps,
                                           state["elapsed"] / budget_s if budget_s else 0.0))
        objective, optimizer, scheduler = acc.prepare(objective, optimizer, scheduler)
        # train.ema_decay: Trainer.ema, restored by --resume below with the rest of the checkpoint
        self.ema = weight_ema(acc, acc.unwrap_model(objective).trained_model(), cfg.ema_decay)
        resume_from = resolve_resume(resume, self.output)
        if resume_from is not None:
            state.update(read_train_state(resume_from))
        accum = cfg.grad_accum
        schedule = stream_schedule({n: s.weight for n, s in streams.items()}, cfg.max_steps * accum)
        data_state = read_data_state(resume_from) if resume_from is not None else {}
        iterators = self._iterators(streams, schedule, state["step"] * accum, num_workers, data_state)
        if resume_from is not None:
            load_checkpoint(acc, resume_from)
            self._truncate_history(state["step"])
        tracker = BadSampleTracker(max_bad_fraction)
        tracker.num_seen, tracker.num_bad = state["num_seen"], state["num_bad"]
        writer = self._writer()
        bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=self._quiet_bar(), desc="train",
                   dynamic_ncols=True)
        start_time = time.perf_counter() - state["elapsed"]
        objective.train()
        while state["step"] < cfg.max_steps:
            logs = self._step(objective, optimizer, scheduler, iterators, streams, schedule, state, tracker)
            state["elapsed"] = time.perf_counter() - start_time
            self._log(logs, state, writer, bar)
            if self._should_save(state["step"]):
                save_checkpoint(acc, self.output, state["step"], dict(state), cfg.keep_last, self._data_state())
            if budget_s and self._out_of_time(state["elapsed"], budget_s):
                break
        bar.close()
        if not self._should_save(state["step"]):
            save_checkpoint(acc, self.output, state["step"], dict(state), cfg.keep_last, self._data_state())
        if writer is not None:
            writer.close()
        return {"train_seconds": round(state["elapsed"], 2), "steps": state["step"],
                "samples_per_s": round(state["samples"] / max(state["elapsed"], 1e-9), 2),
                "bad_samples": state["num_bad"], "world_size": acc.num_processes}

    def _step(self, objective, optimizer, scheduler, iterators, streams, schedule, state, tracker) -> dict:
        cfg, acc = self.cfg, self.accelerator
        logs: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            name = schedule[state["step"] * cfg.grad_accum + micro]
            batch = next(iterators[name])
            if "stream_state" in batch:
                position = batch.pop("stream_state")
                self._positions[name][position["slot"]] = position
            tracker.update(batch)
            state["num_seen"], state["num_bad"] = tracker.num_seen, tracker.num_bad
            batch = self._to_device(batch)
            sync = micro == cfg.grad_accum - 1
            with acc.no_sync(objective) if not sync else contextlib.nullcontext():
                with acc.autocast():
                    losses = objective(name, batch)
                acc.backward(losses["loss"] / cfg.grad_accum)
            state["samples"] += streams[name].batch_size * acc.num_processes
            for key, value in losses.items():
                logs[key if key != "loss" else f"loss/{name}"] = float(value.detach())
        if cfg.clip_grad > 0:
            acc.clip_grad_norm_(objective.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        acc.unwrap_model(objective).after_step()
        state["step"] += 1
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(objective).trained_model(), step=state["step"])
        logs["lr"] = scheduler.get_last_lr()[0]
        return logs

    def _out_of_time(self, elapsed: float, budget_s: float) -> bool:
        flag = torch.tensor([1.0 if elapsed >= budget_s else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _should_save(self, step: int) -> bool:
        return self.cfg.save_every > 0 and step % self.cfg.save_every == 0

    def _quiet_bar(self) -> bool:
        return self.quiet or not sys.stderr.isatty() or not self.accelerator.is_main_process

    # ---- logging ----------------------------------------------------------------------------------

    def _writer(self):
        if not self.accelerator.is_main_process:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.output / "tensorboard"))

    def _log(self, logs: dict, state: dict, writer, bar) -> None:
        """Progress bar every step; TensorBoard and history.jsonl get each key's mean over the interval."""
        step = state["step"]
        rate = state["samples"] / max(state["elapsed"], 1e-9)
        bar.update(1)
        losses = [v for k, v in logs.items() if k.startswith("loss/")]
        bar.set_postfix(loss=f"{sum(losses) / max(1, len(losses)):.3f}", lr=f"{logs['lr']:.2e}",
                        sps=f"{rate:.0f}")
        for key, value in logs.items():
            self._pending.setdefault(key, []).append(value)
        if writer is None or (step % self.cfg.log_every and step != self.cfg.max_steps):
            return
        means = {k: sum(v) / len(v) for k, v in self._pending.items()}
        self._pending = {}
        for key, value in means.items():
            writer.add_scalar(key, value, step)
        writer.add_scalar("samples_per_s", rate, step)
        record = {"step": step, "elapsed": round(state["elapsed"], 2), **{k: round(v, 5) for k, v in means.items()}}
        with open(self.output / "history.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _truncate_history(self, step: int) -> None:
        path = self.output / "history.jsonl"
        if not self.accelerator.is_main_process or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def plot_history(output: Path) -> Path | None:
    """Training curves (every loss / accuracy series against step) as OUTPUT/curves.png."""
    path = output / "history.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines()]
    keys = sorted({k for r in records for k in r if k not in ("step", "elapsed", "lr")})
    cols = 3
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = output / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
