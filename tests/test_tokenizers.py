"""Text BPE with BERT-style specials; native-aspect image tokenizer; video frame layout."""

import pytest
import torch
from PIL import Image

from mmfm.errors import ConfigError, InputError
from mmfm.models.trunk import UnifiedTrunk
from mmfm.tokenizers.image import ImageTokenizer, native_grid_size
from mmfm.tokenizers.text import TextTokenizer
from mmfm.tokenizers.video import VideoTokenizer, trim_for_tubelets


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(context_length=12)


# ---- text --------------------------------------------------------------------------------------------


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


# ---- image (native aspect) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ((224, 224), (224, 224)),
        ((100, 300), (112, 304)),   # long side rounded up to 304, short 100*304/300 = 101.3 -> 112
        ((300, 100), (304, 112)),
        ((1000, 500), (512, 256)),  # capped at 512
        ((20, 1000), (16, 512)),    # short side never below one patch
        ((7, 9), (16, 16)),
    ],
)
def test_native_grid_size(size, expected):
    assert native_grid_size(*size, patch_size=16, max_side=512) == expected


def test_image_tokenizer_outputs_patch_multiples_for_the_trunk():
    tok = ImageTokenizer(patch_size=8, max_side=64)
    images = [Image.new("RGB", (50, 20), (255, 0, 0)), torch.randint(0, 256, (3, 70, 40), dtype=torch.uint8),
              Image.new("L", (33, 33), 128)]
    pixels = tok(images)
    assert [tuple(p.shape) for p in pixels] == [(3, 24, 56), (3, 64, 40), (3, 40, 40)]
    red = pixels[0][:, 10, 10]
    assert torch.allclose(red, (torch.tensor([1.0, 0, 0]) - torch.tensor(tok.mean)) / torch.tensor(tok.std))
    trunk = UnifiedTrunk(width=32, depth=1, num_heads=2, img_size=32, patch_size=8, vocab_size=10)
    batch = trunk.embed_images_packed(pixels)
    assert batch.packed.lengths == [1 + 3 * 7, 1 + 8 * 5, 1 + 5 * 5]


def test_image_tokenizer_rejects_bad_input():
    with pytest.raises(InputError, match="multiple"):
        ImageTokenizer(patch_size=16, max_side=100)
    with pytest.raises(InputError, match="PIL image"):
        ImageTokenizer()(torch.zeros(4, 4))


# ---- video -------------------------------------------------------------------------------------------


def test_trim_for_tubelets():
    assert [trim_for_tubelets(n, 4) for n in (1, 4, 5, 8, 9, 12)] == [1, 1, 5, 5, 9, 9]
    assert trim_for_tubelets(7, 1) == 7


def test_video_tokenizer_layout_and_tubelet_trim():
    frames = torch.randint(0, 256, (8, 30, 60, 3), dtype=torch.uint8)
    clip = VideoTokenizer(patch_size=8, max_side=32, tubelet_size=2)(frames)
    assert clip.shape == (7, 3, 16, 32)
    trunk = UnifiedTrunk(width=32, depth=1, num_heads=2, img_size=32, patch_size=8, vocab_size=10, tubelet_size=2)
    assert trunk.embed_video(clip[None]).x.shape == (1, 1 + 4 * 8, 32)
    with pytest.raises(InputError, match="T, H, W, C"):
        VideoTokenizer()(torch.zeros(3, 3, 8, 8))
