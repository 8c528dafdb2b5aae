"""Image/video-text matching with hard negatives (ALBEF).

For every text one negative image is drawn from softmax(text->image similarity) with same-id pairs
masked out, and likewise for every image; the fusion layers classify the 3B pairs match / no match.
Caption negatives (``mmfm.data.negatives``: the caption with its attributes re-bound) add one more
no-match pair per image that has one.
"""

import torch
import torch.nn.functional as F

from mmfm.models.trunk import FusionContext, TokenBatch


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """For each row, a column index sampled by softmax(sim) among columns of a different id.

    Rows whose every column shares their id (nothing to contrast) draw, by the same softmax, among the
    columns other than their own (column i for row i); their label is then decided by id equality,
    never assumed.
    """
    candidates = row_ids[:, None] != col_ids[None, :]
    lonely = ~candidates.any(1)
    if lonely.any():
        others = ~torch.eye(*sim.shape, dtype=torch.bool, device=sim.device)
        candidates[lonely] = others[lonely]
        candidates |= ~candidates.any(1, keepdim=True)  # a single column: the only choice
    # masking logits (not softmax weights) keeps a far-off candidate drawable when its weight underflows
    weights = F.softmax(sim.float().masked_fill(~candidates, float("-inf")), dim=1)
    return torch.multinomial(weights, 1).squeeze(1)


def itm_loss(model, text: TokenBatch, vision: FusionContext, sim_t2v: torch.Tensor, sim_v2t: torch.Tensor,
             ids: torch.Tensor, caption_negatives: tuple[TokenBatch, torch.Tensor] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, accuracy) over positives, (text, hard-negative vision) and (hard-negative text, vision).

    ``vision`` is the batch's fusion context (computed once), ``sim_*`` the local in-batch similarities,
    ``ids`` the pair ids; ``caption_negatives`` = (negative caption tokens padded like ``text``, the row
    of the image each one negates).
    """
    neg_vision = sample_hard_negatives(sim_t2v, ids, ids)
    neg_text = sample_hard_negatives(sim_v2t, ids, ids)
    arange = torch.arange(len(ids), device=ids.device)
    text_all = text.select(torch.cat([arange, arange, neg_text]))
    vision_rows = [arange, neg_vision, arange]
    labels = [torch.ones_like(ids), (ids == ids[neg_vision]).long(), (ids[neg_text] == ids).long()]
    if caption_negatives is not None:
        negatives, rows = caption_negatives
        text_all = TokenBatch(torch.cat([text_all.x, negatives.x]), torch.cat([text_all.mask, negatives.mask]))
        vision_rows.append(rows)
        labels.append(torch.zeros_like(rows))
    vision_all = vision.select(torch.cat(vision_rows))
    labels = torch.cat(labels)
    logits = model.itm_logits(text_all, vision_all)
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()
