"""The mmfm model: tokenizers' embeddings + UnifiedTrunk + ITC projections + task heads.

``MMFM(arch, answers, preprocess)``: ``arch`` is the architecture (``ModelConfig``), ``answers`` the answer
list of each answer head (from the data) and ``preprocess`` the input preprocessing (image size, mean,
std, frames); the three are what a checkpoint stores (``mmfm.models.io``).
``encode_*`` run the unimodal layers once and return both the residual tokens (what the fusion layers
and a retrieval index reuse) and the normalised ITC feature. ``fuse`` runs only the fusion layers.
"""

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.config import ModelConfig
from mmfm.models.heads import AnswerHead, MLMHead
from mmfm.models.trunk import FusionContext, TokenBatch, UnifiedTrunk
from mmfm.tokenizers.text import TextTokenizer


@dataclass
class Encoded:
    tokens: TokenBatch        # unimodal residual stream, input of the fusion layers
    feat: torch.Tensor        # (B, embed_dim) L2-normalised ITC feature


TEMPERATURE_INIT = 0.07
# The parts of the model that ``train.freeze`` names (``MMFM.parameter_parts``), inputs first.
PARTS = ("vision_tokenizer", "vision_embed", "text_embed", "type_embed", "unimodal", "fusion", "norm",
         "projections", "heads")
STEM_PARTS = PARTS[:4]  # layer 0 of layer-wise lr decay


@dataclass
class Preprocess:
    """Eval-time input preprocessing of a model, stored in its checkpoint."""

    image_size: int = 64
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_frames: int = 8


