"""Masked language modelling conditioned on the image/video (BERT masking, ALBEF distillation)."""

import torch
import torch.nn.functional as F

from mmfm.objectives.soft import soft_cross_entropy


@torch.no_grad()
def mask_tokens(ids: torch.Tensor, special_ids, mask_id: int, bpe_size: int, prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``prob`` of the real tokens; of those 80% -> [MASK], 10% random, 10% unchanged.

    Special tokens ([CLS], [SEP], [PAD], [MASK]) are never chosen. Returns (masked ids, labels) with
    labels = -100 where nothing is predicted.
    """
    def uniform():
        return torch.rand(ids.shape, generator=generator, device=ids.device)

    maskable = ~torch.isin(ids, torch.tensor(special_ids, device=ids.device))
    chosen = (uniform() < prob) & maskable
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    to_mask = chosen & (uniform() < 0.8)
    to_random = chosen & ~to_mask & (uniform() < 0.5)
    random_words = torch.randint(bpe_size, ids.shape, generator=generator, device=ids.device)
    masked = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    return torch.where(to_random, random_words, masked), labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, logits_m: torch.Tensor | None = None,
             alpha: float = 0.0) -> torch.Tensor:
    """CE at the masked positions, mixed with soft CE against the momentum model's distribution.

    ``logits`` (M, V) are already restricted to the M masked positions, ``labels`` (M,).
    """
    loss = F.cross_entropy(logits, labels)
    if alpha > 0 and logits_m is not None:
        soft = soft_cross_entropy(logits, F.softmax(logits_m, dim=1))
        loss = (1 - alpha) * loss + alpha * soft
    return loss
