"""Image-text and video-text alignment (ALBEF): ITC with queue and momentum distillation, ITM with hard
negatives, MLM with distillation, all on one vision forward.

An alignment batch that also carries one of its image's (video's) questions (``data.qa_with_captions``)
trains that modality's answer head on the same fusion context, so the vision side is encoded once for all
four objectives. Evaluated by retrieval (ALBEF/LAVIS: ITC top-k re-ranked by ITM), binding, the novel
split and CLIP-style zero-shot classification (images), video retrieval (videos).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mmfm.config import LOSS_WEIGHTS
from mmfm.data import (
    BindingDataset,
    ImageTextDataset,
    QuestionBank,
    RetrievalEvalDataset,
    VideoRetrievalEvalDataset,
    VideoTextDataset,
)
from mmfm.data.formats import read_json
from mmfm.data.negatives import CaptionNegatives
from mmfm.data.shards import CaptionDecoder
from mmfm.errors import ConfigError, DataError
from mmfm.models.model import Encoded
from mmfm.models.trunk import TokenBatch
from mmfm.objectives.distributed import gather_no_grad, gather_with_grad
from mmfm.objectives.itc import FeatureQueue, diagonal_targets, itc_loss, positive_targets
from mmfm.objectives.itm import itm_loss
from mmfm.objectives.mlm import mask_tokens, mlm_loss
from mmfm.objectives.words import bigram_targets, word_loss, word_targets
from mmfm.tasks.answer import answer_losses
from mmfm.tasks.base import (
    Task,
    TaskLoss,
    answer_task_of,
    data_path,
    dataset_kwargs,
    eval_loader,
    media_reader,
    optional_path,
    register_task,
    transform,
)


class AlignTask(Task):
    question_head = ""  # the answer head its riding questions train

    def answer_lists(self, cfg, fuses):
        # Riding questions train a head only through the fusion layers: a contrastive-only model gets none.
        if not (cfg.data.qa_with_captions and fuses):
            return {}
        return answer_task_of(self.question_head).answer_lists(cfg, fuses)

    def needs_momentum(self, settings):
        return settings.momentum > 0

    text_keys = ("text", "negative_text", "question")

    def questions(self, cfg, answers) -> QuestionBank | None:
        if not cfg.data.qa_with_captions or self.question_head not in answers:
            return None
        return QuestionBank(answer_task_of(self.question_head).build_dataset(cfg, answers))

    def build_loss(self, settings, model):
        return AlignLoss(self.name, self.question_head, settings, model.cfg.embed_dim)

    def shard_decoder(self, cfg, answers):
        riding = answers.get(self.question_head) if cfg.data.qa_with_captions else None
        return CaptionDecoder(media_reader(cfg, self.modality), transform(cfg, train=True), caption_negatives(cfg),
                              riding)


@register_task
class ImageText(AlignTask):
    name = "image_text"
    modality = "image"
    metrics = ("retrieval", "novel", "binding", "zeroshot")
    question_head = "vqa"

    def build_dataset(self, cfg, answers):
        return ImageTextDataset(data_path(cfg, cfg.data.image_text), transform=transform(cfg, train=True),
                                negatives=caption_negatives(cfg), questions=self.questions(cfg, answers),
                                **dataset_kwargs(cfg))

    def evaluate(self, model, cfg, wanted, quiet=True):
        from mmfm.evaluation.retrieval import evaluate_binding

        kwargs, images = dataset_kwargs(cfg), transform(cfg, train=False)
        metrics = {}
        if "retrieval" in wanted and (path := optional_path(cfg, cfg.eval.retrieval)):
            metrics.update(retrieval(model, cfg, RetrievalEvalDataset(path, transform=images, **kwargs), "image",
                                     quiet))
        if "novel" in wanted and (path := optional_path(cfg, cfg.eval.retrieval_novel)):
            novel = retrieval(model, cfg, RetrievalEvalDataset(path, transform=images, **kwargs), "image", quiet)
            metrics.update({f"novel_{k}": v for k, v in novel.items()})
        if "binding" in wanted and (path := optional_path(cfg, cfg.eval.binding)):
            probes = BindingDataset(path, transform=images, **kwargs)
            metrics.update(evaluate_binding(model, eval_loader(probes, cfg)))
        if "zeroshot" in wanted:
            metrics.update(zeroshot(model, cfg, quiet))
        return metrics


@register_task
class VideoText(AlignTask):
    name = "video_text"
    modality = "video"
    metrics = ("video_retrieval",)
    question_head = "video_qa"

    def build_dataset(self, cfg, answers):
        return VideoTextDataset(data_path(cfg, cfg.data.video_text), num_frames=cfg.data.num_frames,
                                transform=transform(cfg, train=True), sampling="random",
                                negatives=caption_negatives(cfg), questions=self.questions(cfg, answers),
                                **dataset_kwargs(cfg))

    def evaluate(self, model, cfg, wanted, quiet=True):
        if "video_retrieval" not in wanted or not (path := optional_path(cfg, cfg.eval.video_retrieval)):
            return {}
        dataset = VideoRetrievalEvalDataset(path, num_frames=cfg.data.num_frames, transform=transform(cfg, False),
                                            **dataset_kwargs(cfg))
        return {video_key(k): v for k, v in retrieval(model, cfg, dataset, "video", quiet).items()}


def retrieval(model, cfg, dataset, key: str, quiet: bool) -> dict:
    from mmfm.evaluation.retrieval import evaluate_retrieval

    return evaluate_retrieval(model, eval_loader(dataset, cfg), dataset, key, cfg.eval.k_test, quiet,
                              score=cfg.eval.rerank_score)


def zeroshot(model, cfg, quiet: bool) -> dict:
    """zeroshot_folder_* on the ImageFolder ``eval.zeroshot``, zeroshot_shape_* / zeroshot_color_* on the
    single-object images of ``eval.zeroshot_scenes``; zeroshot_top1 / top5 their mean. Absent files: skipped.

    Prompts: ``eval.zeroshot_templates`` for every set if given, else the default templates plus the set's own.
    """
    from mmfm.data.shapes import single_object_classes
    from mmfm.evaluation.zeroshot import zeroshot_accuracy, zeroshot_metrics
    from mmfm.inference.encode import DEFAULT_TEMPLATES

    chosen = cfg.eval.zeroshot_templates
    if not all(isinstance(t, str) and "{}" in t for t in chosen):
        raise ConfigError(f"eval.zeroshot_templates={chosen}: give strings with {{}} where the class goes, "
                          "e.g. ['a photo of a {}.']")
    class_datasets = []
    if path := optional_path(cfg, cfg.eval.zeroshot):
        class_datasets.append(image_folder(path))
    if path := optional_path(cfg, cfg.eval.zeroshot_scenes):
        images, class_sets = single_object_classes(read_json(path))
        if images:
            class_datasets.append((images, class_sets))
    accuracies = {}
    for images, class_sets in class_datasets:
        prompted = {name: (classes, targets, chosen or (*DEFAULT_TEMPLATES, *own))
                    for name, (classes, targets, own) in class_sets.items()}
        # A retrieval eval set is a list of images (and captions, unused here) that yields each one's index.
        entries = [{"image": image, "caption": "", "image_id": i} for i, image in enumerate(images)]
        dataset = RetrievalEvalDataset(entries, transform=transform(cfg, train=False), **dataset_kwargs(cfg))
        accuracies.update(zeroshot_accuracy(model, eval_loader(dataset, cfg), prompted, quiet))
    return zeroshot_metrics(accuracies)


def image_folder(root: str) -> tuple[list[str], dict[str, tuple]]:
    """An ImageFolder (``root/class_name/*.jpg``, torchvision's layout): image paths and the "folder" class set,
    class names with "_" read as a space."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = os.path.abspath(root)  # the dataset would join a relative path to data.root a second time
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    except OSError as err:
        raise DataError(f"eval.zeroshot {root}: {err}; lay it out as ROOT/class_name/image.jpg") from None
    if not samples:
        raise DataError(f"eval.zeroshot {root}: no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    names = tuple(name.replace("_", " ") for name in classes)
    return [path for path, _ in samples], {"folder": (names, [target for _, target in samples], ())}


def video_key(name: str) -> str:
    """Video retrieval's text-side keys get a vid_ prefix: txt_r1 -> vid_txt_r1, itc_txt_r1 -> itc_vid_txt_r1."""
    itc, base = ("itc_", name[4:]) if name.startswith("itc_") else ("", name)
    return itc + ("vid_" + base if base.startswith(("txt", "r_mean")) else base)


def caption_negatives(cfg) -> CaptionNegatives | None:
    word_groups, replace_prob = cfg.data.negative_words, cfg.data.negative_replace_prob
    if not word_groups:
        return None
    if not all(isinstance(g, list) and all(isinstance(w, str) for w in g) for g in word_groups):
        raise ConfigError("data.negative_words must be a list of word groups, e.g. [[red, green], [circle, star]]")
    if not 0.0 <= replace_prob <= 1.0:
        raise ConfigError(f"data.negative_replace_prob={replace_prob}: give a probability in [0, 1]")
    try:
        return CaptionNegatives(word_groups, replace_prob)
    except ValueError as err:
        raise ConfigError(f"data.negative_words: {err}") from None


# ---- the loss -------------------------------------------------------------------------------------

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


class AlignLoss(TaskLoss):
    def __init__(self, stream: str, question_head: str, settings, embed_dim: int):
        super().__init__()
        self.stream, self.question_head = stream, question_head
        self.weights = {**LOSS_WEIGHTS, **settings.loss_weights}
        self.mlm_prob, self.itc_positives = settings.mlm_prob, settings.itc_positives
        self.queue = FeatureQueue(settings.queue_size, embed_dim)

    def forward(self, batch: dict, run) -> dict:
        model = run.model
        pixels = batch["video"] if "video" in batch else batch["image"]
        ids, mask = batch["text_ids"], batch["text_mask"]
        pair_ids = torch.as_tensor(batch.get("video_id", batch.get("image_id")), device=ids.device)
        alpha = run.current_alpha()
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        vision = model.encode_vision(pixels)
        text, negatives = self._texts(model, batch)
        momentum = self._momentum_features(run, pixels, ids, mask)
        losses = {"itc": self._itc(model, vision.feat, text.feat, momentum, pair_ids, alpha, negatives)}
        weights = {"itc": self.weights["itc"]}
        if self.weights["words"] > 0 and model.word_head is not None:
            losses["words"] = self._words(model, vision.tokens, ids, mask)
            weights["words"] = self.weights["words"]
        if model.fuses:
            context = model.fusion_context(vision.tokens)
            sim_t2v = (text.feat @ vision.feat.t() / model.temp).detach()
            caption_negatives = None if negatives is None else (negatives.tokens, negatives.rows)
            losses.update(itm_loss(model, text.tokens, context, sim_t2v, sim_t2v.t(), pair_ids, caption_negatives))
            weights.update({term: self.weights[term] for term in ("itm", "itm_rank") if self.weights[term] > 0})
            if self.weights["mlm"] > 0:
                losses["mlm"] = self._mlm(run, ids, mask, context, momentum, alpha)
                weights["mlm"] = self.weights["mlm"]
            if "question_ids" in batch and batch["has_question"].any():
                losses.update(answer_losses(model, self.question_head, batch, context, batch["has_question"]))
                weights[self.question_head] = self.weights["qa"]
        losses["loss"] = sum(weight * losses[k] for k, weight in weights.items())
        return losses

    @staticmethod
    def _texts(model, batch: dict) -> tuple[Encoded, EncodedNegatives | None]:
        """The captions encoded, plus the caption negatives in the same forward."""
        ids, mask = batch["text_ids"], batch["text_mask"]
        if "has_negative" not in batch or not batch["has_negative"].any():
            return model.encode_text(ids, mask), None
        rows = batch["has_negative"].nonzero().squeeze(1)
        neg_ids, neg_mask = batch["negative_text_ids"][rows], batch["negative_text_mask"][rows]
        length = max(ids.shape[1], neg_ids.shape[1])
        pad = model.tokenizer.pad_id
        both = model.encode_text(torch.cat([_pad(ids, length, pad), _pad(neg_ids, length, pad)]),
                                 torch.cat([_pad(mask, length, False), _pad(neg_mask, length, False)]))
        count, x, full_mask = len(ids), both.tokens.x, both.tokens.mask
        text = Encoded(TokenBatch(x[:count], full_mask[:count]), both.feat[:count])
        return text, EncodedNegatives(TokenBatch(x[count:], full_mask[count:]), rows, both.feat[count:], count)

    @staticmethod
    def _momentum_features(run, pixels, ids, mask) -> tuple[Encoded, Encoded] | None:
        if run.momentum is None:
            return None
        with torch.no_grad():
            teacher = run.momentum.model
            return teacher.encode_vision(pixels), teacher.encode_text(ids, mask)

    def _itc(self, model, vision_feat, text_feat, momentum, pair_ids, alpha, negatives=None):
        """ALBEF ITC: online features against [momentum batch ; queue] keys; the queue grows after the loss."""
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
        queue_vision, queue_text, queue_ids = self.queue.contents()
        vision_keys = torch.cat([vision_keys, queue_vision])
        text_keys = torch.cat([text_keys, queue_text])
        if self.itc_positives == "diagonal":
            targets = diagonal_targets(len(ids_all), len(queue_ids), device=ids_all.device)
        else:
            targets = positive_targets(ids_all, torch.cat([ids_all, queue_ids]))
        loss = itc_loss(vision_all, text_all, vision_keys, text_keys, model.temp, targets,
                        vision_m, text_m, alpha, text_negatives)
        self.queue.enqueue(vision_keys[: len(ids_all)].detach(), text_keys[: len(ids_all)].detach(), ids_all)
        return loss

    @staticmethod
    def _words(model, vision: TokenBatch, ids, mask) -> torch.Tensor:
        """Caption-word classification from the image alone (``mmfm.objectives.words``)."""
        specials = model.tokenizer.special_ids
        words, bigrams = model.word_logits(vision)
        loss = word_loss(words, word_targets(ids, mask, specials, words.shape[1]))
        if bigrams is not None:
            loss = loss + word_loss(bigrams, bigram_targets(ids, mask, specials, bigrams.shape[1]))
        return loss

    def _mlm(self, run, ids, mask, context, momentum, alpha):
        model, tok = run.model, run.model.tokenizer
        masked, labels = mask_tokens(ids, tok.special_ids, tok.mask_id, tok.bpe_size, self.mlm_prob)
        where = labels != -100
        if not where.any():
            return ids.new_zeros((), dtype=torch.float)
        logits = _masked_logits(model, masked, mask, context, where)
        logits_m = None
        if momentum is not None and alpha > 0:
            with torch.no_grad():
                logits_m = _masked_logits(run.momentum.model, masked, mask, momentum[0].tokens, where)
        return mlm_loss(logits, labels[where], logits_m, alpha)


def _masked_logits(model, masked, mask, vision, where):
    text = model.encode_text(masked, mask)
    joint = model.fuse(text.tokens, vision)
    return model.mlm_head(joint.x[:, : masked.shape[1]][where])