class MMFM(nn.Module):
    def __init__(self, cfg: ModelConfig, answers: dict[str, list[str]] | None = None,
                 preprocess: dict | None = None, *, attention_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.answers = {head: list(names) for head, names in (answers or {}).items()}
        self.preprocess = asdict(Preprocess(**(preprocess or {"image_size": cfg.img_size})))
        self.tokenizer = TextTokenizer(cfg.context_length)
        self.trunk = self._build_trunk(cfg, attention_backend)
        width = cfg.width
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(TEMPERATURE_INIT))
        self.itm_head = nn.Linear(width, 2)
        self.itm_pair_head = self._zero_linear(cfg.embed_dim, 2) if cfg.itm_pair_features else None
        self.mlm_head = MLMHead(width, self.trunk.token_embed)
        self.word_head = MLMHead(width, self.trunk.token_embed) if cfg.word_head else None
        self.bigram_head = (nn.Linear(width, cfg.word_bigram_buckets)
                            if cfg.word_head and cfg.word_bigram_buckets else None)
        self.answer_heads = nn.ModuleDict({name: AnswerHead(width, len(names))
                                           for name, names in self.answers.items()})
        self.answer_pair_heads = nn.ModuleDict({name: self._zero_linear(width, len(names))
                                                for name, names in self.answers.items()
                                                if cfg.answer_pair_features})

    @staticmethod
    def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
        layer = nn.Linear(fan_in, fan_out)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer

    def _build_trunk(self, cfg: ModelConfig, attention_backend: str) -> UnifiedTrunk:
        extra = {"fusion_layer": cfg.fusion_layer, "vision_depth": cfg.vision_depth, "vocab_size": self.tokenizer.vocab_size,
                 "context_length": cfg.context_length, "max_frames": cfg.max_frames, "rolling": cfg.rolling,
                 "text_bigram": cfg.text_bigram, "fusion_mode": cfg.fusion_mode,
                 "vision_tokenizer": cfg.vision_tokenizer, "vision_tokenizer_kwargs": cfg.vision_tokenizer_kwargs,
                 "attention_backend": attention_backend}
        return UnifiedTrunk(width=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                            img_size=cfg.img_size, patch_size=cfg.patch_size, drop_path_rate=cfg.drop_path,
                            **extra)

    def no_weight_decay(self) -> set[str]:
        return {f"trunk.{n}" for n in self.trunk.no_weight_decay()} | {"temp"}

    @property
    def fuses(self) -> bool:
        """Whether the model has fusion layers (ITM, MLM and answer heads need them)."""
        return self.trunk.fuses

    def fusion_parameters(self) -> list[nn.Parameter]:
        """The fusion layers and the heads that read them (``train.fusion_lr_scale`` applies to these).

        Layers that vision also runs through (``vision_depth`` past the fusion point) are not among them:
        they are the image encoder's too.
        """
        fusion_only = self.trunk.blocks[max(self.cfg.fusion_layer, self.trunk.vision_depth):]
        modules = [*fusion_only, self.itm_head, self.itm_pair_head, self.answer_heads, self.answer_pair_heads]
        return [p for module in modules if module is not None for p in module.parameters()]

    def parameter_parts(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter in exactly one of ``PARTS`` (what ``train.freeze`` takes).

        ``unimodal`` / ``fusion`` are the trunk layers [0, fusion_layer) / [fusion_layer, depth) by index (in
        ``cross`` mode with ``vision_depth`` past the fusion point, vision also runs through fusion layers).
        ``norm`` is the trunk's final norm, which the ITC features and the fused tokens both go through. The
        MLM and word heads decode with the token embedding (tied), which is ``text_embed``'s.
        """
        trunk = self.trunk
        members = {
            "vision_tokenizer": [trunk.vision_tokenizer],
            "vision_embed": [trunk.cls_token, trunk.pos_embed, trunk.temporal_embed],
            "text_embed": [trunk.token_embed, trunk.text_pos_embed, trunk.text_bigram],
            "type_embed": [trunk.type_embed],
            "unimodal": list(trunk.blocks[:trunk.fusion_layer]),
            "fusion": list(trunk.blocks[trunk.fusion_layer:]),
            "norm": [trunk.norm],
            "projections": [self.vision_proj, self.text_proj, self.temp],
            "heads": [self.itm_head, self.itm_pair_head, self.mlm_head, self.word_head, self.bigram_head,
                      self.answer_heads, self.answer_pair_heads],
        }
        claimed: set[int] = set()
        return {part: _unclaimed(members[part], claimed) for part in PARTS}

    def parameter_layers(self) -> dict[str, int]:
        """Layer of each parameter name for layer-wise lr decay, timm's ``param_groups_layer_decay`` convention
        (a ViT's ``group_matcher``): 0 the embeddings (``STEM_PARTS``), i + 1 trunk block i, the final norm
        with the last block (depth), the projections, temperature and heads on top (depth + 1)."""
        stem = {id(p) for part, params in self.parameter_parts().items() if part in STEM_PARTS for p in params}
        depth = self.trunk.depth
        layers = {}
        for name, param in self.named_parameters():
            if id(param) in stem:
                layers[name] = 0
            elif name.startswith("trunk.blocks."):
                layers[name] = int(name.split(".")[2]) + 1
            else:
                layers[name] = depth if name.startswith("trunk.norm.") else depth + 1
        return layers

    # ---- unimodal ---------------------------------------------------------------------------------

    def _feature(self, tokens: TokenBatch, proj: nn.Linear) -> torch.Tensor:
        return F.normalize(proj(self.trunk.norm(tokens.cls())), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> Encoded:
        tokens = self.trunk.unimodal(self.trunk.embed_text(ids, mask))
        return Encoded(tokens, self._feature(tokens, self.text_proj))

    def embed_vision(self, pixels: torch.Tensor) -> TokenBatch:
        """(B, C, H, W) images or (B, T, C, H, W) videos -> embedded tokens."""
        if pixels.dim() == 5:
            return self.trunk.embed_video(pixels)
        return self.trunk.embed_image(pixels)

    def encode_vision(self, pixels: torch.Tensor) -> Encoded:
        tokens = self.trunk.unimodal_vision(self.embed_vision(pixels))
        return Encoded(tokens, self._feature(tokens, self.vision_proj))

    def word_logits(self, vision: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption-word logits (B, vocab) and hashed word-pair logits (B, buckets) from the unimodal vision [CLS]."""
        cls = self.trunk.norm(vision.cls())
        return self.word_head(cls), None if self.bigram_head is None else self.bigram_head(cls)

    # ---- fusion -----------------------------------------------------------------------------------

    def fusion_context(self, vision: TokenBatch) -> FusionContext:
        return self.trunk.fusion_context(vision)

    def fuse(self, text: TokenBatch, vision: TokenBatch | FusionContext) -> TokenBatch:
        return self.trunk.fuse(text, vision)

    def itm_logits(self, text: TokenBatch, vision: TokenBatch | FusionContext) -> torch.Tensor:
        """(N, 2) no-match / match logits of aligned (text_i, vision_i) pairs."""
        return self.fused_itm_logits(self.fuse(text, vision), text, vision)

    def fused_itm_logits(self, fused: TokenBatch, text: TokenBatch,
                         vision: TokenBatch | FusionContext) -> torch.Tensor:
        """``itm_logits`` from the pairs' ``fuse(text, vision)`` (one fusion pass can feed every head).

        The fused [CLS] is classified; with ``itm_pair_features`` a zero-initialised linear layer also reads
        the element-wise product of the pair's ITC features (over the temperature, without gradient into
        them). From scratch, the fusion layers need several hundred steps before [text ; vision] attention
        carries a match signal, and until then ITM is noise added to the re-rank; the product makes the
        aligned similarity, and whatever binding ITC has learned, available to ITM from the first steps.
        """
        logits = self.itm_head(fused.cls())
        if self.itm_pair_head is None:
            return logits
        vision_tokens = vision.tokens if isinstance(vision, FusionContext) else vision
        product = (self._feature(text, self.text_proj) * self._feature(vision_tokens, self.vision_proj)).detach()
        return logits + self.itm_pair_head(product / self.temp.detach().clamp(0.001, 0.5))

    def answer_logits(self, head: str, text: TokenBatch, vision: TokenBatch | FusionContext) -> torch.Tensor:
        """(N, answers) logits of answer head ``head`` for (question_i, vision_i) pairs."""
        return self.fused_answer_logits(head, self.fuse(text, vision), text, vision)

    def fused_answer_logits(self, head: str, fused: TokenBatch, text: TokenBatch,
                            vision: TokenBatch | FusionContext) -> torch.Tensor:
        """``answer_logits`` from the pairs' ``fuse(text, vision)``: the fused [CLS] classified (ViLT's head).

        With ``answer_pair_features`` a zero-initialised linear layer also reads the element-wise product
        of the question's and the image's unimodal [CLS] (after the final norm): low-rank bilinear pooling
        (MLB, Kim et al. 2017), a question-image interaction that a linear layer learns in a few steps
        while the fusion layers' attention is still near uniform.
        """
        logits = self.answer_heads[head](fused.cls())
        if head not in self.answer_pair_heads:
            return logits
        vision_tokens = vision.tokens if isinstance(vision, FusionContext) else vision
        product = self.trunk.norm(text.cls()) * self.trunk.norm(vision_tokens.cls())
        return logits + self.answer_pair_heads[head](product)

    def arch_dict(self) -> dict:
        arch = asdict(self.cfg)
        arch["vision_tokenizer_kwargs"] = self.trunk.vision_tokenizer.stored_kwargs(arch["vision_tokenizer_kwargs"])
        return arch


def _unclaimed(members: list, claimed: set[int]) -> list[nn.Parameter]:
    """The parameters of ``members`` (modules, parameters or None) not in ``claimed``, which they then join:
    a tied weight belongs to the first part that lists it."""
    found = []
    for member in members:
        params = [] if member is None else [member] if isinstance(member, nn.Parameter) else member.parameters()
        for param in params:
            if id(param) not in claimed:
                claimed.add(id(param))
                found.append(param)
    return found
