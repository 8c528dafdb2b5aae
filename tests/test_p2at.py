"""P2AT (timm model) and the segmentation metric."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import mmfm.backbones  # noqa: F401  (registers p2at_* with timm)
from mmfm.evaluation.segmentation import SegmentationMeter, confusion_matrix, miou


def _shapes_batch(rng: np.random.Generator, batch: int, size: int = 64):
    """Images with 1-2 coloured squares (class 1) / circles (class 2) on noise; mask = shape class."""
    images = rng.uniform(0, 0.3, (batch, size, size, 3)).astype(np.float32)
    masks = np.zeros((batch, size, size), dtype=np.int64)
    yy, xx = np.mgrid[:size, :size]
    for b in range(batch):
        for _ in range(rng.integers(1, 3)):
            cls = int(rng.integers(1, 3))
            r = int(rng.integers(size // 8, size // 4))
            cy, cx = rng.integers(r, size - r, 2)
            if cls == 1:
                inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            else:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
            images[b][inside] = rng.uniform(0.4, 1.0, 3)
            masks[b][inside] = cls
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(masks)


def test_registered_and_param_count():
    assert {'p2at_small', 'p2at_medium'} <= set(timm.list_models('p2at*'))
    small = timm.create_model('p2at_small', pretrained=False)
    n_small = sum(p.numel() for p in small.parameters())
    assert abs(n_small - 12.7e6) / 12.7e6 < 0.05, n_small  # P2AT-S: ~12.7M reported
    assert small.num_classes == 11 and small.pretrained_cfg['input_size'] == (3, 720, 960)
    medium = timm.create_model('p2at_medium')
    assert sum(p.numel() for p in medium.parameters()) > n_small + 9e6  # ResNet-34 encoder


@pytest.mark.parametrize('size', [(37, 53), (64, 64), (65, 97)])
def test_output_matches_input_size(size):
    model = timm.create_model('p2at_small', num_classes=5).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        assert logits.shape == (2, 5, *size)
        assert feats.shape == (2, model.num_features, math.ceil(size[0] / 4), math.ceil(size[1] / 4))
        assert model.forward_head(feats).shape[-2:] == feats.shape[-2:]
        assert model.forward_head(feats, pre_logits=True).shape[1] == model.num_features
        model.reset_classifier(3)
        assert model(x).shape == (2, 3, *size)


def test_features_only():
    model = timm.create_model('p2at_small', features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32, 32]
    assert model.feature_info.channels() == [64, 128, 256, 512, 104]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [f.shape[-1] for f in feats] == [64 // r for r in model.feature_info.reduction()]
    picked = timm.create_model('p2at_small', features_only=True, out_indices=(0, 1))
    assert picked.feature_info.reduction() == [4, 8]
    assert len(picked.model.stages) == 2  # later stages, context and decoder pruned
    with torch.no_grad():
        assert [f.shape[-1] for f in picked(torch.randn(1, 3, 64, 64))] == [16, 8]


def test_forward_intermediates():
    model = timm.create_model('p2at_small').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 5 and inter[-1].shape == (1, 104, 2, 2)
        torch.testing.assert_close(final, model.forward_features(x))
        early = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert len(early) == 2 and early[1].shape == (1, 128, 8, 8)
        torch.testing.assert_close(early[0], inter[0])
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last2] == [512, 104]
        stopped, _ = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(stopped, inter[1])


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('p2at_small', num_classes=3)
    x, y = torch.randn(2, 3, 48, 48), torch.randint(0, 3, (2, 48, 48))

    def grads(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, ckpt = grads(False), grads(True)
    assert model.grad_checkpointing
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores, spinning OpenMP threads make steps ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_falls_on_synthetic_masks(one_thread):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = timm.create_model('p2at_small', pretrained=False, num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for _ in range(30):
        x, y = _shapes_batch(rng, batch=4)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * losses[0], losses


def test_miou_perfect():
    target = torch.tensor([[0, 1], [2, 2]])
    conf = confusion_matrix(target, target, num_classes=3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 2]]
    assert miou(conf)[0] == 1.0


def test_miou_known_partial():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1])
    mean, iou = miou(confusion_matrix(pred, target, num_classes=2))
    assert iou.tolist() == pytest.approx([1 / 2, 2 / 3])
    assert mean == pytest.approx(7 / 12)


def test_miou_ignore_index():
    target = torch.tensor([0, 1, 255, 255])
    pred = torch.tensor([0, 1, 0, 1])
    conf = confusion_matrix(pred, target, num_classes=2, ignore_index=255)
    assert conf.sum() == 2 and miou(conf)[0] == 1.0
    with pytest.raises(ValueError):
        confusion_matrix(pred, torch.tensor([0, 1, 7, 0]), num_classes=2)


def test_miou_absent_classes_excluded():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    mean, iou = miou(confusion_matrix(pred, target, num_classes=4))
    assert iou[0].item() == pytest.approx(2 / 3) and iou[1].item() == pytest.approx(1 / 2)
    assert torch.isnan(iou[2:]).all()
    assert mean == pytest.approx((2 / 3 + 1 / 2) / 2)
    # a class that is only predicted (never in the target) counts, with IoU 0
    assert miou(confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 0]), num_classes=4))[0] == pytest.approx(0.25)


def test_meter_accumulates_over_batches():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (4, 8, 8))
    logits = torch.randn(4, 3, 8, 8)
    meter = SegmentationMeter(num_classes=3)
    meter.update(logits[:2], target[:2])
    meter.update(logits[2:], target[2:])
    whole = confusion_matrix(logits.argmax(1), target, num_classes=3)
    assert torch.equal(meter.conf, whole) and meter.conf.sum() == target.numel()
    assert meter.compute()['miou'] == pytest.approx(miou(whole)[0])
    meter.reset()
    assert meter.conf.sum() == 0
