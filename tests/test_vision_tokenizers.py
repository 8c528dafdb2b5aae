"""Vision tokenizers: the registry, every tokenizer through the trunk, tubelet inflation, early convolutions."""

import pytest
import torch
from torch import nn

import mmfm
from mmfm.errors import ModelError
from mmfm.layers.rolling import roll_index
from mmfm.models.trunk import IMAGE, VIDEO, UnifiedTrunk
from mmfm.tokenizers import vision
from mmfm.tokenizers.vision import (
    VisionTokenizer,
    create_vision_tokenizer,
    list_vision_tokenizers,
    register_vision_tokenizer,
)

PATCH, SIZE, WIDTH = 8, 32, 32
# tokenizer -> (kwargs, frames of a test clip, token frames it gives)
TOKENIZERS = {
    "patch": ({}, 3, 3),
    "conv": ({}, 3, 3),
    "patch_conv": ({}, 3, 3),
    "tubelet": ({"tubelet_size": 2}, 5, 3),
    # stride 8: a 4x4 grid at 32 px; zero_init_last (a timm kwarg) would zero the residual branches' gradients
    "backbone": ({"name": "resnet18", "out_index": 2, "zero_init_last": False}, 3, 3),
    # an untrained C-ViViT (an architecture instead of a checkpoint), fine-tuned: its parameters take gradient
    "cvivit": ({"arch": {"img_size": SIZE, "patch_size": PATCH, "tubelet_size": 2, "width": 32, "heads": 2,
                         "spatial_depth": 1, "temporal_depth": 1, "levels": [5, 5, 5]}, "frozen": False}, 5, 3),
}


def trunk_with(name: str, /, **kwargs) -> UnifiedTrunk:
    torch.manual_seed(0)
    return UnifiedTrunk(width=WIDTH, depth=2, num_heads=2, fusion_layer=1, img_size=SIZE, patch_size=PATCH,
                        vocab_size=10, max_frames=8, vision_tokenizer=name,
                        vision_tokenizer_kwargs=kwargs or TOKENIZERS[name][0])


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---- registry ----------------------------------------------------------------------------------------


def test_every_tokenizer_is_registered_and_public():
    assert list_vision_tokenizers() == sorted(TOKENIZERS)
    assert mmfm.list_vision_tokenizers() == list_vision_tokenizers()


def test_unknown_tokenizer_names_the_choices():
    with pytest.raises(ModelError, match="'pixels'.*backbone, conv, cvivit, patch, patch_conv, tubelet"):
        create_vision_tokenizer("pixels", WIDTH, SIZE, PATCH)


@pytest.mark.parametrize("name, kwargs", [("patch", {"tubelet_size": 2}), ("conv", {"depth": 3}),
                                          ("backbone", {"name": "resnet18", "no_such_arg": 1})])
def test_unexpected_kwargs_name_the_config_key(name, kwargs):
    with pytest.raises(ModelError, match="model.vision_tokenizer_kwargs"):
        create_vision_tokenizer(name, WIDTH, SIZE, PATCH, **kwargs)


def test_backbone_needs_a_known_timm_name():
    with pytest.raises(ModelError, match="vision_tokenizer_kwargs.name"):
        create_vision_tokenizer("backbone", WIDTH, SIZE, PATCH)
    with pytest.raises(ModelError, match="'no_such_net' is not a timm model"):
        create_vision_tokenizer("backbone", WIDTH, SIZE, PATCH, name="no_such_net")


def test_a_registered_class_is_a_new_tokenizer(monkeypatch):
    monkeypatch.setattr(vision, "_TOKENIZERS", dict(vision._TOKENIZERS))

    @register_vision_tokenizer("pool")
    class PoolTokenizer(VisionTokenizer):
        def __init__(self, width, img_size, patch_size, in_chans=3):
            super().__init__()
            self.patch_size, self.proj = patch_size, nn.Linear(in_chans, width)

        def grid_for(self, img_size):
            return img_size // self.patch_size, img_size // self.patch_size

        def forward(self, frames):
            pooled = nn.functional.avg_pool2d(frames, self.patch_size)
            return self.proj(pooled.flatten(2).transpose(1, 2)), tuple(pooled.shape[-2:])

    assert "pool" in list_vision_tokenizers()
    trunk = UnifiedTrunk(width=WIDTH, depth=1, num_heads=2, img_size=SIZE, patch_size=PATCH, vocab_size=10,
                         vision_tokenizer="pool")
    assert trunk.embed_video(randn(2, 3, 3, SIZE, SIZE)).x.shape == (2, 1 + 3 * 16, WIDTH)


