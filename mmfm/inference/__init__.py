"""Inference: `Pipeline` (model + preprocessing), `Index` (searchable gallery), HTTP server, CLI.

Imported lazily (the `mmfm` console script loads `mmfm.inference.cli` for every command).
"""

from importlib import import_module

__all__ = ["Hit", "Index", "Pipeline", "load"]

_MODULES = {"Hit": "index", "Index": "index", "Pipeline": "pipeline", "load": "pipeline"}


def __getattr__(name: str):
    if name in _MODULES:
        value = getattr(import_module(f"mmfm.inference.{_MODULES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmfm.inference' has no attribute {name!r}")
