"""Cross-entropy against a target distribution (soft labels), shared by ITC, MLM distillation and word targets."""

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits))."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
