"""The model-zoo manifest: `model_zoo/models.yaml`, a list of named, hash-pinned checkpoints.

Each entry names one checkpoint, the tasks and architecture it was trained with, where its files
can be fetched from (several mirrors, tried in order) and the sha256/size that every copy must match.
`MMFM_ZOO_MANIFEST=FILE` points mmfm at another manifest (a private zoo, a test fixture).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmfm.errors import ZooError
from mmfm.fileio import atomic_write_text

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "model_zoo" / "models.yaml"
MANIFEST_ENV = "MMFM_ZOO_MANIFEST"

REQUIRED_KEYS = (
    "name",
    "description",
    "tasks",
    "architecture",
    "files",
    "license",
    "metrics",
    "preprocessing",
)
OPTIONAL_KEYS = ("tags", "params", "dtype", "training")
TRAINING_KEYS = ("command", "budget", "hardware")  # how the checkpoint was made, all strings
DTYPES = ("float16", "float32")  # the dtype of the weights' floating-point tensors
FILE_KEYS = ("sources", "sha256", "size")
PREPROCESSING_KEYS = ("image_size", "mean", "std", "num_frames")  # a checkpoint's mmfm_preprocess
SOURCE_SCHEMES = ("https://", "http://", "hf-hub:", "file:")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

MANIFEST_HEADER = """\
# mmfm model zoo manifest: a YAML list, one entry per named checkpoint.
# Regenerate model_zoo/README.md after editing: python tools/make_zoo_readme.py
# Add entries with `mmfm zoo publish RUN_DIR --name NAME [--half]`: it writes weights/NAME.safetensors
# and fills hashes, sizes, metrics, dtype and training.
#
# - name: mmfm-small-shapes          # unique; letters, digits, . _ -
#   description: what it is, what it was trained on
#   tasks: [image_text, video_text]   # trained on; names of mmfm.tasks.list_tasks()
#   architecture: {arch: mmfm-small, family: mmfm, ...}   # the checkpoint's mmfm_arch metadata
#   files:
#     weights:                        # one safetensors file (format 2): metadata mmfm_arch,
#                                     # mmfm_preprocess, mmfm_answers, mmfm_format
#       sources:                      # tried in order until one gives the right bytes
#         - https://example.org/mmfm-small-shapes.safetensors
#         - file:weights/mmfm-small-shapes.safetensors   # relative to this file's folder, inside it
#         - hf-hub:org/repo/mmfm-small-shapes.safetensors
#       sha256: <64 hex digits>
#       size: <bytes>
#   license: apache-2.0
#   metrics: {txt_r1: 0.0, img_r1: 0.0}        # names as in docs (txt_r1, vqa_acc, miou, ...)
#   preprocessing: {image_size: 224, mean: [...], std: [...], num_frames: 8}   # its mmfm_preprocess
#   tags: [shapes]                    # optional; create_model(NAME, pretrained="shapes") picks by tag
#   params: 12345678                  # optional; parameter count, shown in the README
#   dtype: float16                    # optional; float16 or float32 (publish --half stores float16)
#   training:                         # optional; how it was made, all strings, shown in the README
#     command: python tools/train.py --config runs/zoo_s/config.yaml
#     budget: 20 min                  # steps / time it took
#     hardware: 2 CPU cores
"""


@dataclass(frozen=True)
class FileSpec:
    """One file of an entry: its mirrors and the hash/size every copy must match."""

    role: str
    sources: tuple[str, ...]
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        """The cached file's name: the last path component of the first source."""
        return source_basename(self.sources[0]) or self.role


@dataclass(frozen=True)
class ZooEntry:
    """One named checkpoint of the manifest."""

    name: str
    description: str
    tasks: tuple[str, ...]
    architecture: dict[str, Any]
    files: dict[str, FileSpec]
    license: str
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    tags: tuple[str, ...] = ()
    params: int | None = None
    dtype: str | None = None
    training: dict[str, str] = field(default_factory=dict)
    manifest_dir: Path = field(default=DEFAULT_MANIFEST.parent, compare=False)

    @property
    def weights(self) -> FileSpec:
        """The entry's weights file."""
        return self.files["weights"]

    def to_dict(self) -> dict[str, Any]:
        """The entry as it is written to the manifest (keys in schema order)."""
        data = {
            "name": self.name,
            "description": self.description,
            "tasks": list(self.tasks),
            "architecture": self.architecture,
            "files": {
                role: {"sources": list(spec.sources), "sha256": spec.sha256, "size": spec.size}
                for role, spec in self.files.items()
            },
            "license": self.license,
            "metrics": self.metrics,
            "preprocessing": self.preprocessing,
        }
        if self.tags:
            data["tags"] = list(self.tags)
        if self.params is not None:
            data["params"] = self.params
        if self.dtype is not None:
            data["dtype"] = self.dtype
        if self.training:
            data["training"] = dict(self.training)
        return data


