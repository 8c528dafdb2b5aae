"""Visual question answering on images (``vqa``) and videos (``video_qa``): classification over the train
answer list on the fused [CLS] (ViLT / All-in-One), BCE on VQAv2 soft scores, evaluated with the official
VQAv2 accuracy per question type. Each task trains the answer head named after it.
"""

from __future__ import annotations

import torch

from mmfm.data import VideoQADataset, VQADataset
from mmfm.data.shards import QuestionDecoder
from mmfm.objectives.vqa import vqa_loss
from mmfm.tasks.base import (
    Task,
    TaskLoss,
    data_path,
    dataset_kwargs,
    eval_loader,
    media_reader,
    optional_path,
    register_task,
    transform,
)


class AnswerTask(Task):
    text_keys = ("question",)
    answers_questions = True
    metric_prefix = ""

    def answer_list_file(self, cfg) -> str:
        raise NotImplementedError

    def answer_lists(self, cfg, fuses):
        return {self.name: data_path(cfg, self.answer_list_file(cfg))}

    def build_loss(self, settings, model):
        return AnswerLoss(self.name)

    def evaluate(self, model, cfg, wanted, quiet=True):
        from mmfm.evaluation.vqa import evaluate_vqa

        if self.name not in wanted or self.name not in model.answers:
            return {}
        if not (path := optional_path(cfg, self.eval_file(cfg))):
            return {}
        dataset = self.dataset(cfg, path, model.answers[self.name], train=False)
        return evaluate_vqa(model, eval_loader(dataset, cfg), self.name, self.metric_prefix)

    def build_dataset(self, cfg, answers):
        return self.dataset(cfg, data_path(cfg, self.train_file(cfg)), answers[self.name], train=True)

    def shard_decoder(self, cfg, answers):
        return QuestionDecoder(media_reader(cfg, self.modality), transform(cfg, train=True), answers[self.name])


@register_task
class ImageQA(AnswerTask):
    name = "vqa"
    modality = "image"
    metrics = ("vqa",)
    metric_prefix = "vqa"

    def answer_list_file(self, cfg):
        return cfg.data.answer_list

    def train_file(self, cfg):
        return cfg.data.vqa

    def eval_file(self, cfg):
        return cfg.eval.vqa

    def dataset(self, cfg, path, answers, train):
        return VQADataset(path, transform=transform(cfg, train), answer_list=answers, **dataset_kwargs(cfg))


@register_task
class VideoQA(AnswerTask):
    name = "video_qa"
    modality = "video"
    metrics = ("video_qa",)
    metric_prefix = "videoqa"

    def answer_list_file(self, cfg):
        return cfg.data.video_answer_list

    def train_file(self, cfg):
        return cfg.data.video_qa

    def eval_file(self, cfg):
        return cfg.eval.video_qa

    def dataset(self, cfg, path, answers, train):
        return VideoQADataset(path, num_frames=cfg.data.num_frames, transform=transform(cfg, train),
                              answer_list=answers, **dataset_kwargs(cfg))


class AnswerLoss(TaskLoss):
    def __init__(self, head: str):
        super().__init__()
        self.head = head

    def forward(self, batch: dict, run) -> dict:
        model = run.model
        vision = model.encode_vision(batch["video"] if "video" in batch else batch["image"])
        losses = answer_losses(model, self.head, batch, vision.tokens)
        return {"loss": losses[self.head], **{k: v.detach() for k, v in losses.items()}}


def answer_losses(model, head: str, batch: dict, vision, rows: torch.Tensor | None = None) -> dict:
    """VQA loss and soft accuracy of the ``head`` answers to the batch's questions (only ``rows``)."""
    ids, mask, target = batch["question_ids"], batch["question_mask"], batch["target"]
    if rows is not None and not rows.all():
        keep = rows.nonzero().squeeze(1)
        ids, mask, target = ids[keep], mask[keep], target[keep]
        vision = vision.select(keep)
    question = model.encode_text(ids, mask)
    logits = model.answer_logits(head, question.tokens, vision)
    accuracy = target.gather(1, logits.argmax(1, keepdim=True)).mean()
    return {head: vqa_loss(logits, target), f"{head}_acc": accuracy.detach()}
