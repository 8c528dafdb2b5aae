"""Named architectures as data (open_clip's ``model_configs`` habit): one YAML file per preset.

    mmfm.list_models(pretrained=False)   # the preset names
    mmfm.create_model("mmfm-demo")       # an untrained model of that architecture

A preset holds the keys of a ``model`` config block (``mmfm.config.ModelConfig`` or, with
``family: segmentation``, ``SegmentationModelConfig``). A run config names one with ``model.arch`` and may
override any of its keys. Adding an architecture is adding a file here.
"""

import difflib
from pathlib import Path

import yaml

from mmfm.errors import ConfigError

ARCH_DIR = Path(__file__).parent


def list_architectures() -> list[str]:
    return sorted(path.stem for path in ARCH_DIR.glob("*.yaml"))


def architecture(name: str) -> dict:
    """The model-block keys of preset ``name`` (its ``arch`` included)."""
    path = ARCH_DIR / f"{name}.yaml"
    if not path.is_file():
        names = list_architectures()
        match = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ConfigError(f"model.arch={name!r} is not an architecture{hint}; presets: {', '.join(names)}")
    block = yaml.safe_load(path.read_text()) or {}
    if not isinstance(block, dict):
        raise ConfigError(f"architecture file {path} must hold a mapping of model keys")
    return {**block, "arch": name}
