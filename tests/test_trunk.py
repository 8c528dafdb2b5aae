"""UnifiedTrunk: timm ViT oracle, packing, temporal rolling, fusion modes, gradient checkpointing.

The vision tokenizers themselves (patch, conv, backbone, tubelet) are tested in test_vision_tokenizers.py.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

import mmfm.layers.attention as attn_mod
from mmfm.config import ModelConfig
from mmfm.data.transforms import native_size
from mmfm.errors import ModelError
from mmfm.layers.rolling import roll_index
from mmfm.models.model import MMFM
from mmfm.models.trunk import TokenBatch, UnifiedTrunk, cat_packed

PATCH, SIZE = 8, 32
PER_FRAME = (SIZE // PATCH) ** 2  # 16 patches, fold 2


def small_trunk(**kwargs) -> UnifiedTrunk:
    torch.manual_seed(0)
    options = {"width": 64, "depth": 4, "num_heads": 2, "fusion_layer": 2, "img_size": SIZE, "patch_size": PATCH,
               "vocab_size": 100, "context_length": 16, "max_frames": 8}
    return UnifiedTrunk(**{**options, **kwargs}).eval()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---- timm oracle -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


@torch.no_grad()
def test_forward_image_equals_timm_forward_features(timm_vit):
    trunk = UnifiedTrunk.from_timm(timm_vit).eval()
    x = randn(2, 3, 224, 224)
    assert max_diff(trunk.forward_image(x), timm_vit.forward_features(x)) <= 1e-4


@torch.no_grad()
def test_non_224_size_equals_timm_dynamic_img_size(timm_vit):
    dynamic = timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    dynamic.load_state_dict(timm_vit.state_dict())
    trunk = UnifiedTrunk.from_timm(timm_vit).eval()
    x = randn(1, 3, 160, 288)
    assert max_diff(trunk.forward_image(x), dynamic.forward_features(x)) <= 1e-4


def test_from_timm_rejects_register_vits():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, reg_tokens=4, depth=1)
    with pytest.raises(ModelError, match="registers"):
        UnifiedTrunk.from_timm(vit)


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)


def test_from_timm_puts_the_patch_embedding_in_the_vision_tokenizer(tiny_vit):
    state = UnifiedTrunk.from_timm(tiny_vit).state_dict()
    assert not any(key.startswith("patch_embed.") for key in state)
    assert torch.equal(state["vision_tokenizer.proj.weight"], tiny_vit.patch_embed.proj.weight)
    assert torch.equal(state["vision_tokenizer.proj.bias"], tiny_vit.patch_embed.proj.bias)


def test_from_timm_inflates_the_loaded_patch_embedding_into_tubelets(tiny_vit):
    tokenizer = UnifiedTrunk.from_timm(tiny_vit, vision_tokenizer="tubelet").vision_tokenizer
    expected = tiny_vit.patch_embed.proj.weight[:, :, None] / 2
    assert torch.equal(tokenizer.tubelet_proj.weight, expected.expand_as(tokenizer.tubelet_proj.weight))
    assert torch.equal(tokenizer.tubelet_proj.bias, tiny_vit.patch_embed.proj.bias)


def test_timm_weights_need_a_patch_tokenizer_of_the_same_shape(tiny_vit):
    with pytest.raises(ModelError, match="no linear patch embedding"):
        UnifiedTrunk.from_timm(tiny_vit, vision_tokenizer="conv")
    narrow = UnifiedTrunk(width=96, depth=1, num_heads=3, img_size=224, patch_size=16)
    with pytest.raises(ModelError, match="does not fit the trunk"):
        narrow.load_timm(tiny_vit)


# ---- packing -----------------------------------------------------------------------------------------


@pytest.fixture
def padded_calls(monkeypatch):
    """Query lengths of every padded-backend call: packing must never attend over the whole pack."""
    calls = []
    for name, fn in list(attn_mod._PADDED.items()):
        def spy(q, k, v, mask, causal, fn=fn):
            calls.append(q.shape[-2])
            return fn(q, k, v, mask, causal)

        monkeypatch.setitem(attn_mod._PADDED, name, spy)
    return calls


def _alone(trunk, batches: list[TokenBatch]) -> torch.Tensor:
    """Each single-sample batch through the unimodal layers alone, concatenated along tokens."""
    return torch.cat([trunk.unimodal(b).x[0] for b in batches])


@torch.no_grad()
def test_packed_texts_equal_each_text_alone(padded_calls):
    trunk = small_trunk(context_length=77)
    lengths = torch.randint(4, 78, (24,), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 100, (24, 77), generator=torch.Generator().manual_seed(2))
    mask = torch.arange(77)[None] < lengths[:, None]
    packed = trunk.unimodal(trunk.embed_texts_packed(ids, mask)).x
    alone = _alone(trunk, [trunk.embed_text(ids[i:i + 1, :n]) for i, n in enumerate(lengths.tolist())])
    assert max_diff(packed, alone) <= 1e-5
    assert padded_calls and max(padded_calls) == lengths.max() < len(packed)


@torch.no_grad()
def test_packed_images_of_different_sizes_equal_each_alone(padded_calls):
    trunk = small_trunk()
    images = [randn(3, 32, 32, seed=1), randn(3, 16, 48, seed=2), randn(3, 64, 24, seed=3), randn(3, 8, 8, seed=4)]
    packed = trunk.unimodal(trunk.embed_images_packed(images)).x
    alone = _alone(trunk, [trunk.embed_image(img[None]) for img in images])
    assert max_diff(packed, alone) <= 1e-5
    assert max(padded_calls) < len(packed)


def test_native_aspect_sizes_pack_on_the_patch_grid():
    trunk = small_trunk()
    sizes = [native_size(width, height, SIZE, PATCH) for width, height in [(50, 20), (40, 70), (33, 33)]]
    assert sizes == [(16, 32), (32, 24), (32, 32)]
    batch = trunk.embed_images_packed([randn(3, *size) for size in sizes])
    assert batch.packed.lengths == [1 + 2 * 4, 1 + 4 * 3, 1 + 4 * 4]


@torch.no_grad()
def test_packed_videos_of_different_lengths_equal_each_alone(padded_calls):
    trunk = small_trunk()
    videos = [randn(t, 3, SIZE, SIZE, seed=t) for t in (4, 1, 3, 4, 2)]
    batch = trunk.embed_videos_packed(videos)
    assert batch.roll is not None and batch.packed.lengths == [1 + t * PER_FRAME for t in (4, 1, 3, 4, 2)]
    packed = trunk.unimodal(batch).x
    alone = _alone(trunk, [trunk.embed_video(v[None]) for v in videos])
    assert max_diff(packed, alone) <= 1e-5
    assert max(padded_calls) < len(packed)


@torch.no_grad()
def test_packed_layers_equal_padded_layers_with_mask():
    trunk = small_trunk()
    ids = torch.randint(0, 100, (5, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(16)[None] < torch.tensor([16, 4, 9, 1, 12])[:, None]
    padded = trunk.unimodal(trunk.embed_text(ids, mask)).x[mask]
    assert max_diff(trunk.unimodal(trunk.embed_texts_packed(ids, mask)).x, padded) <= 1e-5


# ---- rolling -----------------------------------------------------------------------------------------


def reference_roll(x: torch.Tensor, frames: int, per_frame: int) -> torch.Tensor:
    """All-in-One rolling written with torch.roll on (B, 1 + T*N, D): fold = N // 8, +1 / -1 frame."""
    fold = per_frame // 8
    cls, body = x[:, :1], x[:, 1:].unflatten(1, (frames, per_frame))
    rolled = body.clone()
    rolled[:, :, :fold] = body[:, :, :fold].roll(1, dims=1)
    rolled[:, :, per_frame - fold:] = body[:, :, per_frame - fold:].roll(-1, dims=1)
    return torch.cat([cls, rolled.flatten(1, 2)], dim=1)


