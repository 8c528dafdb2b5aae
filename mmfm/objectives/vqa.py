"""VQA as classification over the answer list (ViLT): BCE on VQAv2 soft scores."""

import torch
import torch.nn.functional as F


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE against soft scores, scaled by the number of answers as ViLT does."""
    return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
