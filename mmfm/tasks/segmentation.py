"""Semantic segmentation (``family: segmentation`` models such as P2AT): per-pixel cross-entropy,
evaluated with mIoU (and per-class IoU) on ``eval.segmentation``."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from mmfm.data import SegmentationDataset
from mmfm.evaluation.segmentation import SegmentationMeter
from mmfm.objectives.segmentation import pixel_accuracy, segmentation_loss
from mmfm.tasks.base import Task, TaskLoss, data_path, dataset_kwargs, eval_loader, register_task, transform


@register_task
class Segmentation(Task):
    name = "segmentation"
    family = "segmentation"
    metrics = ("segmentation",)

    def build_dataset(self, cfg, answers):
        return SegmentationDataset(data_path(cfg, cfg.data.segmentation), transform=transform(cfg, train=True),
                                   **dataset_kwargs(cfg))

    def build_loss(self, settings, model):
        return SegmentationLoss()

    @torch.no_grad()
    def evaluate(self, model, cfg, wanted, quiet=True):
        """``miou`` and per-class ``iou`` (None for classes absent from the split)."""
        if "segmentation" not in wanted:
            return {}
        model.eval()
        device = next(model.parameters()).device
        dataset = SegmentationDataset(data_path(cfg, cfg.eval.segmentation), transform=transform(cfg, train=False),
                                      **dataset_kwargs(cfg))
        meter = SegmentationMeter(model.num_classes)
        for batch in tqdm(eval_loader(dataset, cfg), desc="segmentation", disable=quiet):
            meter.update(model(batch["image"].to(device)), batch["mask"].to(device))
        result = meter.compute()
        return {"miou": result["miou"], "iou": [None if math.isnan(iou) else round(iou, 4) for iou in result["iou"]]}


class SegmentationLoss(TaskLoss):
    def forward(self, batch: dict, run) -> dict:
        logits, target = run.model(batch["image"]), batch["mask"]
        return {"loss": segmentation_loss(logits, target), "pixel_acc": pixel_accuracy(logits.detach(), target)}
