"""Image/video-text contrastive loss (ALBEF ITC) with a momentum feature queue and soft targets.

Online features are compared with [momentum batch ; queue]; targets are the identity (ALBEF pretraining,
`diagonal_targets`) or the same-id positives (ALBEF retrieval fine-tuning, `positive_targets`),
mixed with the momentum model's own similarity distribution by ``alpha`` (momentum distillation).
With alpha = 0, no queue, and keys = the online features, this is CLIP's symmetric InfoNCE.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.objectives.soft import soft_cross_entropy


class FeatureQueue(nn.Module):
    """A ring buffer of (vision, text, id) momentum features of any size (no divisibility assumption)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        # An empty queue stays out of checkpoints: accelerate's safetensors save takes its zero-size buffers
        # for tensors sharing storage and drops them, and the strict load on resume then misses them.
        persistent = size > 0
        self.register_buffer("vision", torch.zeros(size, dim), persistent=persistent)
        self.register_buffer("text", torch.zeros(size, dim), persistent=persistent)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long), persistent=persistent)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long), persistent=persistent)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long), persistent=persistent)

    @torch.no_grad()
    def enqueue(self, vision: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        if self.size == 0:
            return
        vision, text, ids = vision[-self.size:], text[-self.size:], ids[-self.size:]
        slots = (self.ptr + torch.arange(len(ids), device=ids.device)) % self.size
        self.vision[slots] = vision.to(self.vision.dtype)
        self.text[slots] = text.to(self.text.dtype)
        self.ids[slots] = ids
        self.ptr.copy_((self.ptr + len(ids)) % self.size)
        self.filled.copy_(torch.clamp(self.filled + len(ids), max=self.size))

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = int(self.filled)
        return self.vision[:n], self.text[:n], self.ids[:n]


def positive_targets(query_ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """Row-normalised (B, K) target: 1 where the key shares the query's id, queue keys included.

    ALBEF's retrieval fine-tuning targets (``idx`` vs [batch ids ; queue ids]): every caption of an image
    is a positive of it.
    """
    positives = (query_ids[:, None] == key_ids[None, :]).float()
    return positives / positives.sum(1, keepdim=True)


def diagonal_targets(batch_size: int, queue_size: int, device=None) -> torch.Tensor:
    """(B, B + Q) target over keys [momentum batch ; queue]: the identity on the batch, zero on the queue.

    ALBEF's pretraining targets (``sim_targets.fill_diagonal_(1)``): only a query's own pair is a
    positive, even when another pair or a queued key shows the same image.
    """
    return F.pad(torch.eye(batch_size, device=device), (0, queue_size))


def itc_loss(
    vision: torch.Tensor,
    text: torch.Tensor,
    vision_keys: torch.Tensor,
    text_keys: torch.Tensor,
    temp: torch.Tensor,
    targets: torch.Tensor,
    vision_m: torch.Tensor | None = None,
    text_m: torch.Tensor | None = None,
    alpha: float = 0.0,
    text_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric contrastive loss. ``*_keys`` are [momentum batch ; queue]; ``*_m`` the momentum queries.

    ``text_negatives`` (N, D) are texts that match no image (NegCLIP's re-bound captions): extra columns of
    the vision->text softmax that get no target mass.
    """
    sim_v2t = vision @ text_keys.t() / temp
    sim_t2v = text @ vision_keys.t() / temp
    target_v2t = target_t2v = targets
    if alpha > 0 and vision_m is not None:
        with torch.no_grad():
            target_v2t = alpha * F.softmax(vision_m @ text_keys.t() / temp, dim=1) + (1 - alpha) * targets
            target_t2v = alpha * F.softmax(text_m @ vision_keys.t() / temp, dim=1) + (1 - alpha) * targets
    if text_negatives is not None:
        sim_v2t = torch.cat([sim_v2t, vision @ text_negatives.t() / temp], dim=1)
        target_v2t = F.pad(target_v2t, (0, len(text_negatives)))
    return (soft_cross_entropy(sim_v2t, target_v2t) + soft_cross_entropy(sim_t2v, target_t2v)) / 2
