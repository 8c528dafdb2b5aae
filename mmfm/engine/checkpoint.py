"""Run checkpoints: atomic directories written with accelerate's ``save_state``, the last K kept.

Layout: ``OUTPUT/checkpoints/step_00000500/`` (model/optimizer/scheduler/RNG state from accelerate, plus
``train_state.json``). A checkpoint is written to a temporary directory and renamed into place, so a run
killed mid-save leaves the previous checkpoint intact and no half-written one.

Resuming reads files a user may have damaged or swapped: a missing or unreadable file (or a state of another
model or optimizer shape) is a ``ModelError`` naming the checkpoint, never a traceback. The one exception
is the RNG file, which accelerate skips silently when it cannot read it: mmfm warns, naming the file, and
the run resumes with fresh random state (weights, optimizer and data position intact; not bit-exact).
"""

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

from mmfm.errors import ConfigError, ModelError

STATE_FILE = "train_state.json"
DATA_STATE_FILE = "data_state.json"  # shard streams: each reader's (epoch, records read) per source
RNG_KEYS = {"random_state", "numpy_random_seed", "torch_manual_seed"}  # what accelerate's RNG file holds
# How torch.load fails on a damaged or foreign pickle
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError)
_RESUME_ADVICE = "resume from another checkpoint (--resume latest picks the newest) or start without --resume"


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[Path]:
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(resume: str | None, output: Path) -> Path | None:
    """``None`` -> no resume; ``latest`` -> newest complete checkpoint in output (None if there is none)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume!r} is not a checkpoint directory (no {STATE_FILE}); "
                          f"use 'latest' or a path like {checkpoint_dir(output)}/step_00000500")
    return path


def read_train_state(path: Path) -> dict:
    """The counters of a checkpoint (step, samples, ...): a JSON object of numbers with an integer step."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"--resume {path}: {file.name} is unreadable ({err}); {_RESUME_ADVICE}") from None
    numbers = isinstance(state, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                               for v in state.values())
    if not numbers or not isinstance(state.get("step"), int):
        raise ModelError(f"--resume {path}: {file.name} is not a train state (a JSON object of counts with an "
                         f"integer step); {_RESUME_ADVICE}")
    return state


def load_checkpoint(accelerator, path: Path) -> None:
    """accelerate's ``load_state`` of a checkpoint directory; what goes wrong is one ModelError naming it."""
    _check_random_states(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # accelerate, torch and safetensors fail in many types (OSError, SafetensorError, ...)
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:400]  # one line, however long torch's was
        raise ModelError(f"--resume {path}: cannot restore this checkpoint ({reason}); it is damaged or was "
                         f"written by a run of another model or optimizer; {_RESUME_ADVICE}") from err


def _check_random_states(path: Path, process_index: int) -> None:
    """Warn when this process's RNG file is missing or unreadable: accelerate would skip it without a word."""
    from accelerate.utils import RNG_STATE_NAME, load

    file = path / f"{RNG_STATE_NAME}_{process_index}.pkl"
    try:
        states = load(file)
        problem = "" if isinstance(states, dict) and RNG_KEYS <= set(states) else "not an RNG state"
    except _UNREADABLE as err:
        problem = f"{type(err).__name__}: {err}".splitlines()[0]
    if problem:
        warnings.warn(f"--resume {path}: {file.name} is unreadable ({problem}); resuming with fresh random state "
                      "(weights, optimizer and data position are restored, but augmentation and dropout draws "
                      "differ from an uninterrupted run)", stacklevel=2)


def read_data_state(path: Path) -> dict:
    """The shard streams' reader positions saved with a checkpoint (``{}`` when it has none)."""
    file = path / DATA_STATE_FILE
    if not file.is_file():
        return {}
    try:
        state = json.loads(file.read_text())
        streams, layout = state["streams"], state["layout"]
        valid = isinstance(streams, dict) and all(isinstance(slots, dict) for slots in streams.values())
        if not valid or set(layout) != {"processes", "workers"}:
            raise ValueError("unexpected layout")
        return {"layout": layout, "streams": {name: {int(slot): pos for slot, pos in slots.items()}
                                              for name, slots in streams.items()}}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(f"--resume {path}: {file.name} is not a data position file ({err}); "
                         f"{_RESUME_ADVICE}") from None


def stream_positions(data_state: dict, layout: dict) -> dict[str, dict]:
    """Stream -> {slot: position} for readers laid out as ``layout`` (processes x workers).

    Positions belong to slots, so they only carry over to the same layout. With another one every reader
    starts its sources at the earliest epoch any reader of the checkpoint was in (some samples of that
    epoch are read twice, none are skipped), with a warning.
    """
    if not data_state or data_state["layout"] == layout:
        return data_state.get("streams", {})
    saved = data_state["layout"]
    warnings.warn(f"resuming shard streams read by {saved['processes']} process(es) x {saved['workers']} "
                  f"worker(s) with {layout['processes']} x {layout['workers']}: reader positions cannot carry "
                  "over, each source restarts at the start of its earliest epoch in the checkpoint", stacklevel=2)
    slots = layout["processes"] * max(1, layout["workers"])
    positions = {}
    for name, saved_slots in data_state["streams"].items():
        per_source = zip(*(pos["sources"] for pos in saved_slots.values()))
        start = {"sources": [[min(epoch for epoch, _ in source), 0] for source in per_source], "draws": 0}
        positions[name] = {slot: start for slot in range(slots)}
    return positions


def save_checkpoint(accelerator, output: Path, step: int, train_state: dict, keep_last: int,
                    data_state: dict | None = None) -> Path | None:
    """Collective: every rank calls it. Returns the final path on the main process. ``data_state`` (shard
    stream positions, see `read_data_state`) is written beside the train state when it has streams."""
    root = checkpoint_dir(output)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    (tmp / STATE_FILE).write_text(json.dumps(train_state, indent=2))
    if data_state and data_state.get("streams"):
        (tmp / DATA_STATE_FILE).write_text(json.dumps(data_state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(output)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final
