"""The ``backbone`` vision tokenizer: the five mmfm backbones as timm feature extractors and as the trunk's
vision input; SegmentationModel on the same timm helpers."""

import math
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from mmfm.config import ModelConfig
from mmfm.errors import ModelError
from mmfm.layers.rolling import roll_index
from mmfm.models.model import MMFM
from mmfm.models.segmentation import SegmentationModel
from mmfm.models.trunk import UnifiedTrunk
from mmfm.tokenizers.vision import create_vision_tokenizer

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
                      max_frames=4, embed_dim=16, vision_tokenizer="backbone",
                      vision_tokenizer_kwargs={"name": name, **BACKBONES[name]})
    return MMFM(cfg)


def _train_step(model: MMFM, pixels: torch.Tensor) -> float:
    """ITC over the two pairs + ITM on the matched pairs (unimodal and fusion layers), then backward."""
    ids, mask = model.tokenizer(CAPTIONS)
    text, vision = model.encode_text(ids, mask), model.encode_vision(pixels)
    logits = vision.feat @ text.feat.T / model.temp
    targets = torch.arange(len(CAPTIONS))
    itc = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    itm = F.cross_entropy(model.itm_logits(text.tokens, vision.tokens), torch.ones_like(targets))
    model.zero_grad(set_to_none=True)
    (itc + itm).backward()
    return float((itc + itm).detach())


def _backbone_has_grads(model: MMFM) -> bool:
    grads = [p.grad for p in model.trunk.vision_tokenizer.backbone.parameters() if p.requires_grad]
    return any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_training_step_on_images_and_videos(name):
    torch.manual_seed(0)
    model = _tiny_model(name)
    assert math.isfinite(_train_step(model, torch.randn(2, 3, 32, 32)))
    assert _backbone_has_grads(model)
    assert math.isfinite(_train_step(model, torch.randn(2, 2, 3, 32, 32)))
    assert _backbone_has_grads(model)


def _backbone(name: str, img_size: int = 64, **kwargs):
    return create_vision_tokenizer("backbone", 32, img_size, 8, name=name, **kwargs)


def test_video_tokens_follow_embed_video_layout():
    trunk = UnifiedTrunk(width=32, depth=1, num_heads=2, img_size=64, vocab_size=10, max_frames=4,
                         vision_tokenizer="backbone",
                         vision_tokenizer_kwargs={"name": "hornet_tiny_7x7", "out_index": 1})  # stride 8
    assert trunk.grid == (8, 8)
    tokens = trunk.embed_video(torch.randn(1, 3, 3, 64, 64))
    assert tokens.x.shape == (1, 1 + 3 * 64, 32)
    assert torch.equal(tokens.roll, roll_index(3, 64))


def test_position_embedding_resampled_for_other_sizes():
    trunk = UnifiedTrunk(width=32, depth=1, num_heads=2, img_size=64, vocab_size=10, vision_tokenizer="backbone",
                         vision_tokenizer_kwargs={"name": "p2at_small", "out_index": 1})
    assert trunk.grid == (8, 8) and trunk.pos_embed.shape == (1, 1 + 64, 32)
    assert trunk.embed_image(torch.randn(2, 3, 96, 128)).x.shape == (2, 1 + 12 * 16, 32)


def test_crossvit_branches_merged_on_the_coarse_grid():
    tokenizer = _backbone("crossvit_tiny_240")
    assert tokenizer.input_size == (240, 240)  # 64 px inputs are resized to the model's fixed size
    assert tokenizer.grid_for(64) == (14, 14)  # large-patch branch grid; the 20x20 branch resampled onto it
    assert tokenizer.proj.in_features == 96 + 192


def test_tnt_patch_tokens_without_cls():
    tokenizer = _backbone("tnt_s_patch16_224", input_size=64)
    assert tokenizer.grid_for(64) == (4, 4) and tokenizer.proj.in_features == 384


def test_pretrained_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("p2at_small")
    save_file(source.state_dict(), str(tmp_path / "p2at.safetensors"))
    tokenizer = _backbone("p2at_small", out_index=1, pretrained_file=str(tmp_path / "p2at.safetensors"))
    loaded = tokenizer.backbone.model.state_dict()
    assert torch.equal(loaded["stages.1.0.conv1.weight"], source.state_dict()["stages.1.0.conv1.weight"])


def test_unknown_backbone_and_bad_index_are_clear_errors():
    with pytest.raises(ModelError, match="not a timm model"):
        _backbone("no_such_net")
    with pytest.raises(ModelError, match="out_index=9"):
        _backbone("hornet_tiny_7x7", out_index=9)


def test_segmentation_model_needs_dense_logits():
    model = SegmentationModel("p2at_small", num_classes=3).eval()
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 3, 48, 40)
    assert model.arch_dict() == {"family": "segmentation", "backbone": "p2at_small", "backbone_kwargs": {},
                                 "num_classes": 3}
    with pytest.raises(ModelError, match="not a dense"):
        SegmentationModel("resnet18", num_classes=3).eval()(torch.randn(1, 3, 32, 32))
    with pytest.raises(ModelError, match="model.num_classes"):
        SegmentationModel("p2at_small", num_classes=0)


def test_backbones_register_with_timm_without_importing_models():
    code = ("import sys, timm, mmfm.backbones; "
            "assert all(timm.is_model(n) for n in ('biformer_tiny', 'hornet_tiny_7x7', 'p2at_small')); "
            "assert not [m for m in sys.modules if m.startswith(('mmfm.models', 'mmfm.config'))]")
    subprocess.run([sys.executable, "-c", code], check=True)
