"""The one public factory: a model from an architecture name, a zoo name or a checkpoint path.

    mmfm.list_models(pretrained=False)             # architecture presets (mmfm/architectures)
    mmfm.list_models()                             # zoo checkpoints
    mmfm.create_model("mmfm-demo")                 # an untrained model of a preset
    mmfm.create_model("mmfm-small-shapes")         # a zoo checkpoint, downloaded and verified
    mmfm.create_model("runs/demo")                 # a run directory or a .safetensors file
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmfm.architectures import list_architectures
from mmfm.config import model_config
from mmfm.errors import ConfigError, ModelError
from mmfm.models.io import build_model, build_stored, load_model, load_weights, read_info


def list_models(pretrained: bool = True, task: str | None = None) -> list[str]:
    """Zoo checkpoint names (``pretrained=True``, those trained on ``task`` if given) or architecture
    presets (``pretrained=False``)."""
    if not pretrained:
        return list_architectures()
    from mmfm.zoo import list_models as zoo_models

    return zoo_models(task=task)


def create_model(name_or_path: str | Path, pretrained: bool | str | Path = True,
                 attention_backend: str = "auto", **arch_overrides) -> nn.Module:
    """A model by architecture name, zoo name or checkpoint path.

    Architecture presets build an untrained model (``arch_overrides`` change its fields; a tag string asks
    the zoo for the entry of that architecture carrying the tag). For zoo names,
    ``pretrained``: True = the zoo weights; a tag string = the entry carrying that tag; a path = these
    weights in the entry's architecture; False = the architecture, untrained. For a path, False gives an
    untrained model of the checkpoint's architecture.
    """
    name = str(name_or_path)
    if Path(name).exists():
        return _from_checkpoint(Path(name), pretrained, attention_backend)
    if _looks_like_path(name):
        raise ModelError(f"{name}: no such file or directory; pass a run directory, a .safetensors file, an "
                         "architecture (mmfm.list_models(pretrained=False)) or a zoo name (`mmfm zoo list`)")
    if name in list_architectures() and not isinstance(pretrained, str):
        return build_model(_arch({"arch": name, **arch_overrides}), attention_backend=attention_backend)
    return _from_zoo(name, pretrained, attention_backend)


def _from_checkpoint(path: Path, pretrained, attention_backend: str) -> nn.Module:
    if pretrained is not False:
        return load_model(path, attention_backend)
    from mmfm.models.io import checkpoint_file

    file = checkpoint_file(path)
    info = read_info(file)
    return build_stored(info.arch, file, info.answers, info.preprocess, attention_backend)


def _from_zoo(name: str, pretrained, attention_backend: str) -> nn.Module:
    from mmfm import zoo

    if pretrained is False or (isinstance(pretrained, (str, Path)) and Path(pretrained).exists()):
        entry = zoo.find_entry(name)
        where = f"zoo model {name!r}"
        if pretrained is False:
            return build_stored(entry.architecture, where, preprocess=entry.preprocessing,
                                attention_backend=attention_backend)
        return _weights_into(entry.architecture, where, Path(pretrained), attention_backend)
    tag = pretrained if isinstance(pretrained, str) else None
    return load_model(zoo.resolve(name, tag), attention_backend)


def _weights_into(arch: dict, where: str, path: Path, attention_backend: str) -> nn.Module:
    """Weights of a file (any answer lists it stores) in a zoo entry's architecture, strictly."""
    info = read_info(path)
    return load_weights(build_stored(arch, where, info.answers, info.preprocess, attention_backend), path)


def _arch(block: dict):
    try:
        return model_config(block, prefix="architecture ")
    except ConfigError as err:
        raise ModelError(str(err)) from None


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.endswith((".safetensors", ".pt", ".pth"))