@pytest.mark.parametrize("frames, per_frame", [(4, 16), (3, 196), (2, 7), (5, 64)])
def test_roll_index_matches_torch_roll(frames, per_frame):
    x = torch.arange(1 + frames * per_frame, dtype=torch.float)[None, :, None]
    rolled = x[:, roll_index(frames, per_frame)]
    assert torch.equal(rolled, reference_roll(x, frames, per_frame))
    fold = per_frame // 8
    assert (rolled != x).sum().item() == 2 * fold * frames
    assert rolled[0, 0, 0] == 0, "CLS stays"


def test_roll_moves_only_the_fold_tokens():
    frames, per_frame = 4, 16
    x = torch.arange(1 + frames * per_frame, dtype=torch.float)[None, :, None]
    changed = (x[:, roll_index(frames, per_frame)] != x)[0, 1:, 0].view(frames, per_frame)
    expected = torch.zeros(per_frame, dtype=torch.bool)
    expected[:2] = expected[-2:] = True
    assert torch.equal(changed, expected.expand(frames, -1))


def test_roll_is_identity_for_one_frame():
    assert torch.equal(roll_index(1, 196), torch.arange(197))
    assert small_trunk().embed_video(randn(2, 1, 3, SIZE, SIZE)).roll is None


class RollRecorder:
    """Hooks every block: the block's input and what its first norm sees (the rolled input)."""

    def __init__(self, trunk):
        self.inputs, self.rolled = [], []
        self.handles = []
        for block in trunk.blocks:
            self.handles.append(block.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0])))
            self.handles.append(block.norm1.register_forward_pre_hook(lambda m, args: self.rolled.append(args[0])))

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def test_rolling_in_every_unimodal_and_joint_layer():
    trunk = small_trunk()
    frames = 4
    video = trunk.unimodal(trunk.embed_video(randn(2, frames, 3, SIZE, SIZE)))
    text = trunk.unimodal(trunk.embed_text(torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.bool)))
    recorder = RollRecorder(trunk)
    trunk.unimodal(trunk.embed_video(randn(2, frames, 3, SIZE, SIZE)))
    trunk.fuse(text, video)
    recorder.remove()
    assert len(recorder.inputs) == trunk.depth
    for layer, (x, seen) in enumerate(zip(recorder.inputs, recorder.rolled)):
        text_len = 0 if layer < trunk.fusion_layer else 7
        assert torch.equal(seen[:, :text_len], x[:, :text_len]), "text part must not roll"
        assert torch.equal(seen[:, text_len:], reference_roll(x[:, text_len:], frames, PER_FRAME)), layer


