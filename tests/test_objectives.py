"""ALBEF objectives: ITC (vs CLIP InfoNCE), the feature queue, hard negatives, MLM masking, VQA loss,
the momentum model's EMA."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfm.models.momentum import MomentumModel
from mmfm.objectives.itc import FeatureQueue, diagonal_targets, itc_loss, positive_targets
from mmfm.objectives.itm import itm_rank_loss, sample_hard_negatives
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


def test_itc_caption_negatives_are_extra_vision_to_text_columns_without_target_mass():
    vision, text, negatives = _features(6, 16, 0), _features(6, 16, 1), _features(3, 16, 2)
    temp = torch.tensor(0.07)
    ours = itc_loss(vision, text, vision, text, temp, positive_targets(torch.arange(6), torch.arange(6)),
                    text_negatives=negatives)
    labels = torch.arange(6)
    v2t = F.cross_entropy(vision @ torch.cat([text, negatives]).t() / temp, labels)
    t2v = F.cross_entropy(text @ vision.t() / temp, labels)
    assert torch.allclose(ours, (v2t + t2v) / 2, atol=1e-6)
    twin = itc_loss(vision, text, vision, text, temp, positive_targets(labels, labels), text_negatives=text[:1])
    plain = itc_loss(vision, text, vision, text, temp, positive_targets(labels, labels))
    assert twin > plain, "a negative equal to a positive caption must raise the loss"


def test_itc_same_id_pairs_share_the_target_mass():
    ids = torch.tensor([0, 0, 1])
    targets = positive_targets(ids, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(targets[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.allclose(targets[2], torch.tensor([0.0, 0.0, 0.5, 0.5]))


def test_itc_id_targets_count_queue_keys_of_the_same_id():
    ids, queue_ids = torch.tensor([0, 1, 2]), torch.tensor([1, 5, 0])
    targets = positive_targets(ids, torch.cat([ids, queue_ids]))
    assert torch.equal(targets, torch.tensor([[0.5, 0, 0, 0, 0, 0.5],
                                              [0, 0.5, 0, 0.5, 0, 0],
                                              [0, 0, 1.0, 0, 0, 0]]))


def test_itc_diagonal_targets_are_the_identity_on_the_batch_and_zero_on_the_queue():
    assert torch.equal(diagonal_targets(3, 2), torch.tensor([[1.0, 0, 0, 0, 0],
                                                             [0, 1.0, 0, 0, 0],
                                                             [0, 0, 1.0, 0, 0]]))
    assert diagonal_targets(2, 0).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    ids = torch.tensor([0, 0, 1])  # a repeated image: a positive only for the id targets
    assert positive_targets(ids, torch.cat([ids, torch.tensor([7, 8])]))[0, 1] == 0.5
    assert diagonal_targets(3, 2)[0, 1] == 0.0
    distinct = torch.arange(3)
    assert torch.equal(positive_targets(distinct, torch.cat([distinct, torch.tensor([7, 8])])),
                       diagonal_targets(3, 2))


def test_itc_keys_are_momentum_batch_then_queue():
    vision, text = _features(4, 8, 6), _features(4, 8, 7)
    vision_m, text_m = _features(4, 8, 8), _features(4, 8, 9)
    queue_vision, queue_text = _features(3, 8, 10), _features(3, 8, 11)
    temp, labels = torch.tensor(0.1), torch.arange(4)
    vision_keys, text_keys = torch.cat([vision_m, queue_vision]), torch.cat([text_m, queue_text])
    ours = itc_loss(vision, text, vision_keys, text_keys, temp, diagonal_targets(4, 3))
    v2t = F.cross_entropy(vision @ text_keys.t() / temp, labels)
    t2v = F.cross_entropy(text @ vision_keys.t() / temp, labels)
    assert torch.allclose(ours, (v2t + t2v) / 2, atol=1e-6)
    queue_first = torch.cat([queue_vision, vision_m]), torch.cat([queue_text, text_m])
    swapped = itc_loss(vision, text, *queue_first, temp, diagonal_targets(4, 3))
    assert not torch.allclose(ours, swapped)


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


def test_hard_negatives_of_an_all_same_id_batch_never_pick_the_row_itself():
    torch.manual_seed(0)
    ids = torch.full((4,), 7)
    sim = torch.eye(4) * 50  # the own column would win any draw it were allowed in
    picks = torch.stack([sample_hard_negatives(sim, ids, ids) for _ in range(200)])
    assert not (picks == torch.arange(4)).any()
    assert all(set(picks[:, row].tolist()) == set(range(4)) - {row} for row in range(4))
    assert sample_hard_negatives(torch.zeros(1, 1), ids[:1], ids[:1]).tolist() == [0], "the only column"


def test_hard_negatives_take_the_only_different_id_column_even_when_its_weight_underflows():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 0, 1])
    sim = torch.zeros(4, 4)
    sim[:3, 3] = -200.0  # softmax weight exp(-200) is 0 in float32
    picks = torch.stack([sample_hard_negatives(sim, ids, ids) for _ in range(100)])
    assert (picks[:, :3] == 3).all()
    assert set(picks[:, 3].tolist()) == {0, 1, 2}


def test_hard_negatives_fall_back_per_row():
    torch.manual_seed(0)
    row_ids, col_ids = torch.tensor([0, 1]), torch.tensor([0, 0, 0])
    picks = torch.stack([sample_hard_negatives(torch.zeros(2, 3), row_ids, col_ids) for _ in range(100)])
    assert set(picks[:, 0].tolist()) == {1, 2}, "row 0 has nothing to contrast: any column but its own"
    assert set(picks[:, 1].tolist()) == {0, 1, 2}


def test_hard_negatives_follow_similarity():
    torch.manual_seed(0)
    ids = torch.arange(4)
    sim = torch.tensor([[0.0, 8.0, -8.0, -8.0]] * 4)
    picks = torch.stack([sample_hard_negatives(sim, ids, ids)[0] for _ in range(100)])
    assert (picks == 1).float().mean() > 0.9


def test_itm_rank_loss_ranks_each_positive_against_its_own_candidates():
    # batch 2: positives, (text, hard image), (hard text, image), one caption negative of image 1
    match = torch.tensor([2.0, 0.5, 1.0, 3.0, -1.0, 0.0, 4.0])
    labels = torch.tensor([1, 1, 0, 1, 0, 0, 0])  # text 1's hard image shares its id: left out
    loss = itm_rank_loss(match, labels, batch=2, caption_rows=torch.tensor([1]))
    text_side = [F.cross_entropy(torch.tensor([[2.0, 1.0]]), torch.tensor([0])), torch.tensor(0.0)]
    image_side = [F.cross_entropy(torch.tensor([[2.0, -1.0]]), torch.tensor([0])),
                  F.cross_entropy(torch.tensor([[0.5, 0.0, 4.0]]), torch.tensor([0]))]
    expected = 0.5 * (sum(text_side) / 2 + sum(image_side) / 2)
    assert torch.allclose(loss, expected, atol=1e-6)
    without_captions = itm_rank_loss(match[:6], labels[:6], batch=2)
    image_side[1] = F.cross_entropy(torch.tensor([[0.5, 0.0]]), torch.tensor([0]))
    assert torch.allclose(without_captions, 0.5 * (sum(text_side) / 2 + sum(image_side) / 2), atol=1e-6)


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


def test_itm_pair_features_start_at_plain_itm_and_do_not_train_itc():
    from mmfm.config import ModelConfig
    from mmfm.models.model import MMFM

    torch.manual_seed(0)
    model = MMFM(ModelConfig(width=64, depth=2, heads=2, fusion_layer=1, fusion_mode="cross", img_size=32,
                             patch_size=8, itm_pair_features=True))
    ids, mask = model.tokenizer(["a red circle", "a blue square above a green star", "two shapes"])
    text, vision = model.encode_text(ids, mask), model.encode_vision(torch.randn(3, 3, 32, 32))
    plain = model.itm_head(model.fuse(text.tokens, vision.tokens).cls())
    context = model.fusion_context(vision.tokens).select(torch.arange(3))
    assert torch.allclose(model.itm_logits(text.tokens, context), plain, atol=1e-6)
    torch.nn.init.normal_(model.itm_pair_head.weight)
    product = text.feat * vision.feat / model.temp
    expected = plain + product @ model.itm_pair_head.weight.t() + model.itm_pair_head.bias
    logits = model.itm_logits(text.tokens, vision.tokens)
    assert torch.allclose(logits, expected, atol=1e-5)
    F.cross_entropy(logits, torch.tensor([1, 0, 0])).backward()
    assert model.itm_pair_head.weight.grad.abs().sum() > 0 and model.itm_head.weight.grad.abs().sum() > 0
    assert model.text_proj.weight.grad is None and model.vision_proj.weight.grad is None and model.temp.grad is None


def test_answer_pair_features_start_at_the_fused_head_and_add_a_bilinear_term():
    from mmfm.config import ModelConfig
    from mmfm.models.model import MMFM

    torch.manual_seed(0)
    model = MMFM(ModelConfig(width=64, depth=2, heads=2, fusion_layer=1, fusion_mode="cross", img_size=32,
                             patch_size=8, answer_pair_features=True), answers={"vqa": ["yes", "no", "red"]})
    ids, mask = model.tokenizer(["is there a red circle?", "what color is the square?"])
    question, vision = model.encode_text(ids, mask).tokens, model.encode_vision(torch.randn(2, 3, 32, 32)).tokens
    fused = model.answer_heads["vqa"](model.fuse(question, vision).cls())
    assert torch.allclose(model.answer_logits("vqa", question, vision), fused, atol=1e-6)
    pair = model.answer_pair_heads["vqa"]
    torch.nn.init.normal_(pair.weight)
    product = model.trunk.norm(question.x[:, 0]) * model.trunk.norm(vision.x[:, 0])
    logits = model.answer_logits("vqa", question, model.fusion_context(vision))
    assert torch.allclose(logits, fused + pair(product), atol=1e-5)
    logits.sum().backward()
    assert pair.weight.grad.abs().sum() > 0 and model.trunk.token_embed.weight.grad.abs().sum() > 0


def test_questions_attached_to_an_image_text_batch_train_the_vqa_head_on_the_same_vision():
    from mmfm.config import ModelConfig, ObjectiveConfig
    from mmfm.models.model import MMFM
    from mmfm.tasks.objective import TaskObjective

    torch.manual_seed(0)
    model = MMFM(ModelConfig(width=64, depth=2, heads=2, fusion_layer=1, fusion_mode="cross", img_size=32,
                             patch_size=8), answers={"vqa": ["yes", "no", "red"]})
    settings = ObjectiveConfig(loss_weights={"qa": 0.5, "mlm": 0.0})
    objective = TaskObjective(model, settings, ["image_text"], 10)
    ids, mask = model.tokenizer(["a red circle", "a blue square", "two shapes"])
    question_ids, question_mask = model.tokenizer(["is it red?", "", "what color?"])
    target = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 1.0]])
    batch = {"image": torch.randn(3, 3, 32, 32), "text_ids": ids, "text_mask": mask, "image_id": torch.arange(3),
             "question_ids": question_ids, "question_mask": question_mask, "target": target,
             "has_question": torch.tensor([True, False, True])}
    losses = objective("image_text", batch)
    with torch.no_grad():
        vision = model.encode_vision(batch["image"][[0, 2]]).tokens
        question = model.encode_text(question_ids[[0, 2]], question_mask[[0, 2]]).tokens
        expected = vqa_loss(model.answer_logits("vqa", question, vision), target[[0, 2]])
    assert torch.allclose(losses["vqa"], expected, atol=1e-5)
    assert torch.allclose(losses["loss"], losses["itc"] + losses["itm"] + 0.5 * losses["vqa"], atol=1e-5)
    losses["loss"].backward()
    assert model.answer_heads["vqa"].parameters().__next__().grad.abs().sum() > 0
    del batch["question_ids"]
    assert "vqa" not in objective("image_text", batch)


@pytest.mark.parametrize("positives", ["image_id", "diagonal"])
def test_align_itc_scores_momentum_batch_then_queue_and_enqueues_after_the_loss(positives):
    """The task's ITC step: keys [momentum batch ; queue], queue ids in the id targets, the batch queued
    only after its own loss (so it is never its own queued negative)."""
    from mmfm.config import ObjectiveConfig
    from mmfm.tasks.align import AlignLoss

    align = AlignLoss("image_text", "vqa", ObjectiveConfig(queue_size=5, itc_positives=positives), 8)
    queued_ids = torch.tensor([2, 9])
    align.queue.enqueue(_features(2, 8, 20), _features(2, 8, 21), queued_ids)
    vision, text, vision_m, text_m = (_features(3, 8, seed) for seed in (1, 2, 3, 4))
    ids, temp = torch.tensor([0, 1, 2]), torch.tensor(0.1)
    model = nn.Module()
    model.temp = nn.Parameter(temp.clone())
    momentum = (SimpleNamespace(feat=vision_m), SimpleNamespace(feat=text_m))
    loss = align._itc(model, vision, text, momentum, ids, alpha=0.3)
    queue_vision, queue_text, _ = align.queue.contents()
    keys_v, keys_t = torch.cat([vision_m, queue_vision[:2]]), torch.cat([text_m, queue_text[:2]])
    targets = (positive_targets(ids, torch.cat([ids, queued_ids])) if positives == "image_id"
               else diagonal_targets(3, 2))
    expected = itc_loss(vision, text, keys_v, keys_t, temp, targets, vision_m, text_m, 0.3)
    assert torch.allclose(loss, expected, atol=1e-6)
    if positives == "image_id":
        assert targets[2, 3] == 0.5, "the queued key of image 2 is a positive of query 2"
    assert torch.equal(align.queue.contents()[2], torch.tensor([2, 9, 0, 1, 2]))
    assert torch.allclose(queue_vision[2:], vision_m) and torch.allclose(queue_text[2:], text_m)


class _TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 2)
        self.head = nn.Linear(2, 1)


def test_momentum_update_is_an_ema_of_the_online_parameters():
    torch.manual_seed(0)
    online, m = _TwoPart(), 0.75
    teacher = MomentumModel(online, m, skip=("head",))
    assert teacher.model.head is None and not any(p.requires_grad for p in teacher.model.parameters())
    expected = {name: p.detach().clone() for name, p in online.body.named_parameters()}
    for step in (lambda p: p.add_(1.0), lambda p: p.copy_(torch.randn_like(p) * 3)):
        with torch.no_grad():
            for p in online.parameters():
                step(p)  # in place, as an optimizer step
        teacher.update(online)
        for name, p in online.body.named_parameters():
            expected[name] = m * expected[name] + (1 - m) * p.detach()
        for name, p in teacher.model.body.named_parameters():
            assert torch.allclose(p, expected[name], atol=1e-6), name
    assert teacher.model.body.weight.data_ptr() != online.body.weight.data_ptr()


def test_word_targets_are_each_captions_distinct_words_without_specials():
    from mmfm.objectives.words import bigram_targets, word_targets

    tok = TextTokenizer(16)
    ids, mask = tok(["a red circle and a red star", "two"])
    targets = word_targets(ids, mask, tok.special_ids, tok.vocab_size)
    words = {int(i) for i in ids[0] if int(i) not in tok.special_ids}
    assert set(targets[0].nonzero().squeeze(1).tolist()) == words
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert targets[:, list(tok.special_ids)].sum() == 0
    pairs = bigram_targets(ids, mask, tok.special_ids, 97)
    assert torch.allclose(pairs[0].sum(), torch.tensor(1.0)) and pairs[1].sum() == 0  # one word: no pair
    swapped = bigram_targets(*tok(["a red star and a red circle"]), tok.special_ids, 97)
    assert not torch.equal(pairs[0], swapped[0])  # same words, other pairs


def test_word_loss_trains_the_vision_side_and_ignores_captions_without_words():
    from mmfm.config import ModelConfig
    from mmfm.models.model import MMFM
    from mmfm.objectives.words import word_loss, word_targets

    torch.manual_seed(0)
    model = MMFM(ModelConfig(width=64, depth=2, heads=2, fusion_layer=1, fusion_mode="cross", img_size=32,
                             patch_size=8, word_head=True, word_bigram_buckets=64))
    ids, mask = model.tokenizer(["a red circle", ""])
    vision = model.encode_vision(torch.randn(2, 3, 32, 32))
    words, bigrams = model.word_logits(vision.tokens)
    assert words.shape == (2, model.tokenizer.vocab_size) and bigrams.shape == (2, 64)
    targets = word_targets(ids, mask, model.tokenizer.special_ids, words.shape[1])
    loss = word_loss(words, targets)
    expected = -(F.log_softmax(words[:1], 1) * targets[:1]).sum()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert model.trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert word_loss(words, torch.zeros_like(words)) == 0