def source_basename(source: str) -> str:
    """The file name a source points at (`https://h/a/b.safetensors` -> `b.safetensors`)."""
    return source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].split(":", 1)[-1]


def manifest_path() -> Path:
    """The manifest in use: `$MMFM_ZOO_MANIFEST` or the repository's `model_zoo/models.yaml`."""
    override = os.environ.get(MANIFEST_ENV)
    return Path(override).expanduser() if override else DEFAULT_MANIFEST


def load_manifest(path: str | Path | None = None) -> list[ZooEntry]:
    """Read and validate a manifest; any schema problem is a ZooError naming the entry and key."""
    path = Path(path) if path is not None else manifest_path()
    if not path.is_file():
        raise ZooError(
            f"model-zoo manifest {path} not found; check {MANIFEST_ENV} or create it (a YAML list)"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ZooError(f"model-zoo manifest {path} is not valid YAML: {err}") from err
    raw = [] if raw is None else raw
    if not isinstance(raw, list):
        raise ZooError(f"model-zoo manifest {path} must be a YAML list of entries, got {type(raw).__name__}")
    entries = [_parse_entry(item, index, path) for index, item in enumerate(raw)]
    _check_unique_names(entries, path)
    return entries


def save_manifest(entries: list[ZooEntry], path: str | Path) -> None:
    """Write entries to `path` atomically, keeping the file's leading comment block (or the schema header)."""
    path = Path(path)
    header = _leading_comments(path)
    if not header or header.startswith(MANIFEST_HEADER.splitlines()[0]):  # our schema header: keep it current
        header = MANIFEST_HEADER
    body = yaml.safe_dump([entry.to_dict() for entry in entries], sort_keys=False, default_flow_style=False)
    atomic_write_text(path, header + body)


def find_entry(name: str, tag: str | None = None, entries: list[ZooEntry] | None = None) -> ZooEntry:
    """The entry called `name`; with `tag`, the entry carrying that tag whose name or architecture `arch`
    (preset) is `name`."""
    entries = load_manifest() if entries is None else entries
    if tag is None:
        for entry in entries:
            if entry.name == name:
                return entry
        raise ZooError(_unknown_name_message(name, entries))
    family = [e for e in entries if name in (e.name, e.architecture.get("arch"))]
    if not family:
        raise ZooError(_unknown_name_message(name, entries))
    tagged = [e for e in family if tag in e.tags]
    if len(tagged) == 1:
        return tagged[0]
    known = sorted({t for e in family for t in e.tags})
    if not tagged:
        raise ZooError(f"model {name!r} has no zoo entry tagged {tag!r}; tags available: {known or 'none'}")
    raise ZooError(
        f"tag {tag!r} is ambiguous for {name!r}: {[e.name for e in tagged]}; pass one of these names"
    )


def _unknown_name_message(name: str, entries: list[ZooEntry]) -> str:
    names = [entry.name for entry in entries]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "run `mmfm zoo list` to see the available names"
    return f"unknown model {name!r} in the model zoo ({manifest_path()}); {hint}"


def _parse_entry(item: Any, index: int, path: Path) -> ZooEntry:
    if not isinstance(item, dict):
        raise ZooError(f"{path}: entry #{index} must be a mapping, got {type(item).__name__}")
    label = f"{path}: entry #{index} ({item.get('name', '?')})"
    _check_keys(item, REQUIRED_KEYS, OPTIONAL_KEYS, label)
    name = _expect(item, "name", str, label)
    if not NAME_PATTERN.match(name):
        raise ZooError(f"{label}: name {name!r} may only use letters, digits, '.', '_' and '-'")
    tasks = check_tasks(_expect(item, "tasks", list, label), label)
    files = _expect(item, "files", dict, label)
    if "weights" not in files:
        raise ZooError(f"{label}: key 'files' needs a 'weights' file")
    preprocessing = check_preprocessing(_expect(item, "preprocessing", dict, label), label)
    tags = item.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ZooError(f"{label}: key 'tags' must be a list of strings")
    params = item.get("params")
    if params is not None and not isinstance(params, int):
        raise ZooError(f"{label}: key 'params' must be an integer")
    dtype = item.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ZooError(f"{label}: key 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return ZooEntry(
        name=name,
        description=_expect(item, "description", str, label),
        tasks=tasks,
        architecture=_expect(item, "architecture", dict, label),
        files={role: _parse_file(role, spec, label) for role, spec in files.items()},
        license=_expect(item, "license", str, label),
        metrics=_expect(item, "metrics", dict, label),
        preprocessing=preprocessing,
        tags=tuple(tags),
        params=params,
        dtype=dtype,
        training=check_training(item.get("training", {}), label),
        manifest_dir=path.resolve().parent,
    )


def check_tasks(tasks: list[str] | tuple[str, ...], label: str) -> tuple[str, ...]:
    """`tasks` as a tuple, once each is known to be a task of `mmfm.tasks.list_tasks()`."""
    if not tasks or not all(isinstance(task, str) for task in tasks):
        raise ZooError(f"{label}: key 'tasks' must be a non-empty list of task names")
    from mmfm.tasks import list_tasks  # imports torch: only paid when there is an entry to check

    valid = list_tasks()
    for task in tasks:
        if task not in valid:
            raise ZooError(f"{label}: task {task!r} is not a task; use one of {', '.join(valid)}")
    return tuple(tasks)


def check_preprocessing(preprocessing: dict[str, Any], label: str) -> dict[str, Any]:
    """`preprocessing`, once its keys are known to be among PREPROCESSING_KEYS."""
    _check_keys(preprocessing, (), PREPROCESSING_KEYS, f"{label} preprocessing")
    return preprocessing


def check_training(training: Any, label: str) -> dict[str, str]:
    """`training`, once it is known to map keys of TRAINING_KEYS to strings."""
    if not isinstance(training, dict):
        raise ZooError(f"{label}: key 'training' must be a mapping with keys {', '.join(TRAINING_KEYS)}")
    _check_keys(training, (), TRAINING_KEYS, f"{label} training")
    for key, value in training.items():
        if not isinstance(value, str):
            raise ZooError(f"{label}: key 'training.{key}' must be a string, got {type(value).__name__}")
    return training


def _parse_file(role: str, spec: Any, label: str) -> FileSpec:
    label = f"{label} files.{role}"
    if not isinstance(spec, dict):
        raise ZooError(f"{label}: must be a mapping with keys {', '.join(FILE_KEYS)}")
    _check_keys(spec, FILE_KEYS, (), label)
    sources = _expect(spec, "sources", list, label)
    if not sources:
        raise ZooError(f"{label}: key 'sources' is empty; list at least one URL, hf-hub: or file: source")
    for source in sources:
        if not isinstance(source, str) or not source.startswith(SOURCE_SCHEMES):
            raise ZooError(f"{label}: source {source!r} must start with one of {', '.join(SOURCE_SCHEMES)}")
    sha256 = str(_expect(spec, "sha256", str, label)).lower()
    if not SHA256_PATTERN.match(sha256):
        raise ZooError(f"{label}: key 'sha256' must be 64 hex digits, got {sha256!r}")
    size = _expect(spec, "size", int, label)
    if size <= 0:
        raise ZooError(f"{label}: key 'size' must be a positive byte count, got {size}")
    return FileSpec(role=role, sources=tuple(sources), sha256=sha256, size=size)


def _check_keys(item: dict, required: tuple[str, ...], optional: tuple[str, ...], label: str) -> None:
    missing = [key for key in required if key not in item]
    if missing:
        raise ZooError(f"{label}: missing key {missing[0]!r} (required: {', '.join(required)})")
    unknown = [key for key in item if key not in required + optional]
    if unknown:
        allowed = ", ".join(required + optional)
        raise ZooError(f"{label}: unknown key {unknown[0]!r} (allowed: {allowed})")


def _expect(item: dict, key: str, kind: type, label: str) -> Any:
    value = item[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ZooError(f"{label}: key {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _check_unique_names(entries: list[ZooEntry], path: Path) -> None:
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise ZooError(f"{path}: name {entry.name!r} appears twice; entry names must be unique")
        seen.add(entry.name)


def _leading_comments(path: Path) -> str:
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    return "".join(header)