# ---- every tokenizer through the trunk ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_images_and_videos_through_the_trunk(name):
    trunk = trunk_with(name)
    _, frames, token_frames = TOKENIZERS[name]
    per_frame = trunk.grid[0] * trunk.grid[1]
    assert trunk.grid == (4, 4) and trunk.pos_embed.shape == (1, 1 + per_frame, WIDTH)
    image = trunk.embed_image(randn(2, 3, SIZE, SIZE))
    assert image.x.shape == (2, 1 + per_frame, WIDTH) and image.roll is None
    video = trunk.embed_video(randn(2, frames, 3, SIZE, SIZE))
    assert video.x.shape == (2, 1 + token_frames * per_frame, WIDTH)
    assert torch.equal(video.roll, roll_index(token_frames, per_frame))
    wide = trunk.embed_image(randn(1, 3, SIZE, 2 * SIZE))  # position embedding resampled to a 4x8 grid
    assert wide.x.shape == (1, 1 + 2 * per_frame, WIDTH)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_gradients_reach_every_tokenizer_parameter(name):
    trunk = trunk_with(name).train()
    _, frames, _ = TOKENIZERS[name]
    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.1)
    for _ in range(2):  # the second step: zero-initialised branches (patch_conv) pass gradient once they moved
        optimizer.zero_grad()
        image = trunk.unimodal(trunk.embed_image(randn(2, 3, SIZE, SIZE))).x
        video = trunk.unimodal(trunk.embed_video(randn(2, frames, 3, SIZE, SIZE, seed=1))).x
        (image.pow(2).mean() + video.pow(2).mean()).backward()
        optimizer.step()
    params = dict(trunk.vision_tokenizer.named_parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values()), \
        [n for n, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]


@pytest.mark.parametrize("name", ["patch", "conv", "patch_conv", "tubelet", "cvivit"])
def test_sizes_off_the_patch_grid_are_clear_errors(name):
    trunk = trunk_with(name)
    with pytest.raises(ModelError, match="30x32 is not a multiple of patch 8"):
        trunk.embed_image(randn(1, 3, 30, 32))


def test_bad_pixel_layouts_are_clear_errors():
    trunk = trunk_with("patch")
    with pytest.raises(ModelError, match=r"\(B, C, H, W\) images with C=3"):
        trunk.embed_image(randn(1, 4, SIZE, SIZE))
    with pytest.raises(ModelError, match=r"\(B, T, C, H, W\) clips"):
        trunk.embed_video(randn(1, 3, SIZE, SIZE))


# ---- tubelet -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_still_clip_embeds_like_its_image():
    trunk = trunk_with("tubelet").eval()
    image = randn(1, 3, SIZE, SIZE)
    still = image[:, None].expand(1, 5, 3, SIZE, SIZE)
    tokens, _ = trunk.vision_tokenizer.forward_video(still)
    image_tokens, _ = trunk.vision_tokenizer(image)
    assert tokens.shape[1] == 3, "first frame alone + two 2-frame tubelets"
    for frame in range(3):
        assert max_diff(tokens[:, frame], image_tokens) <= 1e-5
    # through the trunk: every token-frame is the image's tokens, moved by its temporal embedding only
    video = trunk.embed_video(still).x[0, 1:].view(3, 16, WIDTH) - trunk.temporal_embed[0, :3, None]
    expected = trunk.embed_image(image).x[0, 1:] - trunk.type_embed[IMAGE] + trunk.type_embed[VIDEO]
    assert max_diff(video, expected.expand_as(video)) <= 1e-5


