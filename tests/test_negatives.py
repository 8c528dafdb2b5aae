"""Caption negatives for ITM: re-bound attributes, never a caption that describes the same scene."""

from collections import Counter

import numpy as np
import pytest
import torch

from mmfm.config import ModelConfig, ObjectiveConfig
from mmfm.data import ImageTextDataset, make_collate
from mmfm.data.negatives import CaptionNegatives
from mmfm.models.model import MMFM
from mmfm.tasks.objective import TaskObjective
from mmfm.tokenizers.text import TextTokenizer

GROUPS = [["red", "blue", "green"], ["circle", "square", "star"]]


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_swap_rebinds_attributes_with_the_same_words():
    negatives = CaptionNegatives(GROUPS)
    caption = "a red circle left of a blue square"
    for seed in range(20):
        negative = negatives(caption, _rng(seed))
        assert negative != caption
        assert Counter(negative.split()) == Counter(caption.split())
        assert negative in {"a blue circle left of a red square", "a red square left of a blue circle"}


def test_a_swap_that_describes_the_same_scene_is_replaced_instead():
    negatives = CaptionNegatives(GROUPS)
    caption = "a red circle and a blue circle"
    for seed in range(20):
        negative = negatives(caption, _rng(seed))
        changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
        assert len(changed) == 1, negative
        original, replacement = changed[0]
        assert replacement != original and any({original, replacement} <= set(g) for g in GROUPS)


def test_replace_prob_mixes_one_word_replacements_into_the_swaps():
    caption = "a red circle left of a blue square"
    words = caption.split()

    def replaced(negative):
        changed = [(a, b) for a, b in zip(words, negative.split()) if a != b]
        return len(changed) == 1 and any({a, b} <= set(g) for g in GROUPS for a, b in changed)

    always = CaptionNegatives(GROUPS, replace_prob=1.0)
    assert all(replaced(always(caption, _rng(seed))) for seed in range(50))
    never = CaptionNegatives(GROUPS)
    assert not any(replaced(never(caption, _rng(seed))) for seed in range(50))
    half = CaptionNegatives(GROUPS, replace_prob=0.5)
    share = sum(replaced(half(caption, _rng(seed))) for seed in range(2000)) / 2000
    assert 0.45 < share < 0.55


def test_caption_without_group_words_has_no_negative():
    negatives = CaptionNegatives(GROUPS)
    assert negatives("an empty picture", _rng()) is None
    assert negatives("A Red circle", _rng()) in {"A green circle", "A blue circle", "A Red square", "A Red star"}


@pytest.mark.parametrize("groups", [[["red"]], [["red", "blue"], ["blue", "green"]]])
def test_bad_word_groups_are_rejected(groups):
    with pytest.raises(ValueError, match="group"):
        CaptionNegatives(groups)


def test_dataset_and_objective_use_caption_negatives(tiny_shapes):
    tokenizer = TextTokenizer(40)
    dataset = ImageTextDataset(str(tiny_shapes / "annotations/pretrain.json"), root=str(tiny_shapes),
                               negatives=CaptionNegatives([["red", "green", "blue", "yellow", "purple", "orange",
                                                            "white", "gray"]]))
    batch = make_collate(tokenizer, ("text", "negative_text"))([dataset[i] for i in range(8)])
    assert batch["has_negative"].all()
    assert all(n != t for n, t in zip(batch["negative_text"], batch["text"]))
    model = MMFM(ModelConfig(width=64, depth=2, heads=2, fusion_layer=1, fusion_mode="cross"))
    settings = ObjectiveConfig(queue_size=16, loss_weights={"mlm": 0.0})
    objective = TaskObjective(model, settings, ["image_text"], alpha_warmup_steps=1)
    scored = []
    itm_logits = model.itm_logits
    model.itm_logits = lambda text, vision: scored.append(len(text.x)) or itm_logits(text, vision)
    losses = objective("image_text", batch)
    assert torch.isfinite(losses["itm"])
    assert scored == [3 * 8 + 8]  # positives, two in-batch hard negatives each, one caption negative each
