"""Turn a trained run directory into a model-zoo entry.

A run directory holds `model.safetensors` (a format-2 checkpoint: architecture and preprocessing in
its metadata, `mmfm.models.io`), `metrics.json` and `config.yaml` (its `train.tasks`). `publish`
writes the weights to `<zoo_dir>/weights/<name>.safetensors` (a byte copy, or with `half=True` a
float16 copy with the same metadata), refuses files over `max_size_mb` (they are committed to the
repository), hashes them and adds (or, with `overwrite=True`, replaces) the entry in
`<zoo_dir>/models.yaml`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from safetensors import safe_open

from mmfm.errors import ZooError
from mmfm.fileio import atomic_path
from mmfm.models.io import count_parameters, load_state_dict, read_info
from mmfm.zoo.download import sha256_file
from mmfm.zoo.manifest import (
    NAME_PATTERN,
    FileSpec,
    ZooEntry,
    check_preprocessing,
    check_tasks,
    check_training,
    load_manifest,
    manifest_path,
    save_manifest,
)

WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "models.yaml"
WEIGHTS_DIR = "weights"  # inside the zoo folder, next to models.yaml
MAX_SIZE_MB = 25.0  # a committed file; GitHub warns from 50 MB and refuses 100 MB
MB = 10**6
SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32"}  # the float dtypes a zoo entry may declare
INTEGER_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}  # kept as they are by --half


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
    hf_repo: str | None = None,
    half: bool = False,
    max_size_mb: float = MAX_SIZE_MB,
    train_command: str | None = None,
    budget: str | None = None,
    hardware: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Publish RUN_DIR as zoo entry `name`; returns the manifest entry (a dict) that was written.

    `zoo_dir` defaults to the folder of the manifest in use. `tasks` (the tasks it was trained on)
    default to the task streams of the run config's `train.tasks`. The architecture and preprocessing
    come from the checkpoint's metadata. The sources are `<base_url>/<name>.safetensors` (when given),
    then the local `file:weights/<name>.safetensors`, then `hf-hub:<hf_repo>/<name>.safetensors` (when
    given). `half` stores floating-point tensors as float16. `train_command` defaults to
    `python tools/train.py --config RUN_DIR/config.yaml` when the run has a config.yaml.
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
    sources = _sources(name, base_url, hf_repo)
    training = check_training(_training(run_dir, train_command, budget, hardware), label)
    dtype = "float16" if half else _float_dtype(weights)
    manifest = zoo_dir / MANIFEST_FILE
    target = zoo_dir / WEIGHTS_DIR / f"{name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(manifest) + ".lock"):
        entries = load_manifest(manifest) if manifest.exists() else []
        _check_overwrite(name, entries, zoo_dir, target, overwrite)
        sha256, size = _write_weights(weights, target, half, max_size_mb)
        entry = ZooEntry(
            name=name,
            description=description or f"{name}, published from {run_dir.name}",
            tasks=tasks,
            architecture=info.arch,
            files={"weights": FileSpec("weights", sources, sha256, size)},
            license=license,
            metrics=metrics,
            preprocessing=preprocessing,
            tags=tuple(tags),
            params=count_parameters(target),
            dtype=dtype,
            training=training,
            manifest_dir=zoo_dir.resolve(),
        )
        save_manifest([e for e in entries if e.name != name] + [entry], manifest)
    return entry.to_dict()


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ZooError(
            f"zoo name {name!r} may only use letters, digits, '.', '_' and '-' (and not start with . _ -)"
        )


def _check_overwrite(
    name: str, entries: list[ZooEntry], zoo_dir: Path, target: Path, overwrite: bool
) -> None:
    exists = any(e.name == name for e in entries) or target.exists()
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


def _training(run_dir: Path, command: str | None, budget: str | None, hardware: str | None) -> dict[str, str]:
    """The entry's `training` block: the given values, the command defaulting to the run's config.yaml."""
    config = run_dir / CONFIG_FILE
    if command is None and config.is_file():
        command = f"python tools/train.py --config {config.as_posix()}"
    given = {"command": command, "budget": budget, "hardware": hardware}
    return {key: value for key, value in given.items() if value is not None}


def _sources(name: str, base_url: str | None, hf_repo: str | None) -> tuple[str, ...]:
    filename = f"{name}.safetensors"
    sources = [f"{base_url.rstrip('/')}/{filename}"] if base_url else []
    sources.append(f"file:{WEIGHTS_DIR}/{filename}")
    if hf_repo is not None:
        if hf_repo.count("/") != 1 or not all(hf_repo.split("/")):
            raise ZooError(f"--hf-repo {hf_repo!r} must look like ORG/REPO (a Hugging Face Hub repository)")
        sources.append(f"hf-hub:{hf_repo}/{filename}")
    return tuple(sources)


def _write_weights(src: Path, dst: Path, half: bool, max_size_mb: float) -> tuple[str, int]:
    """Write src (as float16 when `half`) to dst atomically; returns (sha256, size) of what was written.

    A file over `max_size_mb` is refused before it replaces dst (an earlier file there stays)."""
    with atomic_path(dst) as tmp:
        if half:
            _save_half(src, tmp)
        else:
            shutil.copyfile(src, tmp)
        size = tmp.stat().st_size
        if size > max_size_mb * MB:
            raise ZooError(
                f"cannot publish {src}: {dst} would be {size / MB:.1f} MB ({size} bytes), over the "
                f"{max_size_mb:g} MB limit (--max-size-mb) for a file committed to the repository; "
                "store it as float16 with --half, or raise --max-size-mb"
            )
        sha256 = sha256_file(tmp)
    return sha256, size


def _save_half(src: Path, dst: Path) -> None:
    """src's tensors with floating-point ones cast to float16 (integers, bools unchanged), same metadata."""
    from safetensors.torch import save_file

    state_dict, metadata = load_state_dict(src)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    save_file(half, str(dst), metadata=metadata)


def _float_dtype(path: Path) -> str:
    """`float16` or `float32`: the one dtype of the file's floating-point tensors (read from its header)."""
    with safe_open(str(path), framework="pt") as handle:
        keys = handle.keys()  # a safe_open handle is not iterable
        floats = {handle.get_slice(key).get_dtype() for key in keys} - INTEGER_DTYPES
    if len(floats) != 1 or not floats <= SAFETENSORS_DTYPES.keys():
        raise ZooError(
            f"cannot publish {path}: its floating-point tensors are {sorted(floats) or 'none'}; a zoo entry "
            "holds all-float32 or all-float16 weights (--half casts them all to float16)"
        )
    return SAFETENSORS_DTYPES[floats.pop()]
