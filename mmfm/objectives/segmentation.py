"""Semantic segmentation objective: per-pixel cross-entropy, ``ignore_index`` pixels left out.

``SegmentationObjective(model)(stream, batch)`` takes ``batch["image"]`` (B, 3, H, W) and
``batch["mask"]`` (B, H, W) class ids and returns ``{"loss", "pixel_acc"}``: the same interface as
``MultiTaskObjective``, so the one ``Trainer`` trains it.
"""

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255


class SegmentationObjective(nn.Module):
    def __init__(self, model: nn.Module, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.model = model
        self.ignore_index = ignore_index

    def forward(self, stream: str, batch: dict) -> dict:
        target = batch["mask"]
        logits = self.model(batch["image"])
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        return {"loss": loss, "pixel_acc": pixel_accuracy(logits.detach(), target, self.ignore_index)}


def pixel_accuracy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Fraction of labelled pixels whose arg-max class is right."""
    labelled = target != ignore_index
    correct = (logits.argmax(1) == target) & labelled
    return correct.sum() / labelled.sum().clamp(min=1)
