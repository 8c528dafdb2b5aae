"""All training objectives of the unified model behind one module: ``objective(stream, batch) -> losses``.

Streams: ``image_text`` / ``video_text`` (ITC + ITM + MLM, ALBEF), ``vqa`` / ``video_qa`` (answer
classification). An alignment batch that also carries questions (``data.qa_with_captions``) trains the
answer head of its modality on the same fusion context, so the vision side is encoded once for all four
objectives. The engine sees only this nn.Module and the dict of losses it returns.
"""

from dataclasses import dataclass

import torch
from torch import nn

from mmfm.models.model import Encoded
from mmfm.models.momentum import MomentumModel
from mmfm.models.trunk import TokenBatch
from mmfm.objectives.distributed import gather_no_grad, gather_with_grad
from mmfm.objectives.itc import FeatureQueue, itc_loss, positive_targets
from mmfm.objectives.itm import itm_loss
from mmfm.objectives.mlm import mask_tokens, mlm_loss
from mmfm.objectives.vqa import vqa_loss

ALIGN_STREAMS = ("image_text", "video_text")
ANSWER_STREAMS = ("vqa", "video_qa")
ANSWER_HEAD_OF = {"image_text": "vqa", "video_text": "video_qa"}


def _pad(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    """(B, L) -> (B, length), right-padded with ``value``."""
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)


