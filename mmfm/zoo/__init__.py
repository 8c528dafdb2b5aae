"""The mmfm model zoo: named, sha256-pinned checkpoints listed in `model_zoo/models.yaml`.

from mmfm import zoo
zoo.list_models()                          # names of the published checkpoints
zoo.list_models(task="vqa")                # those trained on a task of mmfm.tasks.list_tasks()
path = zoo.resolve("mmfm-small-shapes")    # local, verified file (downloaded once, then cached)
state_dict, metadata = zoo.load_state_dict(path)
info = zoo.read_info(path)                 # architecture, preprocessing, answers from the metadata
model = mmfm.create_model("mmfm-small-shapes")   # the model itself (mmfm.factory)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfm.models.io import load_state_dict, read_info
from mmfm.zoo.download import cache_path, clear_cache, fetch, is_offline, mmfm_home, verify_entry
from mmfm.zoo.manifest import ZooEntry, check_tasks, find_entry, load_manifest, manifest_path
from mmfm.zoo.publish import publish

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
    "read_info",
    "resolve",
    "verify_entry",
]


def list_models(task: str | None = None) -> list[str]:
    """Sorted names of the zoo's checkpoints; with `task`, only those trained on it.

    Architecture presets (untrained models) are `mmfm.list_models(pretrained=False)`.
    """
    entries = load_manifest()
    if task is not None:
        check_tasks([task], "list_models")
        entries = [e for e in entries if task in e.tasks]
    return sorted(e.name for e in entries)


def info(name: str, tag: str | None = None) -> dict[str, Any]:
    """The manifest entry of `name` as a dict, plus where its weights are (or would be) cached."""
    entry = find_entry(name, tag)
    return {**entry.to_dict(), "cache_path": str(cache_path(entry))}


def resolve(name: str, tag: str | None = None, *, quiet: bool = False, timeout: float | None = None) -> Path:
    """Local, verified path of the weights of zoo model `name` (picked by `tag` if given), downloading if needed."""
    return fetch(find_entry(name, tag), "weights", quiet=quiet, timeout=timeout)
