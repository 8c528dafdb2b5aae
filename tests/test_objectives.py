"""ALBEF objectives: ITC (vs CLIP InfoNCE), the feature queue, hard negatives, MLM masking, VQA loss."""

import torch
import torch.nn.functional as F

from mmfm.objectives.itc import FeatureQueue, itc_loss, positive_targets
from mmfm.objectives.itm import sample_hard_negatives
from mmfm.objectives.mlm import mask_tokens, mlm_loss
from mmfm.objectives.vqa import vqa_loss
from mmfm.tokenizers.text import TextTokenizer


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_itc_without_queue_and_momentum_is_clip_infonce():
    vision, text = _features(8, 16, 0), _features(8, 16, 1)
    temp = torch.tensor(0.07)
    ids = torch.arange(8)
    ours = itc_loss(vision, text, vision, text, temp, positive_targets(ids, ids), alpha=0.0)
    logits = vision @ text.t() / temp
    clip = (F.cross_entropy(logits, ids) + F.cross_entropy(logits.t(), ids)) / 2
    assert torch.allclose(ours, clip, atol=1e-6)


def test_itc_same_id_pairs_share_the_target_mass():
    ids = torch.tensor([0, 0, 1])
    targets = positive_targets(ids, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(targets[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.allclose(targets[2], torch.tensor([0.0, 0.0, 0.5, 0.5]))


def test_itc_distillation_changes_the_loss_only_with_alpha():
    vision, text = _features(6, 8, 2), _features(6, 8, 3)
    vision_m, text_m = _features(6, 8, 4), _features(6, 8, 5)
    ids, temp = torch.arange(6), torch.tensor(0.1)
    targets = positive_targets(ids, ids)
    plain = itc_loss(vision, text, vision_m, text_m, temp, targets, vision_m, text_m, alpha=0.0)
    distilled = itc_loss(vision, text, vision_m, text_m, temp, targets, vision_m, text_m, alpha=0.4)
    assert not torch.allclose(plain, distilled)


def test_queue_of_odd_size_wraps_in_order():
    queue = FeatureQueue(size=5, dim=2)
    for start in (0, 3, 6):
        feats = torch.arange(start, start + 3).float()[:, None].repeat(1, 2)
        queue.enqueue(feats, feats, torch.arange(start, start + 3))
    vision, text, ids = queue.contents()
    assert queue.filled == 5 and int(queue.ptr) == 9 % 5
    assert sorted(ids.tolist()) == [4, 5, 6, 7, 8]
    assert ids.tolist() == [5, 6, 7, 8, 4]
    assert torch.equal(vision[:, 0].long(), ids) and torch.equal(text[:, 1].long(), ids)


def test_queue_smaller_than_batch_keeps_the_newest():
    queue = FeatureQueue(size=3, dim=1)
    queue.enqueue(torch.arange(7.0)[:, None], torch.arange(7.0)[:, None], torch.arange(7))
    assert sorted(queue.contents()[2].tolist()) == [4, 5, 6]


def test_hard_negatives_never_pick_a_positive():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    sim = torch.randn(8, 8) * 5
    for _ in range(200):
        picks = sample_hard_negatives(sim, ids, ids)
        assert not (ids[picks] == ids).any()


def test_hard_negatives_follow_similarity():
    torch.manual_seed(0)
    ids = torch.arange(4)
    sim = torch.tensor([[0.0, 8.0, -8.0, -8.0]] * 4)
    picks = torch.stack([sample_hard_negatives(sim, ids, ids)[0] for _ in range(100)])
    assert (picks == 1).float().mean() > 0.9


def test_mlm_masking_ratios_and_specials():
    tok = TextTokenizer(40)
    torch.manual_seed(0)
    ids, _ = tok(["a large red circle left of a small blue star and two green squares"] * 800)
    masked, labels = mask_tokens(ids, tok.special_ids, tok.mask_id, tok.bpe_size, prob=0.15)
    real = ~torch.isin(ids, torch.tensor(tok.special_ids))
    chosen = labels != -100
    assert real.sum() > 10_000
    assert abs(chosen.sum() / real.sum() - 0.15) < 0.01
    assert not chosen[~real].any(), "special tokens must never be masked"
    to_mask = (masked == tok.mask_id) & chosen
    unchanged = (masked == ids) & chosen
    assert abs(to_mask.sum() / chosen.sum() - 0.8) < 0.03
    assert abs(unchanged.sum() / chosen.sum() - 0.1) < 0.03 + 1 / tok.bpe_size
    assert torch.equal(labels[chosen], ids[chosen])


def test_mlm_loss_distillation_mixes_soft_targets():
    logits = torch.randn(5, 11)
    labels = torch.randint(11, (5,))
    assert torch.allclose(mlm_loss(logits, labels), F.cross_entropy(logits, labels))
    mixed = mlm_loss(logits, labels, logits_m=logits.clone(), alpha=1.0)
    soft = -(F.log_softmax(logits, 1) * F.softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(mixed, soft)


def test_vqa_loss_is_scaled_bce():
    logits, target = torch.randn(4, 6), torch.rand(4, 6)
    expected = F.binary_cross_entropy_with_logits(logits, target) * 6
    assert torch.allclose(vqa_loss(logits, target), expected)
