"""timm backbones inside mmfm: tokens for the unified trunk, dense logits for segmentation.

``BackboneAdapter`` replaces the trunk's patch embedding with any timm model that has features
(``timm.create_model(name, features_only=True, out_indices=...)``): the chosen feature map
(B, C, h, w) becomes h*w tokens through a 1x1 projection (Linear) to the trunk width, plus a 2-D
position embedding sized for the feature grid at ``img_size`` (resampled for other grids), then the
trunk's CLS token and modality-type embedding (``trunk._with_cls``). Videos (B, T, C, H, W) run the
backbone per frame (frames folded into the batch), then get the trunk's temporal embedding and
rolling index exactly as ``UnifiedTrunk.embed_video`` does.

Choices, per family:

* multi-branch models (CrossViT): timm taps every branch at the same block (several feature-info
  entries naming one module). All branches of the chosen block are taken, each branch map is
  resampled (bilinear, antialiased) onto the coarsest branch grid, and the maps are concatenated
  along channels before the projection. For ``crossvit_tiny_240`` that is the 20x20x96 small-patch
  branch resampled onto the 14x14x192 large-patch grid: 196 tokens of 288 channels (the concatenation
  of the two token sets would give 596 tokens, three times the trunk cost, for little gain).
* token models (TNT): timm's features are the patch tokens with the CLS token dropped, as an NCHW map.
* models with a fixed input size (``pretrained_cfg['fixed_input_size']``: CrossViT 240, TNT 224)
  get their input bilinearly resized to that size inside the adapter; ``input_size=S`` builds them
  for S x S instead (timm ``img_size``; pretrained position embeddings are resampled by timm).

``SegmentationModel`` wraps a timm model whose forward gives dense logits (P2AT) for ``task:
segmentation``; it carries its ``ModelConfig`` so that ``save_pretrained`` stores it with the weights.
"""

from dataclasses import asdict

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

import mmfm.backbones  # noqa: F401  (registers mmfm's timm models)
from mmfm.config import ModelConfig
from mmfm.errors import ModelError
from mmfm.layers.rolling import roll_index
from mmfm.models.trunk import IMAGE, VIDEO, TokenBatch


def require_timm_model(name: str) -> None:
    if not timm.is_model(name):
        raise ModelError(f"model.backbone={name!r} is not a timm model; see timm.list_models() "
                         "(mmfm adds biformer_*, hornet_*, p2at_*)")


def create_timm_model(name: str, pretrained: bool = False, pretrained_file: str | None = None, **kwargs):
    """``timm.create_model`` with a clear error for unknown names; weights from a local file if given."""
    require_timm_model(name)
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    return timm.create_model(name, pretrained=pretrained or bool(pretrained_file), **kwargs)


def feature_taps(name: str, out_index: int, **timm_kwargs) -> list[int]:
    """Feature indices to take for stage ``out_index``: every branch tapped at that stage's module."""
    require_timm_model(name)
    with torch.device("meta"):
        info = timm.create_model(name, **timm_kwargs).feature_info
    if not -len(info) <= out_index < len(info):
        raise ModelError(f"backbone_kwargs.out_index={out_index}: {name} has {len(info)} feature maps")
    module = info[out_index]["module"]
    return [i for i, entry in enumerate(info) if entry["module"] == module]


def fixed_input_size(model: nn.Module, input_size: int | None) -> tuple[int, int] | None:
    """The (H, W) a model insists on (``input_size`` if it was built for it), or None for any size."""
    cfg = model.pretrained_cfg
    if not cfg.get("fixed_input_size", False):
        return None
    return (input_size, input_size) if input_size else tuple(cfg["input_size"][-2:])


