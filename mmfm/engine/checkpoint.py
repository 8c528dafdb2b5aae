"""Run checkpoints: atomic directories written with accelerate's ``save_state``, the last K kept.

Layout: ``OUTPUT/checkpoints/step_00000500/`` (model/optimizer/scheduler/RNG state from accelerate, plus
``train_state.json``). A checkpoint is written to a temporary directory and renamed into place, so a run
killed mid-save leaves the previous checkpoint intact and no half-written one.
"""

import json
import os
import shutil
from pathlib import Path

from mmfm.errors import ConfigError

STATE_FILE = "train_state.json"


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
    return json.loads((path / STATE_FILE).read_text())


def save_checkpoint(accelerator, output: Path, step: int, train_state: dict, keep_last: int) -> Path | None:
    """Collective: every rank calls it. Returns the final path on the main process."""
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
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(output)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final
