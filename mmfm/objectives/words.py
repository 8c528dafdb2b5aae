"""Caption-word classification: the image alone predicts which words (and word pairs) its caption uses.

SuperClass (Huang et al. 2024) trains a vision encoder by classifying the caption's tokens from the image,
and matches CLIP. Here it is an auxiliary loss next to ITC: a caption names every object of the scene, so
its words are the scene's shapes and colours and its word pairs ("red circle") which colour goes with
which shape, asked of every image of the batch whatever the other images are. Targets are the caption's
distinct tokens (and hashed token bigrams), normalised to a distribution; the loss is soft cross-entropy.
"""

import torch

from mmfm.objectives.soft import soft_cross_entropy

_BIGRAM_PRIME = 1_000_003


def _content(ids: torch.Tensor, mask: torch.Tensor, special_ids) -> torch.Tensor:
    """(B, L) True where a token is a real word: not padding and not a special token."""
    return mask & ~torch.isin(ids, torch.tensor(special_ids, device=ids.device))


def _distribution(rows: torch.Tensor, cols: torch.Tensor, batch: int, classes: int) -> torch.Tensor:
    targets = torch.zeros(batch, classes, device=cols.device)
    targets[rows, cols] = 1.0
    return targets / targets.sum(1, keepdim=True).clamp_min(1.0)


def word_targets(ids: torch.Tensor, mask: torch.Tensor, special_ids, vocab_size: int) -> torch.Tensor:
    """(B, vocab_size): each caption's distinct word tokens, uniform over them."""
    rows, cols = _content(ids, mask, special_ids).nonzero(as_tuple=True)
    return _distribution(rows, ids[rows, cols], len(ids), vocab_size)


def bigram_targets(ids: torch.Tensor, mask: torch.Tensor, special_ids, buckets: int) -> torch.Tensor:
    """(B, buckets): each caption's adjacent word-token pairs, hashed into ``buckets``, uniform over them."""
    content = _content(ids, mask, special_ids)
    pairs = content[:, :-1] & content[:, 1:]
    rows, cols = pairs.nonzero(as_tuple=True)
    hashed = (ids[rows, cols] * _BIGRAM_PRIME + ids[rows, cols + 1]) % buckets
    return _distribution(rows, hashed, len(ids), buckets)


def word_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy over the captions that have words (a caption of specials only asks nothing)."""
    present = targets.sum(1) > 0
    if not present.any():
        return logits.new_zeros(())
    return soft_cross_entropy(logits[present], targets[present])