@dataclass
class EncodedNegatives:
    """Encoded caption negatives (``data.negative_words``): no-match texts for ITC and ITM.

    ``rows`` are the batch rows (images) they negate, out of ``batch_size``.
    """

    tokens: TokenBatch
    rows: torch.Tensor
    feat: torch.Tensor
    batch_size: int

    def padded_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch_size, D) features with zeros where a row has no negative, and the (batch_size,) presence
        mask: equal shapes on every rank, so they can be gathered."""
        padded = self.feat.new_zeros(self.batch_size, self.feat.shape[1]).index_copy(0, self.rows, self.feat)
        present = torch.zeros(self.batch_size, dtype=torch.bool, device=self.feat.device)
        return padded, present.index_fill(0, self.rows, True)


class MultiTaskObjective(nn.Module):
    def __init__(self, model: nn.Module, loss_weights: dict, streams, alpha_warmup_steps: int):
        super().__init__()
        cfg = model.cfg
        self.model = model
        self.loss_weights = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "qa": 1.0, **loss_weights}
        self.has_fusion = cfg.fusion_layer < cfg.depth
        self.alpha, self.alpha_warmup_steps = cfg.alpha, max(1, alpha_warmup_steps)
        self.mlm_prob = cfg.mlm_prob
        self.momentum = None
        if cfg.momentum > 0:
            self.momentum = MomentumModel(model, cfg.momentum, skip=("answer_heads", "answer_pair_heads"))
        self.queues = nn.ModuleDict({s: FeatureQueue(cfg.queue_size, cfg.embed_dim)
                                     for s in streams if s in ALIGN_STREAMS})
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def current_alpha(self) -> float:
        if self.momentum is None:
            return 0.0
        return self.alpha * min(1.0, int(self.step) / self.alpha_warmup_steps)

    def forward(self, stream: str, batch: dict) -> dict:
        if stream in ALIGN_STREAMS:
            losses = self.align(stream, batch)
        elif stream in ANSWER_STREAMS:
            losses = self.answer(stream, batch)
        else:
            raise KeyError(f"unknown training stream {stream!r}")
        self.step += 1
        return losses

    def _vision(self, batch: dict) -> torch.Tensor:
        return batch["video"] if "video" in batch else batch["image"]

    def _ids(self, batch: dict) -> torch.Tensor:
        ids = batch.get("video_id", batch.get("image_id"))
        return torch.as_tensor(ids, device=batch["text_ids"].device)

    def align(self, stream: str, batch: dict) -> dict:
        """ITC with queue + distillation, ITM with hard negatives, MLM with distillation."""
        model, pixels = self.model, self._vision(batch)
        ids, mask, pair_ids = batch["text_ids"], batch["text_mask"], self._ids(batch)
        alpha = self.current_alpha()
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        vision = model.encode_vision(pixels)
        text, negatives = self._texts(batch)
        momentum = self._momentum_features(pixels, ids, mask)
        losses = {"itc": self._itc(stream, vision.feat, text.feat, momentum, pair_ids, alpha, negatives)}
        weights = {"itc": self.loss_weights["itc"]}
        if self.has_fusion:
            context = model.fusion_context(vision.tokens)
            sim_t2v = (text.feat @ vision.feat.t() / model.temp).detach()
            caption_negatives = None if negatives is None else (negatives.tokens, negatives.rows)
            losses["itm"], losses["itm_acc"] = itm_loss(model, text.tokens, context, sim_t2v, sim_t2v.t(), pair_ids,
                                                        caption_negatives)
            weights["itm"] = self.loss_weights["itm"]
            if self.loss_weights["mlm"] > 0:
                losses["mlm"] = self._mlm(ids, mask, context, momentum, alpha)
                weights["mlm"] = self.loss_weights["mlm"]
            if "question_ids" in batch and batch["has_question"].any():
                head = ANSWER_HEAD_OF[stream]
                losses.update(self._answer_losses(head, batch, context, batch["has_question"]))
                weights[head] = self.loss_weights["qa"]
        losses["loss"] = sum(weight * losses[k] for k, weight in weights.items())
        return losses

    def _texts(self, batch: dict) -> tuple[Encoded, EncodedNegatives | None]:
        """The captions encoded, plus the caption negatives in the same forward."""
        ids, mask = batch["text_ids"], batch["text_mask"]
        if "has_negative" not in batch or not batch["has_negative"].any():
            return self.model.encode_text(ids, mask), None
        rows = batch["has_negative"].nonzero().squeeze(1)
        neg_ids, neg_mask = batch["negative_text_ids"][rows], batch["negative_text_mask"][rows]
        length = max(ids.shape[1], neg_ids.shape[1])
        pad = self.model.tokenizer.pad_id
        both = self.model.encode_text(torch.cat([_pad(ids, length, pad), _pad(neg_ids, length, pad)]),
                                      torch.cat([_pad(mask, length, False), _pad(neg_mask, length, False)]))
        count, x, full_mask = len(ids), both.tokens.x, both.tokens.mask
        text = Encoded(TokenBatch(x[:count], full_mask[:count]), both.feat[:count])
        return text, EncodedNegatives(TokenBatch(x[count:], full_mask[count:]), rows, both.feat[count:], count)

    def _momentum_features(self, pixels, ids, mask):
        if self.momentum is None:
            return None
        with torch.no_grad():
            self.momentum.update(self.model)
            teacher = self.momentum.model
            return teacher.encode_vision(pixels), teacher.encode_text(ids, mask)

    def _itc(self, stream, vision_feat, text_feat, momentum, pair_ids, alpha, negatives=None):
        vision_all, text_all = gather_with_grad(vision_feat), gather_with_grad(text_feat)
        text_negatives = None
        if negatives is not None:
            padded, present = negatives.padded_features()
            text_negatives = gather_with_grad(padded)[gather_no_grad(present)]
        ids_all = gather_no_grad(pair_ids)
        if momentum is None:
            vision_m = text_m = None
            vision_keys, text_keys = vision_all, text_all
        else:
            vision_m, text_m = gather_no_grad(momentum[0].feat), gather_no_grad(momentum[1].feat)
            vision_keys, text_keys = vision_m, text_m
        queue = self.queues[stream]
        queue_vision, queue_text, queue_ids = queue.contents()
        vision_keys = torch.cat([vision_keys, queue_vision])
        text_keys = torch.cat([text_keys, queue_text])
        targets = positive_targets(ids_all, torch.cat([ids_all, queue_ids]))
        loss = itc_loss(vision_all, text_all, vision_keys, text_keys, self.model.temp, targets,
                        vision_m, text_m, alpha, text_negatives)
        queue.enqueue(vision_keys[: len(ids_all)].detach(), text_keys[: len(ids_all)].detach(), ids_all)
        return loss

    def _mlm(self, ids, mask, context, momentum, alpha):
        tok = self.model.tokenizer
        masked, labels = mask_tokens(ids, tok.special_ids, tok.mask_id, tok.bpe_size, self.mlm_prob)
        where = labels != -100
        if not where.any():
            return ids.new_zeros((), dtype=torch.float)
        logits = self._masked_logits(self.model, masked, mask, context, where)
        logits_m = None
        if momentum is not None and alpha > 0:
            with torch.no_grad():
                logits_m = self._masked_logits(self.momentum.model, masked, mask, momentum[0].tokens, where)
        return mlm_loss(logits, labels[where], logits_m, alpha)

    @staticmethod
    def _masked_logits(model, masked, mask, vision, where):
        text = model.encode_text(masked, mask)
        joint = model.fuse(text.tokens, vision)
        return model.mlm_head(joint.x[:, : masked.shape[1]][where])

    def answer(self, stream: str, batch: dict) -> dict:
        vision = self.model.encode_vision(self._vision(batch))
        losses = self._answer_losses(stream, batch, vision.tokens)
        return {"loss": losses[stream], **{k: v.detach() for k, v in losses.items()}}

    def _answer_losses(self, head: str, batch: dict, vision, rows: torch.Tensor | None = None) -> dict:
        """VQA loss and soft accuracy of the ``head`` answers to the batch's questions (only ``rows``)."""
        ids, mask, target = batch["question_ids"], batch["question_mask"], batch["target"]
        if rows is not None and not rows.all():
            keep = rows.nonzero().squeeze(1)
            ids, mask, target = ids[keep], mask[keep], target[keep]
            vision = vision.select(keep)
        question = self.model.encode_text(ids, mask)
        logits = self.model.answer_logits(head, question.tokens, vision)
        accuracy = target.gather(1, logits.argmax(1, keepdim=True)).mean()
        return {head: vqa_loss(logits, target), f"{head}_acc": accuracy.detach()}