class BackboneAdapter(nn.Module):
    """A timm feature extractor + projection + 2-D position: images/videos -> trunk ``TokenBatch``."""

    def __init__(self, name: str, width: int, img_size: int, out_index: int = -1, input_size: int | None = None,
                 pretrained: bool = False, pretrained_file: str | None = None, **timm_kwargs):
        """
        Args:
            name: timm model name (any model with ``features_only`` support).
            width: trunk width the tokens are projected to.
            img_size: input side the position embedding is sized for (other sizes resample it).
            out_index: which feature map (timm feature-info index, negative from the end).
            input_size: build a fixed-size model (CrossViT, TNT) for this input side (timm ``img_size``)
                instead of its default; inputs are resized to it. Ignored by models taking any size.
            pretrained: load the model's pretrained weights (timm hub or ``pretrained_file``).
            pretrained_file: local weights file (.safetensors / .pth), implies ``pretrained``.
            timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``drop_path_rate``).
        """
        super().__init__()
        self.name = name
        if input_size:
            timm_kwargs["img_size"] = input_size
        taps = feature_taps(name, out_index, **timm_kwargs)
        self.backbone = create_timm_model(name, pretrained, pretrained_file, features_only=True,
                                          out_indices=taps, **timm_kwargs)
        self.input_size = fixed_input_size(self.backbone, input_size)
        channels, self.grid = self._probe(img_size)
        self.proj = nn.Linear(channels, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], width))
        trunc_normal_(self.pos_embed, std=0.02)

    @torch.no_grad()
    def _probe(self, img_size: int) -> tuple[int, tuple[int, int]]:
        """Channels and grid of the merged feature map for an ``img_size`` input (eval mode: BN untouched)."""
        was_training = self.backbone.training
        self.backbone.eval()
        feature = self.feature_map(torch.zeros(1, 3, img_size, img_size))
        self.backbone.train(was_training)
        return feature.shape[1], (feature.shape[2], feature.shape[3])

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "model", self.backbone)
        own = inner.no_weight_decay() if hasattr(inner, "no_weight_decay") else set()
        prefix = "backbone.model." if inner is not self.backbone else "backbone."
        return {"pos_embed"} | {prefix + n for n in own}

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, C', h, w): the chosen stage, branches merged on the coarsest grid."""
        if self.input_size is not None and tuple(pixels.shape[-2:]) != self.input_size:
            pixels = F.interpolate(pixels, size=self.input_size, mode="bilinear", align_corners=False,
                                   antialias=True)
        maps = self.backbone(pixels)
        grid = min((m.shape[-2:] for m in maps), key=lambda size: size[0] * size[1])
        maps = [m if m.shape[-2:] == grid else
                F.interpolate(m, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
                for m in maps]
        return torch.cat(maps, dim=1)

    def tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, C, H, W) -> (B, h*w, width) projected tokens with 2-D position added, and h*w."""
        feature = self.feature_map(pixels)
        grid = (feature.shape[2], feature.shape[3])
        pos = self.pos_embed
        if grid != self.grid:
            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=0)
        return self.proj(feature.flatten(2).transpose(1, 2)) + pos, grid[0] * grid[1]

    def forward(self, trunk: nn.Module, pixels: torch.Tensor) -> TokenBatch:
        """(B, C, H, W) images or (B, T, C, H, W) videos -> [CLS, tokens] for the trunk."""
        if pixels.dim() == 4:
            return TokenBatch(trunk._with_cls(self.tokens(pixels)[0], IMAGE))
        batch, num_frames = pixels.shape[:2]
        if num_frames > trunk.max_frames:
            raise ModelError(f"clip of {num_frames} frames exceeds model.max_frames={trunk.max_frames}")
        tokens, per_frame = self.tokens(pixels.flatten(0, 1))
        tokens = tokens.view(batch, num_frames, per_frame, -1) + trunk.temporal_embed[:, :num_frames, None]
        x = trunk._with_cls(tokens.flatten(1, 2), VIDEO)
        roll = roll_index(num_frames, per_frame).to(x.device) if trunk.rolling and num_frames > 1 else None
        return TokenBatch(x, roll=roll)


class SegmentationModel(nn.Module):
    """A timm dense-prediction model (``model.backbone``, ``model.num_classes``) with its config."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.backbone or cfg.num_classes < 1:
            raise ModelError("task: segmentation needs model.backbone (a timm segmentation model such as "
                             "p2at_small) and model.num_classes (classes including background)")
        self.cfg = cfg
        kwargs = dict(cfg.backbone_kwargs)
        self.net = create_timm_model(cfg.backbone, kwargs.pop("pretrained", False),
                                     kwargs.pop("pretrained_file", None), num_classes=cfg.num_classes, **kwargs)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes, H, W)."""
        logits = self.net(pixels)
        if logits.dim() != 4:
            raise ModelError(f"model.backbone={self.cfg.backbone!r} gives {tuple(logits.shape)} logits, "
                             "not a dense (B, classes, H, W) map; use a segmentation model such as p2at_small")
        if logits.shape[-2:] != pixels.shape[-2:]:
            logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def config_dict(self) -> dict:
        return asdict(self.cfg)
