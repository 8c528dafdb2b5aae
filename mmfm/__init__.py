"""mmfm: vision-video-language foundation models — one unified trunk, a model zoo, retrieval and VQA.

    import mmfm
    mmfm.list_models()                              # zoo checkpoints
    model = mmfm.create_model("mmfm-small-shapes")  # an MMFM (nn.Module)
    pipe = mmfm.load("runs/demo")                   # model + preprocessing on the best device
    index = pipe.index(images=paths)                # an mmfm.Index
    index.search(text="a red circle", k=10, rerank=16)

torch-heavy modules are imported on first use, so `import mmfm` stays light.
"""

from importlib import import_module

__all__ = ["Index", "Pipeline", "create_model", "list_models", "load"]

_LAZY = {
    "Index": "mmfm.inference.index",
    "Pipeline": "mmfm.inference.pipeline",
    "create_model": "mmfm.inference.pipeline",
    "load": "mmfm.inference.pipeline",
}


def list_models(pretrained: bool = True, task: str | None = None) -> list[str]:
    """Names of the zoo's checkpoints (``pretrained=True``) or of their architectures."""
    from mmfm.zoo import list_models as zoo_list_models

    return zoo_list_models(pretrained, task)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmfm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
