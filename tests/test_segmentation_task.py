"""task: segmentation — P2AT trained by the Trainer through tools/train.py, mIoU in metrics.json, reload + eval."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmfm.objectives.segmentation import SegmentationObjective, pixel_accuracy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


class _Constant(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, pixels):
        return self.logits


def test_objective_ignores_255_pixels_and_resizes_logits():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :4] = 255
    losses = SegmentationObjective(_Constant(logits))("segmentation", {"image": None, "mask": target})
    upsampled = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    keep = target != 255
    expected = F.cross_entropy(upsampled.permute(0, 2, 3, 1)[keep], target[keep])
    assert torch.allclose(losses["loss"], expected, atol=1e-6)
    assert float(pixel_accuracy(upsampled, target)) == pytest.approx(
        float((upsampled.argmax(1) == target)[keep].float().mean()))


@pytest.fixture(scope="module")
def seg_run(tiny_shapes, tmp_path_factory):
    import train

    output = tmp_path_factory.mktemp("seg")
    overrides = [f"data.root={tiny_shapes}", "data.image_size=64", "data.num_workers=0", "train.batch_size=8",
                 "train.max_steps=30", "train.max_minutes=0", "train.warmup_steps=3", "train.log_every=1",
                 "train.threads=1", "train.save_every=0", "eval.batch_size=32"]
    args = train.parse_args(["--config", str(REPO / "configs" / "segmentation_p2at.yaml"), "--output", str(output),
                             "--quiet", *overrides])
    torch.manual_seed(0)
    return output, train.run(args), overrides


def test_segmentation_loss_falls_and_miou_is_written(seg_run):
    output, metrics, _ = seg_run
    history = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    losses = [record["loss/segmentation"] for record in history]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    written = json.loads((output / "metrics.json").read_text())
    assert 0.0 <= written["miou"] <= 1.0 and written["miou"] == metrics["miou"]
    assert len(written["iou"]) == 7
    assert (output / "curves.png").is_file()


def test_saved_model_reloads_and_evaluates_the_same(seg_run):
    import eval as eval_tool

    output, metrics, overrides = seg_run
    from mmfm.factory import load_segmentation_model

    model = load_segmentation_model(output)
    assert model.cfg.backbone == "p2at_small" and model.cfg.num_classes == 7
    assert eval_tool.main(["--checkpoint", str(output), "--config", str(REPO / "configs" / "segmentation_p2at.yaml"),
                           "--output", str(output / "eval"), "--quiet", *overrides]) == 0
    again = json.loads((output / "eval" / "metrics.json").read_text())
    assert math.isclose(again["miou"], metrics["miou"], rel_tol=1e-6)
