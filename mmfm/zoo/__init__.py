"""The mmfm model zoo: named, sha256-pinned checkpoints listed in `model_zoo/models.yaml`.

from mmfm import zoo
zoo.list_models()                          # names of the published checkpoints
path = zoo.resolve("mmfm-small-shapes")    # local, verified file (downloaded once, then cached)
state_dict, metadata = zoo.load_state_dict(path)
config = zoo.read_config(path)             # the architecture dict from the file's metadata
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfm.zoo.download import cache_path, clear_cache, fetch, is_offline, mmfm_home, verify_entry
from mmfm.zoo.manifest import ZooEntry, find_entry, load_manifest, manifest_path
from mmfm.zoo.publish import publish
from mmfm.zoo.weights import load_state_dict, read_config

__all__ = [
    "ZooEntry",
    "cache_path",
    "clear_cache",
    "info",
    "is_offline",
    "list_models",
    "load_manifest",
    "load_state_dict",
    "manifest_path",
    "mmfm_home",
    "publish",
    "read_config",
    "resolve",
    "verify_entry",
]


def list_models(pretrained: bool = True, task: str | None = None) -> list[str]:
    """Sorted names of the zoo's checkpoints (`pretrained=True`) or of the architectures they use.

    With `pretrained=False` an entry contributes its architecture's `name` (or its own name when the
    architecture has none). `task` keeps only entries of that task.
    """
    entries = [e for e in load_manifest() if task is None or e.task == task]
    if pretrained:
        return sorted(e.name for e in entries)
    return sorted({e.architecture.get("name", e.name) for e in entries})


def info(name: str, tag: str | None = None) -> dict[str, Any]:
    """The manifest entry of `name` as a dict, plus where its weights are (or would be) cached."""
    entry = find_entry(name, tag)
    return {**entry.to_dict(), "cache_path": str(cache_path(entry))}


def resolve(name: str, tag: str | None = None, *, quiet: bool = False, timeout: float | None = None) -> Path:
    """Local, verified path of the weights of zoo model `name` (picked by `tag` if given), downloading if needed."""
    return fetch(find_entry(name, tag), "weights", quiet=quiet, timeout=timeout)
