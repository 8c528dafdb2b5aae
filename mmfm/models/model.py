"""The mmfm model: tokenizers' embeddings + UnifiedTrunk + ITC projections + task heads.

``encode_*`` run the unimodal layers once and return both the residual tokens (what the fusion layers
and a retrieval index reuse) and the normalised ITC feature. ``fuse`` runs only the fusion layers.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfm.config import ModelConfig
from mmfm.layers.attention import set_backend
from mmfm.models.heads import AnswerHead, MLMHead
from mmfm.models.trunk import FusionContext, TokenBatch, UnifiedTrunk
from mmfm.tokenizers.text import TextTokenizer


@dataclass
class Encoded:
    tokens: TokenBatch        # unimodal residual stream, input of the fusion layers
    feat: torch.Tensor        # (B, embed_dim) L2-normalised ITC feature


class MMFM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        set_backend(cfg.attention_backend)
        self.tokenizer = TextTokenizer(cfg.context_length)
        self.trunk = self._build_trunk(cfg)
        self.vision_adapter = self._build_adapter(cfg)
        width = cfg.width
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = nn.Linear(width, 2)
        self.mlm_head = MLMHead(width, self.trunk.token_embed)
        self.answer_heads = nn.ModuleDict({name: AnswerHead(width, len(answers))
                                           for name, answers in cfg.answers.items()})

    def _build_trunk(self, cfg: ModelConfig) -> UnifiedTrunk:
        extra = dict(fusion_layer=cfg.fusion_layer, vocab_size=self.tokenizer.vocab_size,
                     context_length=cfg.context_length, max_frames=cfg.max_frames, rolling=cfg.rolling,
                     fusion_mode=cfg.fusion_mode)
        if cfg.init.startswith("timm:"):
            import timm

            vit = timm.create_model(cfg.init[5:], pretrained=True, img_size=cfg.img_size)
            return UnifiedTrunk.from_timm(vit, drop_path_rate=cfg.drop_path, **extra)
        return UnifiedTrunk(width=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                            img_size=cfg.img_size, patch_size=cfg.patch_size, drop_path_rate=cfg.drop_path,
                            **extra)

    def _build_adapter(self, cfg: ModelConfig):
        if not cfg.backbone:
            return None
        from mmfm.backbones.adapter import BackboneAdapter

        return BackboneAdapter(cfg.backbone, cfg.width, cfg.img_size, **cfg.backbone_kwargs)

    def no_weight_decay(self) -> set[str]:
        names = {f"trunk.{n}" for n in self.trunk.no_weight_decay()} | {"temp"}
        if self.vision_adapter is not None:
            names |= {f"vision_adapter.{n}" for n in self.vision_adapter.no_weight_decay()}
        return names

    # ---- unimodal ---------------------------------------------------------------------------------

    def _feature(self, tokens: TokenBatch, proj: nn.Linear) -> torch.Tensor:
        return F.normalize(proj(self.trunk.norm(tokens.cls())), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> Encoded:
        tokens = self.trunk.unimodal(self.trunk.embed_text(ids, mask))
        return Encoded(tokens, self._feature(tokens, self.text_proj))

    def embed_vision(self, pixels: torch.Tensor) -> TokenBatch:
        """(B, C, H, W) images or (B, T, C, H, W) videos -> embedded tokens."""
        if self.vision_adapter is not None:
            return self.vision_adapter(self.trunk, pixels)
        if pixels.dim() == 5:
            return self.trunk.embed_video(pixels)
        return self.trunk.embed_image(pixels)

    def encode_vision(self, pixels: torch.Tensor) -> Encoded:
        tokens = self.trunk.unimodal(self.embed_vision(pixels))
        return Encoded(tokens, self._feature(tokens, self.vision_proj))

    # ---- fusion -----------------------------------------------------------------------------------

    def fusion_context(self, vision: TokenBatch) -> FusionContext:
        return self.trunk.fusion_context(vision)

    def fuse(self, text: TokenBatch, vision: TokenBatch | FusionContext) -> TokenBatch:
        return self.trunk.fuse(text, vision)

    def itm_logits(self, text: TokenBatch, vision: TokenBatch | FusionContext) -> torch.Tensor:
        return self.itm_head(self.fuse(text, vision).cls())

    def answer_logits(self, head: str, text: TokenBatch, vision: TokenBatch | FusionContext) -> torch.Tensor:
        return self.answer_heads[head](self.fuse(text, vision).cls())

    def config_dict(self) -> dict:
        return asdict(self.cfg)


FORMAT_VERSION = "1"


def save_pretrained(model: MMFM, path) -> None:
    """One safetensors file: weights + the model config (JSON in the metadata). Written atomically."""
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_model

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_model(model, str(tmp), metadata={"mmfm_config": json.dumps(model.config_dict()),
                                          "mmfm_format": FORMAT_VERSION})
    os.replace(tmp, path)


def config_from_checkpoint(path) -> ModelConfig:
    import json

    from safetensors import safe_open

    from mmfm.config import from_dict
    from mmfm.errors import ModelError

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:
        raise ModelError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if "mmfm_config" not in metadata:
        raise ModelError(f"{path}: safetensors file without an 'mmfm_config' entry; "
                         "it was not written by mmfm (use mmfm.zoo.convert for foreign weights)")
    return from_dict(ModelConfig, json.loads(metadata["mmfm_config"]))


def load_pretrained(path, **overrides) -> MMFM:
    """Rebuild the model from a checkpoint written by ``save_pretrained`` (strict)."""
    from dataclasses import replace

    from safetensors.torch import load_model

    from mmfm.errors import ModelError

    cfg = replace(config_from_checkpoint(path), init="", **overrides)
    model = MMFM(cfg)
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as err:
        raise ModelError(f"{path}: weights do not fit the architecture in its metadata: {err}") from None
    return model.eval()
