"""Semantic segmentation metric: confusion matrix and mean IoU (`miou`, a fraction in [0, 1])."""


import torch

__all__ = ['SegmentationMeter', 'confusion_matrix', 'miou']


def confusion_matrix(
        pred: torch.Tensor,
        target: torch.Tensor,
        num_classes: int,
        ignore_index: int = 255,
        conf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Confusion matrix (rows = target class, columns = predicted class), added onto `conf` if given.

    Args:
        pred: predicted class ids, any shape; or logits (B, num_classes, H, W), arg-maxed over dim 1.
        target: class ids with the shape of the predicted ids; `ignore_index` pixels are skipped.
        num_classes: number of classes.
        ignore_index: target value that is not counted.
        conf: running (num_classes, num_classes) int64 matrix to accumulate into (in place).
    """
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f'pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}')
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if ((target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes)).any():
        raise ValueError(f'class ids must lie in [0, {num_classes}) or equal ignore_index={ignore_index}')
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2)
    counts = counts.reshape(num_classes, num_classes).cpu()
    if conf is None:
        return counts
    return conf.add_(counts)


def miou(conf: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean IoU over the classes present in the target or the prediction, and per-class IoU.

    Classes absent from both (empty row and column) get IoU NaN and are left out of the mean.
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / union  # 0 / 0 -> NaN for absent classes
    present = union > 0
    mean = iou[present].mean().item() if present.any() else float('nan')
    return mean, iou


class SegmentationMeter:
    """Accumulates a confusion matrix over batches; `compute()` returns {'miou': ..., 'iou': ...}."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self):
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor):
        confusion_matrix(pred, target, self.num_classes, self.ignore_index, conf=self.conf)

    def compute(self) -> dict:
        mean, iou = miou(self.conf)
        return {'miou': mean, 'iou': iou.tolist()}
