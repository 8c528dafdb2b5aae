"""Text BPE with BERT-style specials (vision tokenizers: test_vision_tokenizers.py)."""

import pytest
import torch

from mmfm.errors import ConfigError
from mmfm.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(context_length=12)


def test_special_ids_are_distinct_from_every_bpe_id(tok):
    cls_id, sep_id, mask_id, pad_id = tok.special_ids
    assert len(set(tok.special_ids)) == 4
    assert mask_id >= tok.bpe_size and pad_id >= tok.bpe_size and tok.vocab_size == tok.bpe_size + 2
    words = set(tok._bpe.encoder.values()) - {cls_id, sep_id}
    assert words.isdisjoint(tok.special_ids)
    assert tok._bpe.encoder["<start_of_text>"] == cls_id and tok._bpe.encoder["<end_of_text>"] == sep_id


def test_layout_cls_words_sep_then_padding(tok):
    ids, mask = tok(["a red circle", "a big blue square above a small green triangle"])
    assert ids[:, 0].eq(tok.cls_id).all()
    for row in range(2):
        n = int(mask[row].sum())
        assert ids[row, n - 1] == tok.sep_id
        assert ids[row, n:].eq(tok.pad_id).all() and mask[row, :n].all() and not mask[row, n:].any()
    assert torch.equal(mask, ids != tok.pad_id)
    assert not (ids[mask] == tok.mask_id).any()


def test_truncation_keeps_sep(tok):
    long_text = " ".join(["circle"] * 50)
    ids, mask = tok([long_text, "dot"])
    assert ids.shape[1] == tok.context_length and mask[0].all()
    assert ids[0, -1] == tok.sep_id and ids[0, 0] == tok.cls_id
    assert ids[1, 2] == tok.sep_id and mask[1].sum() == 3


def test_padding_to_the_longest_text_only(tok):
    ids, mask = tok(["a", "a red circle"])
    assert ids.shape[1] == int(mask.sum(1).max())


@pytest.mark.parametrize("text", ["a red circle moves left", "two blue squares", "the triangle is above it"])
def test_decode_round_trip(tok, text):
    ids, mask = tok([text])
    assert tok.decode(ids[0][mask[0]].tolist()) == text
    assert tok.decode(ids[0].tolist()) == text, "specials and padding are dropped"


def test_single_string_and_pickle_round_trip(tok):
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone("a red circle")[0], tok(["a red circle"])[0])


def test_context_length_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="context_length"):
        TextTokenizer(context_length=2)


# ---- bounded work and memory (issue #17): caps that never change the ids of normal text -----------------

REAL_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play on the beach &amp; the sun sets behind them...",
    "a close-up of a stop sign with graffiti, 2 cars and 13 pedestrians in the background",
    "Ein Donaudampfschifffahrtsgesellschaftskapitän steht auf dem Deck.",
    "一只猫坐在红色的沙发上，旁边有一只狗在睡觉，窗外下着雨，远处的山上覆盖着白雪。" * 2,
    "東京の夜景を見下ろす高層ビルの屋上で、二人の友人が写真を撮っている。",
    "photo from https://example.com/images/2021/beach_sunset.jpg?size=large&id=42",
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a long word!!! 😀🎉",
    "  lots   of \n whitespace\tand  CAPITALS  ",
    "It's a bird... it's a plane... it's SUPERMAN!",
]


@pytest.fixture(scope="module")
def open_clip_encode():
    """open_clip's own unbounded encoder."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer().encode


def _shapes_captions() -> list[str]:
    import random

    from mmfm.data.shapes import image_captions, sample_image_scenes, sample_video_scenes, video_captions

    rng = random.Random(0)
    images = [c for s in sample_image_scenes("train", 40, 64, 0) for c in image_captions(s["objects"], rng)]
    videos = [c for s in sample_video_scenes("train", 20, 64, 8, 0) for c in video_captions(s["objects"], rng)]
    return images + videos


@pytest.mark.parametrize("context_length", [12, 40, 77])
def test_caps_never_change_the_ids_of_real_text(context_length, open_clip_encode):
    tok = TextTokenizer(context_length=context_length)
    paragraph = " ".join(REAL_CAPTIONS[:4]) * 20  # longer than the character cap of the text
    assert len(paragraph) > tok.max_chars
    for text in [*REAL_CAPTIONS, *_shapes_captions(), paragraph]:
        ids, mask = tok([text])
        expected = [tok.cls_id, *open_clip_encode(text)[: context_length - 2], tok.sep_id]
        assert ids[0][mask[0]].tolist() == expected, text


def test_one_huge_word_tokenizes_fast():
    import random
    import string
    import time

    from mmfm.tokenizers.text import MAX_WORD_CHARS

    tok = TextTokenizer(context_length=40)
    seen = []
    word_bpe = tok._word_bpe
    tok._word_bpe = lambda word: seen.append(len(word)) or word_bpe(word)
    word = "".join(random.Random(0).choices(string.ascii_lowercase, k=60_000))  # unbounded BPE: ~35 s
    start = time.process_time()  # CPU time: other load on the machine does not count
    ids, mask = tok([word, "a red circle " + word])
    # A generous guard against quadratic BPE on the whole word, not a benchmark (capped: ~0.1 s).
    assert time.process_time() - start < 2.0
    assert max(seen) == MAX_WORD_CHARS
    assert mask.all() and ids.shape == (2, 40) and ids[:, -1].eq(tok.sep_id).all()
    assert ids[1, 1:4].tolist() == tok(["a red circle"])[0][0, 1:4].tolist()


def test_caches_stay_within_their_bounds(monkeypatch):
    from mmfm.tokenizers import text

    monkeypatch.setattr(text, "TEXT_CACHE_SIZE", 50)
    monkeypatch.setattr(text, "WORD_CACHE_SIZE", 80)
    tok = TextTokenizer(context_length=16)
    specials = dict(tok._bpe.cache)
    for i in range(300):
        letters = "".join(chr(ord("a") + int(digit)) for digit in str(i))  # digits would be one token each
        tok([f"caption {i} with word{letters} and other{letters}"])
    assert tok._encode.cache_info().currsize == 50
    assert tok._word_bpe.cache_info().currsize == 80
    assert tok._bpe.cache == specials, "open_clip's own per-word dict must not grow"
    assert tok(["<end_of_text>"])[0][0, 1] == tok.sep_id, "specials still map to their ids after evictions"
