"""Building timm models by name for mmfm: clear errors, local weight files, feature taps, fixed input sizes.

Used by the ``backbone`` vision tokenizer (``mmfm/tokenizers/vision.py``) and by ``SegmentationModel``;
importing this module registers mmfm's own timm models (biformer_*, hornet_*, p2at_*) through the package.
"""

import timm
import torch
from torch import nn

from mmfm.errors import ModelError


def require_timm_model(name: str, key: str = "model.backbone") -> None:
    """Raise a ModelError naming ``key`` when ``name`` is not a registered timm model."""
    if not timm.is_model(name):
        raise ModelError(f"{key}={name!r} is not a timm model; see timm.list_models() "
                         "(mmfm adds biformer_*, hornet_*, p2at_*)")


def create_timm_model(name: str, pretrained: bool = False, pretrained_file: str | None = None, **kwargs):
    """``timm.create_model`` with a clear error for unknown names; weights from a local file if given."""
    require_timm_model(name)
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    return timm.create_model(name, pretrained=pretrained or bool(pretrained_file), **kwargs)


def feature_taps(name: str, out_index: int, **timm_kwargs) -> list[int]:
    """Feature indices to take for stage ``out_index``: every branch tapped at that stage's module."""
    require_timm_model(name)
    with torch.device("meta"):
        info = timm.create_model(name, **timm_kwargs).feature_info
    if not -len(info) <= out_index < len(info):
        raise ModelError(f"out_index={out_index}: {name} has {len(info)} feature maps")
    module = info[out_index]["module"]
    return [i for i, entry in enumerate(info) if entry["module"] == module]


def fixed_input_size(model: nn.Module, input_size: int | None) -> tuple[int, int] | None:
    """The (H, W) a model insists on (``input_size`` if it was built for it), or None for any size."""
    cfg = model.pretrained_cfg
    if not cfg.get("fixed_input_size", False):
        return None
    return (input_size, input_size) if input_size else tuple(cfg["input_size"][-2:])
