"""SegmentationModel: a timm dense-prediction model (P2AT) for ``task: segmentation``.

The model's forward gives (B, classes, h, w) logits; they are resized to the input size here, so the loss
and the metrics always compare full-resolution maps. ``arch_dict`` is what a checkpoint stores to rebuild it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.backbones.timm_models import create_timm_model
from mmfm.errors import ModelError


class SegmentationModel(nn.Module):
    """A timm segmentation model ``backbone`` with ``num_classes`` outputs (classes including background)."""

    def __init__(self, backbone: str, num_classes: int, backbone_kwargs: dict | None = None,
                 preprocess: dict | None = None):
        super().__init__()
        self.preprocess = dict(preprocess or {})
        self.answers: dict[str, list[str]] = {}
        if not backbone or num_classes < 1:
            raise ModelError("task: segmentation needs model.backbone (a timm segmentation model such as "
                             "p2at_small) and model.num_classes (classes including background)")
        self.backbone, self.num_classes = backbone, num_classes
        self.backbone_kwargs = dict(backbone_kwargs or {})
        kwargs = dict(self.backbone_kwargs)
        self.net = create_timm_model(backbone, kwargs.pop("pretrained", False), kwargs.pop("pretrained_file", None),
                                     num_classes=num_classes, **kwargs)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes, H, W)."""
        logits = self.net(pixels)
        if logits.dim() != 4:
            raise ModelError(f"model.backbone={self.backbone!r} gives {tuple(logits.shape)} logits, "
                             "not a dense (B, classes, H, W) map; use a segmentation model such as p2at_small")
        if logits.shape[-2:] != pixels.shape[-2:]:
            logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def arch_dict(self) -> dict:
        return {"family": "segmentation", "backbone": self.backbone, "backbone_kwargs": dict(self.backbone_kwargs),
                "num_classes": self.num_classes}
