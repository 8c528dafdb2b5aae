"""VQA as classification over the answer list (ViLT): BCE on VQAv2 soft scores; multiple choice by ITM."""

import torch
import torch.nn.functional as F

from mmfm.models.trunk import TokenBatch


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE against soft scores, scaled by the number of answers as ViLT does."""
    return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]


def multiple_choice_scores(model, options: TokenBatch, vision: TokenBatch, num_options: int) -> torch.Tensor:
    """(B, K) match scores of K [question ; option] texts per clip; ``options`` is (B*K, L) row-major."""
    repeat = torch.arange(vision.x.shape[0], device=vision.x.device).repeat_interleave(num_options)
    mask = None if vision.mask is None else vision.mask[repeat]
    logits = model.itm_logits(options, TokenBatch(vision.x[repeat], mask, vision.roll))
    return (logits[:, 1] - logits[:, 0]).view(-1, num_options)


def multiple_choice_loss(scores: torch.Tensor, answer_index: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(scores, answer_index)
