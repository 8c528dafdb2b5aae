"""Turn a trained run directory into a model-zoo entry.

A run directory holds `model.safetensors` (a format-2 checkpoint: architecture and preprocessing in
its metadata, `mmfm.models.io`), `metrics.json` and `config.yaml` (its `train.tasks`). `publish`
copies the weights to `<zoo_dir>/<name>.safetensors`, hashes them and adds (or, with
`overwrite=True`, replaces) the entry in `<zoo_dir>/models.yaml`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from mmfm.errors import ZooError
from mmfm.fileio import atomic_path
from mmfm.models.io import count_parameters, read_info
from mmfm.zoo.manifest import (
    NAME_PATTERN,
    FileSpec,
    ZooEntry,
    check_preprocessing,
    check_tasks,
    load_manifest,
    manifest_path,
    save_manifest,
)

WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "models.yaml"


def publish(
    run_dir: str | Path,
    name: str,
    zoo_dir: str | Path | None = None,
    *,
    description: str = "",
    license: str = "apache-2.0",
    tasks: list[str] | tuple[str, ...] | None = None,
    tags: list[str] | tuple[str, ...] = (),
    base_url: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Publish RUN_DIR as zoo entry `name`; returns the manifest entry (a dict) that was written.

    `zoo_dir` defaults to the folder of the manifest in use. `tasks` (the tasks it was trained on)
    default to the task streams of the run config's `train.tasks`. The architecture and preprocessing
    come from the checkpoint's metadata. With `base_url`, `<base_url>/<name>.safetensors` is listed
    as the first source, before the local `file:` copy.
    """
    run_dir = Path(run_dir)
    zoo_dir = Path(zoo_dir) if zoo_dir is not None else manifest_path().parent
    _check_name(name)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ZooError(
            f"cannot publish {run_dir}: {weights} is missing (train first, or pass the run directory)"
        )
    info = read_info(weights)
    metrics = _read_metrics(run_dir / METRICS_FILE)
    label = f"cannot publish {run_dir}"
    tasks = check_tasks(tasks or _run_tasks(run_dir / CONFIG_FILE), label)
    preprocessing = check_preprocessing(info.preprocess, f"{label}: {weights.name}")
    zoo_dir.mkdir(parents=True, exist_ok=True)
    manifest = zoo_dir / MANIFEST_FILE
    with FileLock(str(manifest) + ".lock"):
        entries = load_manifest(manifest) if manifest.exists() else []
        _check_overwrite(name, entries, zoo_dir, overwrite)
        sha256, size = _copy_atomic(weights, zoo_dir / f"{name}.safetensors")
        entry = ZooEntry(
            name=name,
            description=description or f"{name}, published from {run_dir.name}",
            tasks=tasks,
            architecture=info.arch,
            files={"weights": FileSpec("weights", _sources(name, base_url), sha256, size)},
            license=license,
            metrics=metrics,
            preprocessing=preprocessing,
            tags=tuple(tags),
            params=count_parameters(weights),
            manifest_dir=zoo_dir.resolve(),
        )
        save_manifest([e for e in entries if e.name != name] + [entry], manifest)
    return entry.to_dict()


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ZooError(
            f"zoo name {name!r} may only use letters, digits, '.', '_' and '-' (and not start with . _ -)"
        )


def _check_overwrite(name: str, entries: list[ZooEntry], zoo_dir: Path, overwrite: bool) -> None:
    exists = any(e.name == name for e in entries) or (zoo_dir / f"{name}.safetensors").exists()
    if exists and not overwrite:
        raise ZooError(
            f"zoo entry {name!r} already exists in {zoo_dir}; pick another name or pass --overwrite"
        )


def _read_metrics(path: Path) -> dict[str, float]:
    """Numeric metrics from metrics.json, nested dicts flattened to dotted names."""
    if not path.is_file():
        raise ZooError(
            f"cannot publish: {path} is missing; evaluate the run first so the zoo can report its numbers"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ZooError(f"cannot publish: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ZooError(f"cannot publish: {path} must hold a JSON object of metric names to numbers")
    return _flatten_numbers(data)


def _flatten_numbers(data: dict, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def _run_tasks(path: Path) -> list[str]:
    """The task streams of the run config's `train.tasks` (a mapping to weights, or a list)."""
    config = _read_run_config(path)
    train = config.get("train")
    tasks = train.get("tasks") if isinstance(train, dict) else None
    if not isinstance(tasks, (dict, list)) or not tasks:
        raise ZooError(
            f"cannot publish: {path} names no train.tasks; pass the tasks it was trained on (--task NAME)"
        )
    return list(tasks)


def _read_run_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ZooError(f"cannot publish: {path} is not valid YAML ({err})") from err
    return config if isinstance(config, dict) else {}


def _sources(name: str, base_url: str | None) -> tuple[str, ...]:
    local = f"file:{name}.safetensors"
    return (f"{base_url.rstrip('/')}/{name}.safetensors", local) if base_url else (local,)


def _copy_atomic(src: Path, dst: Path) -> tuple[str, int]:
    """Copy src to dst atomically; returns (sha256, size) of the bytes copied."""
    digest = hashlib.sha256()
    with atomic_path(dst) as tmp:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            for chunk in iter(lambda: fin.read(1 << 20), b""):
                digest.update(chunk)
                fout.write(chunk)
        shutil.copystat(src, tmp)
    return digest.hexdigest(), dst.stat().st_size