def test_tubelet_kernel_is_the_inflated_patch_kernel():
    tokenizer = trunk_with("tubelet", tubelet_size=4).vision_tokenizer
    assert tokenizer.tubelet_proj.weight.shape[2:] == (4, PATCH, PATCH)
    expected = tokenizer.proj.weight[:, :, None].expand_as(tokenizer.tubelet_proj.weight) / 4
    assert torch.equal(tokenizer.tubelet_proj.weight, expected)
    assert torch.equal(tokenizer.tubelet_proj.bias, tokenizer.proj.bias)


@torch.no_grad()
def test_tubelet_clips_need_one_plus_whole_tubelets():
    trunk = trunk_with("tubelet", tubelet_size=4)
    for frames, token_frames in [(1, 1), (5, 2), (9, 3)]:
        batch = trunk.embed_video(randn(2, frames, 3, SIZE, SIZE))
        assert batch.x.shape == (2, 1 + token_frames * 16, WIDTH)
    for frames in (2, 4, 8):
        with pytest.raises(ModelError, match=r"1 \+ k\*4"):
            trunk.embed_video(randn(1, frames, 3, SIZE, SIZE))
    packed = trunk.embed_videos_packed([randn(5, 3, SIZE, SIZE), randn(9, 3, SIZE, SIZE)])
    assert packed.packed.lengths == [1 + 2 * 16, 1 + 3 * 16]
    with pytest.raises(ModelError, match="tubelet_size"):
        trunk_with("tubelet", tubelet_size=0)


# ---- conv --------------------------------------------------------------------------------------------


def test_conv_stem_halves_to_the_patch_grid():
    tokenizer = create_vision_tokenizer("conv", 64, SIZE, 16)
    convs = [m for m in tokenizer.stem if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4, "log2(16) stride-2 convs"
    assert [c.out_channels for c in convs] == [8, 16, 32, 64]
    assert tokenizer.proj.kernel_size == (1, 1)
    tokens, grid = tokenizer(randn(2, 3, 48, 80))
    assert grid == (3, 5) and tokens.shape == (2, 15, 64)
    with pytest.raises(ModelError, match="power of two"):
        create_vision_tokenizer("conv", 64, 36, 12)


@torch.no_grad()
def test_conv_tokens_do_not_depend_on_the_batch():
    tokenizer = create_vision_tokenizer("conv", WIDTH, SIZE, PATCH).train()
    images = randn(4, 3, SIZE, SIZE)
    assert max_diff(tokenizer(images)[0][:1], tokenizer(images[:1])[0]) <= 1e-5


# ---- backbone ----------------------------------------------------------------------------------------


@torch.no_grad()
def test_backbone_video_gets_the_trunks_temporal_embedding_and_rolling():
    trunk = trunk_with("backbone").eval()
    still = randn(1, 3, SIZE, SIZE)[:, None].expand(1, 3, 3, SIZE, SIZE)
    video = trunk.embed_video(still)
    assert torch.equal(video.roll, roll_index(3, 16))
    frames = video.x[0, 1:].view(3, 16, WIDTH) - trunk.temporal_embed[0, :3, None]
    assert max_diff(frames, frames[:1].expand_as(frames)) <= 1e-5, "frames differ only by the temporal embedding"
    assert max_diff(video.x[0, 1:17], video.x[0, 17:33]) > 1e-3


# ---- patch_conv --------------------------------------------------------------------------------------


@torch.no_grad()
def test_patch_conv_starts_as_the_linear_patchify_and_its_conv_branch_is_live():
    hybrid = create_vision_tokenizer("patch_conv", WIDTH, SIZE, PATCH)
    plain = create_vision_tokenizer("patch", WIDTH, SIZE, PATCH)
    plain.proj.load_state_dict(hybrid.proj.state_dict())
    images = randn(3, 3, SIZE, SIZE)
    assert torch.equal(hybrid(images)[0], plain(images)[0]), "the conv branch's 1x1 output starts at zero"
    assert [m.stride for m in hybrid.stem if isinstance(m, nn.Conv2d)] == [(2, 2)] * 3, "log2(8) stride-2 convs"
    nn.init.normal_(hybrid.conv_proj.weight)
    moved = hybrid(images)[0]
    assert max_diff(moved, plain(images)[0]) > 1e-2
    assert max_diff(hybrid(images[:1])[0], moved[:1]) <= 1e-5, "GroupNorm: an image's tokens do not depend on its batch"
