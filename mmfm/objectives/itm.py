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
             ) -> dict[str, torch.Tensor]:
    """ITM over positives, (text, hard-negative vision) and (hard-negative text, vision) pairs.

    ``vision`` is the batch's fusion context (computed once), ``sim_*`` the local in-batch similarities,
    ``ids`` the pair ids; ``caption_negatives`` = (negative caption tokens padded like ``text``, the row
    of the image each one negates). Returns ``itm`` (binary cross-entropy), ``itm_acc`` and ``itm_rank``
    (``itm_rank_loss`` on the same pairs: no extra fusion pass).
    """
    neg_vision = sample_hard_negatives(sim_t2v, ids, ids)
    neg_text = sample_hard_negatives(sim_v2t, ids, ids)
    arange = torch.arange(len(ids), device=ids.device)
    text_all = text.select(torch.cat([arange, arange, neg_text]))
    vision_rows = [arange, neg_vision, arange]
    labels = [torch.ones_like(ids), (ids == ids[neg_vision]).long(), (ids[neg_text] == ids).long()]
    rows = None
    if caption_negatives is not None:
        negatives, rows = caption_negatives
        text_all = TokenBatch(torch.cat([text_all.x, negatives.x]), torch.cat([text_all.mask, negatives.mask]))
        vision_rows.append(rows)
        labels.append(torch.zeros_like(rows))
    vision_all = vision.select(torch.cat(vision_rows))
    labels = torch.cat(labels)
    logits = model.itm_logits(text_all, vision_all)
    return {"itm": F.cross_entropy(logits, labels), "itm_acc": (logits.argmax(1) == labels).float().mean(),
            "itm_rank": itm_rank_loss(logits[:, 1], labels, len(ids), rows)}


def itm_rank_loss(match: torch.Tensor, labels: torch.Tensor, batch: int, caption_rows: torch.Tensor | None = None,
                  ) -> torch.Tensor:
    """Listwise ranking of each pair's match logit against its own hard negatives (the re-rank's question).

    ``match`` holds the match logits in ``itm_loss``'s layout: ``batch`` positives, then each text with its
    hard-negative image, each image with its hard-negative text, then the caption negatives of the images
    ``caption_rows``. Per text: softmax over [its positive ; its hard image]; per image: over [its positive ;
    its hard text ; its caption negative]; cross-entropy on the positive. Binary ITM starts in a 1:3 "no
    match" prior that it leaves only after thousands of steps; this loss has no prior to sit in: every step
    asks the positive to score above the candidates re-ranking will compare it with. A candidate that shares
    the positive's id (``labels`` 1) is left out.
    """
    positive = match[:batch]
    hidden = torch.finfo(match.dtype).min

    def candidates(part: torch.Tensor, part_labels: torch.Tensor) -> torch.Tensor:
        return part.masked_fill(part_labels.bool(), hidden)

    text_side = torch.stack([positive, candidates(match[batch:2 * batch], labels[batch:2 * batch])], 1)
    image_side = [positive, candidates(match[2 * batch:3 * batch], labels[2 * batch:3 * batch])]
    if caption_rows is not None and len(caption_rows):
        image_side.append(match.new_full((batch,), hidden).index_copy(0, caption_rows, match[3 * batch:]))
    targets = torch.zeros(batch, dtype=torch.long, device=match.device)
    return 0.5 * (F.cross_entropy(text_side, targets) + F.cross_entropy(torch.stack(image_side, 1), targets))