@torch.no_grad()
def test_rolling_changes_video_features_but_not_images():
    rolled, plain = small_trunk(), small_trunk(rolling=False)
    clip, image = randn(1, 3, 3, SIZE, SIZE), randn(1, 3, SIZE, SIZE)
    assert max_diff(rolled.unimodal(rolled.embed_video(clip)).x, plain.unimodal(plain.embed_video(clip)).x) > 1e-3
    assert torch.equal(rolled.unimodal(rolled.embed_image(image)).x, plain.unimodal(plain.embed_image(image)).x)


# ---- fusion ------------------------------------------------------------------------------------------


def _text_and_image(trunk):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.arange(9)[None] < torch.tensor([9, 5])[:, None]
    return trunk.unimodal(trunk.embed_text(ids, mask)), trunk.unimodal(trunk.embed_image(randn(2, 3, SIZE, SIZE)))


@torch.no_grad()
def test_cross_fusion_keeps_vision_and_differs_from_joint():
    cross, joint = small_trunk(fusion_mode="cross"), small_trunk(fusion_mode="joint")
    text, vision = _text_and_image(cross)
    vision_before = vision.x.clone()
    fused = cross.fuse(text, vision)
    assert torch.equal(vision.x, vision_before)
    assert fused.x.shape[1] == text.x.shape[1], "cross fusion returns (and updates) the text tokens only"
    joint_text = joint.fuse(text, vision).x[:, : text.x.shape[1]]
    assert max_diff(fused.x, joint_text) > 1e-4
    other_vision = replace_x(vision, randn(*vision.x.shape, seed=9))
    assert max_diff(cross.fuse(text, other_vision).x, fused.x) > 1e-4, "text must attend to the vision tokens"


