"""Semantic segmentation loss: per-pixel cross-entropy with ``ignore_index`` pixels left out."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``logits`` (B, C, h, w), upsampled to ``target`` (B, H, W) class ids when the sizes differ."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def pixel_accuracy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Fraction of labelled pixels whose arg-max class is right (logits at the target's size)."""
    labelled = target != ignore_index
    correct = (logits.argmax(1) == target) & labelled
    return correct.sum() / labelled.sum().clamp(min=1)
