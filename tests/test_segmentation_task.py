"""The segmentation task: P2AT trained by the Trainer through `mmfm train`, mIoU in metrics.json, reload + eval."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmfm.cli import main as mmfm_main
from mmfm.objectives.segmentation import pixel_accuracy, segmentation_loss

REPO = Path(__file__).resolve().parents[1]


def test_loss_ignores_255_pixels_and_resizes_logits():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :4] = 255
    loss = segmentation_loss(logits, target)
    upsampled = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    keep = target != 255
    expected = F.cross_entropy(upsampled.permute(0, 2, 3, 1)[keep], target[keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert float(pixel_accuracy(upsampled, target)) == pytest.approx(
        float((upsampled.argmax(1) == target)[keep].float().mean()))


@pytest.fixture(scope="module")
def seg_run(tiny_shapes, tmp_path_factory):
    output = tmp_path_factory.mktemp("seg")
    overrides = [f"data.root={tiny_shapes}", "data.image_size=64", "data.num_workers=0", "train.batch_size=8",
                 "train.max_steps=30", "train.max_minutes=0", "train.warmup_steps=3", "train.log_every=1",
                 "train.threads=1", "train.save_every=0", "eval.batch_size=32"]
    assert mmfm_main(["train", "--config", str(REPO / "configs" / "segmentation_p2at.yaml"), "--output",
                      str(output), "--quiet", *overrides]) == 0
    return output, json.loads((output / "metrics.json").read_text()), overrides


def test_segmentation_loss_falls_and_miou_is_written(seg_run):
    output, _, _ = seg_run
    history = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    losses = [record["loss/segmentation"] for record in history]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    written = json.loads((output / "metrics.json").read_text())
    assert 0.0 <= written["miou"] <= 1.0
    assert len(written["iou"]) == 7
    assert (output / "curves.png").is_file()


def test_saved_model_reloads_and_evaluates_the_same(seg_run):
    import mmfm

    output, metrics, overrides = seg_run
    model = mmfm.create_model(output)
    arch = model.arch_dict()
    assert (arch["family"], arch["backbone"], arch["num_classes"]) == ("segmentation", "p2at_small", 7)
    assert mmfm_main(["eval", "--checkpoint", str(output), "--config", str(REPO / "configs" / "segmentation_p2at.yaml"),
                      "--output", str(output / "eval"), "--quiet", *overrides]) == 0
    again = json.loads((output / "eval" / "metrics.json").read_text())
    assert math.isclose(again["miou"], metrics["miou"], rel_tol=1e-6)