def replace_x(batch: TokenBatch, x: torch.Tensor) -> TokenBatch:
    return TokenBatch(x, batch.mask, batch.roll, batch.packed)


def _grads(trunk, checkpointing: bool, run) -> dict:
    trunk.train().set_grad_checkpointing(checkpointing)
    trunk.zero_grad()
    run(trunk).pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in trunk.named_parameters() if p.grad is not None}


def _unimodal_video(trunk):
    return trunk.unimodal(trunk.embed_video(randn(2, 3, 3, SIZE, SIZE))).x


def _fused(trunk):
    return trunk.fuse(*_text_and_image(trunk)).x


@pytest.mark.parametrize("mode, run", [("joint", _unimodal_video), ("joint", _fused), ("cross", _fused)])
def test_gradient_checkpointing_gives_identical_gradients(mode, run):
    trunk = small_trunk(fusion_mode=mode, drop_path_rate=0.0)
    plain, checkpointed = _grads(trunk, False, run), _grads(trunk, True, run)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        assert max_diff(plain[name], checkpointed[name]) <= 1e-6, name



@pytest.mark.parametrize("mode, run", [("joint", _unimodal_video), ("joint", _fused), ("cross", _fused)])
def test_key_bias_is_inert_and_gets_no_gradient(mode, run):
    trunk = small_trunk(fusion_mode=mode, drop_path_rate=0.0)
    width = trunk.blocks[0].attn.qkv.weight.shape[1]
    grads = _grads(trunk, False, run)
    for i, block in enumerate(trunk.blocks):
        grad = grads.get(f"blocks.{i}.attn.qkv.bias")
        if grad is not None:
            assert grad[width:2 * width].abs().max() == 0, i
            assert grad[:width].abs().max() > 0 and grad[2 * width:].abs().max() > 0, i
    trunk.eval()
    with torch.no_grad():
        before = run(trunk)
        for block in trunk.blocks:
            block.attn.qkv.bias[width:2 * width] = 5.0
        assert torch.equal(run(trunk), before), "a key bias must not change attention (softmax cancels it)"


# ---- mixed batch through the whole model -------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    cfg = ModelConfig(width=64, depth=4, heads=2, fusion_layer=2, img_size=SIZE, patch_size=PATCH,
                      context_length=16, max_frames=4, embed_dim=32)
    return MMFM(cfg).eval()


@torch.no_grad()
def test_mixed_text_image_video_batch_in_one_forward(small_model):
    model, trunk = small_model, small_model.trunk
    ids, mask = model.tokenizer(["a red circle", "two blue squares move left", "a green triangle"])
    images = [randn(3, SIZE, SIZE, seed=1), randn(3, 16, 40, seed=2), randn(3, SIZE, SIZE, seed=3)]
    videos = [randn(4, 3, SIZE, SIZE, seed=4), randn(2, 3, SIZE, SIZE, seed=5), randn(3, 3, SIZE, SIZE, seed=6)]
    mixed = cat_packed(trunk.embed_texts_packed(ids, mask), trunk.embed_images_packed(images),
                       trunk.embed_videos_packed(videos))
    cls = trunk.unimodal(mixed).cls()
    text_feat = F.normalize(model.text_proj(trunk.norm(cls[:3])), dim=-1)
    vision_feat = F.normalize(model.vision_proj(trunk.norm(cls[3:])), dim=-1)
    assert torch.isfinite(text_feat).all() and torch.isfinite(vision_feat).all()
    assert max_diff(text_feat, model.encode_text(ids, mask).feat) <= 1e-5
    assert max_diff(vision_feat[:1], model.encode_vision(images[0][None]).feat) <= 1e-5
    assert max_diff(vision_feat[3:4], model.encode_vision(videos[0][None]).feat) <= 1e-5

    text = model.encode_text(ids, mask).tokens
    same_size = torch.stack([images[0], images[2], images[0]])
    clips = torch.stack([videos[0], videos[0], videos[0]])
    for vision in (model.encode_vision(same_size).tokens, model.encode_vision(clips).tokens):
        logits = model.itm_logits(text, vision)
        assert logits.shape == (3, 2) and torch.isfinite(logits).all()


