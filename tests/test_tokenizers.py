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
