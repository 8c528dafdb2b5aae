"""BackboneAdapter: the five mmfm backbones as timm feature extractors and as the trunk's vision input."""

import math

import pytest
import timm
import torch

from mmfm.backbones.adapter import BackboneAdapter, SegmentationModel
from mmfm.config import ModelConfig
from mmfm.errors import ModelError
from mmfm.layers.rolling import roll_index
from mmfm.models.model import MMFM
from mmfm.models.trunk import UnifiedTrunk
from mmfm.objectives.tasks import MultiTaskObjective

# small inputs: fixed-size models are built for a small `input_size`, hierarchical ones take 32 px
BACKBONES = {
    "crossvit_tiny_240": {"input_size": 120},
    "tnt_s_patch16_224": {"input_size": 32},
    "biformer_tiny": {"out_index": 2, "n_win": 4},
    "hornet_tiny_7x7": {"out_index": 2},
    "p2at_small": {"out_index": 2},
}
CAPTIONS = ["a red circle left of a blue square", "a green triangle"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_timm_features_only(name):
    kwargs = {"img_size": BACKBONES[name]["input_size"]} if "input_size" in BACKBONES[name] else {}
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    size = kwargs.get("img_size", 64)
    with torch.no_grad():
        maps = model(torch.randn(1, 3, size, size))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert all(m.dim() == 4 and torch.isfinite(m).all() for m in maps)


def _tiny_model(name: str) -> MMFM:
    cfg = ModelConfig(width=32, depth=2, heads=2, fusion_layer=1, img_size=32, patch_size=8, context_length=16,
                      max_frames=4, embed_dim=16, queue_size=8, momentum=0.0, backbone=name,
                      backbone_kwargs=BACKBONES[name])
    return MMFM(cfg)


def _train_step(model: MMFM, stream: str, pixels: torch.Tensor) -> float:
    objective = MultiTaskObjective(model, {}, [stream], alpha_warmup_steps=1)
    ids, mask = model.tokenizer(CAPTIONS)
    key = "video" if stream == "video_text" else "image"
    batch = {key: pixels, "text_ids": ids, "text_mask": mask, f"{key}_id": [0, 1]}
    model.zero_grad(set_to_none=True)
    loss = objective(stream, batch)["loss"]
    loss.backward()
    return float(loss.detach())


def _backbone_has_grads(model: MMFM) -> bool:
    grads = [p.grad for p in model.vision_adapter.backbone.parameters() if p.requires_grad]
    return any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_training_step_on_images_and_videos(name):
    torch.manual_seed(0)
    model = _tiny_model(name)
    assert math.isfinite(_train_step(model, "image_text", torch.randn(2, 3, 32, 32)))
    assert _backbone_has_grads(model)
    assert math.isfinite(_train_step(model, "video_text", torch.randn(2, 2, 3, 32, 32)))
    assert _backbone_has_grads(model)


def test_video_tokens_follow_embed_video_layout():
    trunk = UnifiedTrunk(width=32, depth=1, num_heads=2, img_size=32, patch_size=8, vocab_size=10, max_frames=4)
    adapter = BackboneAdapter("hornet_tiny_7x7", 32, 64, out_index=1)  # stride 8: 8x8 grid at 64 px
    tokens = adapter(trunk, torch.randn(1, 3, 3, 64, 64))
    per_frame = adapter.grid[0] * adapter.grid[1]
    assert tokens.x.shape == (1, 1 + 3 * per_frame, 32)
    assert torch.equal(tokens.roll, roll_index(3, per_frame))


def test_position_embedding_resampled_for_other_sizes():
    trunk = UnifiedTrunk(width=32, depth=1, num_heads=2, img_size=32, patch_size=8, vocab_size=10)
    adapter = BackboneAdapter("p2at_small", 32, 64, out_index=1)
    assert adapter.grid == (8, 8)
    assert adapter(trunk, torch.randn(2, 3, 96, 128)).x.shape == (2, 1 + 12 * 16, 32)


def test_crossvit_branches_merged_on_the_coarse_grid():
    adapter = BackboneAdapter("crossvit_tiny_240", 32, 64)
    assert adapter.input_size == (240, 240)  # 64 px inputs are resized to the model's fixed size
    assert adapter.grid == (14, 14)  # large-patch branch grid; the 20x20 small-patch branch resampled onto it
    assert adapter.proj.in_features == 96 + 192


def test_tnt_patch_tokens_without_cls():
    adapter = BackboneAdapter("tnt_s_patch16_224", 32, 64, input_size=64)
    assert adapter.grid == (4, 4) and adapter.proj.in_features == 384


def test_pretrained_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("p2at_small")
    save_file(source.state_dict(), str(tmp_path / "p2at.safetensors"))
    adapter = BackboneAdapter("p2at_small", 32, 64, out_index=1, pretrained_file=str(tmp_path / "p2at.safetensors"))
    loaded = adapter.backbone.model.state_dict()
    assert torch.equal(loaded["stages.1.0.conv1.weight"], source.state_dict()["stages.1.0.conv1.weight"])


def test_unknown_backbone_and_bad_index_are_clear_errors():
    with pytest.raises(ModelError, match="not a timm model"):
        BackboneAdapter("no_such_net", 32, 64)
    with pytest.raises(ModelError, match="out_index=9"):
        BackboneAdapter("hornet_tiny_7x7", 32, 64, out_index=9)


def test_segmentation_model_needs_dense_logits():
    model = SegmentationModel(ModelConfig(backbone="p2at_small", num_classes=3)).eval()
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 3, 48, 40)
    with pytest.raises(ModelError, match="not a dense"):
        SegmentationModel(ModelConfig(backbone="resnet18", num_classes=3)).eval()(torch.randn(1, 3, 32, 32))