def test_model_builds_its_trunk_with_the_vision_tokenizer_and_attention_backend():
    cfg = ModelConfig(width=32, depth=2, heads=2, fusion_layer=2, img_size=SIZE, patch_size=PATCH, context_length=16,
                      embed_dim=16, vision_tokenizer="tubelet", vision_tokenizer_kwargs={"tubelet_size": 3})
    model = MMFM(cfg, attention_backend="math")
    assert model.trunk.vision_tokenizer.tubelet_size == 3
    assert {block.attn.backend for block in model.trunk.blocks} == {"math"}
    assert not model.trunk.fuses and small_trunk().fuses
    assert "trunk.vision_tokenizer.proj.weight" in model.state_dict()


@pytest.mark.parametrize("bigram", [True, False])
def test_text_token_sees_the_previous_word_only_with_text_bigram(bigram):
    trunk = small_trunk(text_bigram=bigram)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    changed = ids.clone()
    changed[0, 2] = 9
    with torch.no_grad():
        before, after = trunk.embed_text(ids).x, trunk.embed_text(changed).x
    moved = (before - after).abs().amax(-1)[0]
    assert moved[2] > 0 and moved[:2].max() == 0 and moved[4] == 0, "only the word and its successor may move"
    assert (moved[3] > 0) == bigram


def test_vision_depth_runs_vision_through_the_fusion_layers_with_the_same_weights():
    from mmfm.config import ModelConfig
    from mmfm.models.model import MMFM

    torch.manual_seed(0)
    model = MMFM(ModelConfig(width=32, depth=3, heads=2, fusion_layer=1, fusion_mode="cross", vision_depth=-1,
                             img_size=16, patch_size=8)).eval()
    pixels = torch.randn(2, 3, 16, 16)
    trunk = model.trunk
    assert trunk.vision_depth == 3
    expected = trunk.run_layers(trunk.embed_image(pixels), 0, 3).x
    assert torch.allclose(model.encode_vision(pixels).tokens.x, expected)
    assert torch.allclose(trunk.forward_image(pixels), trunk.norm(expected))
    ids, mask = model.tokenizer(["a red circle", "two shapes"])
    assert model.encode_text(ids, mask).tokens.x.shape[1] == ids.shape[1]
    fused = model.fuse(model.encode_text(ids, mask).tokens, model.encode_vision(pixels).tokens)
    assert fused.x.shape == (2, ids.shape[1], 32)
    scaled = {id(p) for p in model.fusion_parameters()}
    assert not any(id(p) in scaled for p in model.trunk.blocks.parameters())  # the image encoder's layers too
    assert all(id(p) in scaled for p in model.itm_head.parameters())


@pytest.mark.parametrize("mode, vision_depth", [("joint", 3), ("joint", -1), ("cross", 4)])
def test_vision_depth_past_the_fusion_point_needs_cross_mode_within_depth(mode, vision_depth):
    with pytest.raises(ModelError, match="model.vision_depth"):
        UnifiedTrunk(width=32, depth=3, num_heads=2, fusion_layer=1, fusion_mode=mode, vision_depth=vision_depth,
                     img_size=16, patch_size=8)
