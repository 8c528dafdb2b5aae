"""mmfm: vision-video-language foundation models — one unified trunk, a model zoo, retrieval and VQA.

    import mmfm
    mmfm.list_models(pretrained=False)              # architecture presets
    mmfm.list_models()                              # zoo checkpoints
    model = mmfm.create_model("mmfm-demo")          # an MMFM (nn.Module), untrained
    pipe = mmfm.load("runs/demo")                   # model + preprocessing on the best device
    index = pipe.index(images=paths)                # an mmfm.Index
    index.search(text="a red circle", k=10, rerank=16)
    mmfm.list_tasks(), mmfm.list_vision_tokenizers()  # the two units of change

torch-heavy modules are imported on first use, so `import mmfm` stays light.
"""

from importlib import import_module

__all__ = ["Index", "Pipeline", "create_model", "list_models", "list_tasks", "list_vision_tokenizers", "load"]

_LAZY = {
    "Index": "mmfm.inference.index",
    "Pipeline": "mmfm.inference.pipeline",
    "create_model": "mmfm.factory",
    "list_models": "mmfm.factory",
    "list_tasks": "mmfm.tasks",
    "list_vision_tokenizers": "mmfm.tokenizers.vision",
    "load": "mmfm.inference.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmfm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
