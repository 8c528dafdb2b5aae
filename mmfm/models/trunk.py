"""UnifiedTrunk: ONE pre-norm transformer whose weights are shared by text, images and videos.

Layers [0, fusion_layer) run each modality alone (their outputs are what contrastive alignment uses
and what a retrieval index caches); layers [fusion_layer, depth) run [text ; vision] jointly. Block
parameter names follow timm's VisionTransformer, so ``UnifiedTrunk.from_timm(vit)`` (or ``trunk.load_timm``)
starts the trunk from any timm ViT (ViLT / All-in-One start from ViT weights) and reproduces its
``forward_features`` exactly.

Inputs are embedded here: text token + position + a projection of the previous token; images and videos
through the vision tokenizer (``mmfm/tokenizers/vision.py``: patch, conv, backbone, tubelet), then, the same
for every tokenizer, the 2-D position interpolated to the token grid, the temporal embedding of videos,
the CLS token and a modality-type embedding. Videos get temporal token rolling before every layer, unimodal
and joint. Token batches are padded (B, L, D) with a key mask, or packed (T, D) without padding (variable
image sizes / video lengths / text lengths). Each attention module keeps the backend it was built with.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmfm.errors import ModelError
from mmfm.layers.attention import PackedSeqs, attention, check_backend, packed_attention
from mmfm.layers.rolling import offset_index, roll_index
from mmfm.tokenizers.vision import create_vision_tokenizer

TEXT, IMAGE, VIDEO = 0, 1, 2
FUSION_MODES = ("joint", "cross")
PIXEL_LAYOUTS = {4: "(B, C, H, W) images", 5: "(B, T, C, H, W) clips"}


@dataclass
class TokenBatch:
    """Token sequences between layers.

    Padded: ``x`` (B, L, D), ``mask`` (B, L) True = real token or None, ``roll`` (L,) gather index.
    Packed: ``x`` (T, D), ``packed`` layout, ``roll`` (T,) gather index; ``mask`` is None.
    """

    x: torch.Tensor
    mask: torch.Tensor | None = None
    roll: torch.Tensor | None = None
    packed: PackedSeqs | None = None

    def cls(self) -> torch.Tensor:
        """The first token of every sequence, (B, D)."""
        if self.packed is not None:
            return self.x.index_select(0, self.packed.cu_seqlens[:-1].long())
        return self.x[:, 0]

    def select(self, index) -> "TokenBatch":
        """Rows ``index`` of a padded batch (repeats allowed).

        index_select, not x[index]: its backward is index_add_, several times faster on CPU than the
        accumulating index_put_ of advanced indexing (4% of a demo step in torch.profiler).
        """
        index = torch.as_tensor(index, device=self.x.device)
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return TokenBatch(self.x.index_select(0, index), mask, self.roll)

    def to_padded(self) -> "TokenBatch":
        if self.packed is None:
            return self
        lengths = self.packed.lengths
        width = max(lengths)
        x = self.x.new_zeros(len(lengths), width, self.x.shape[-1])
        mask = torch.zeros(len(lengths), width, dtype=torch.bool, device=self.x.device)
        for row, (start, n) in enumerate(zip(self.packed.cu_seqlens[:-1].tolist(), lengths)):
            x[row, :n] = self.x[start:start + n]
            mask[row, :n] = True
        if self.roll is not None and len(set(lengths)) > 1:
            raise ModelError("fusing packed videos of different lengths: pad them to one frame count first")
        return TokenBatch(x, mask, None if self.roll is None else self.roll[:width])


def cat_packed(*batches: TokenBatch) -> TokenBatch:
    """Packed batches of any modalities as ONE packed batch (one forward for texts, images and videos).

    Sequences keep their order: those of ``batches[0]`` first. Rolling indices are shifted to the new
    offsets; sequences without rolling get the identity.
    """
    if any(b.packed is None for b in batches):
        raise ModelError("cat_packed takes packed TokenBatches (embed_*_packed)")
    x = torch.cat([b.x for b in batches])
    packed = PackedSeqs([n for b in batches for n in b.packed.lengths], x.device)
    roll = None
    if any(b.roll is not None for b in batches):
        offsets, parts = 0, []
        for b in batches:
            own = b.roll if b.roll is not None else torch.arange(len(b.x), device=x.device)
            parts.append(own + offsets)
            offsets += len(b.x)
        roll = torch.cat(parts)
    return TokenBatch(x, roll=roll, packed=packed)


@dataclass
class FusionContext:
    """Vision input of the fusion layers: the tokens, plus per-layer keys/values in ``cross`` mode."""

    tokens: TokenBatch
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def select(self, index: torch.Tensor) -> "FusionContext":
        """Rows ``index`` (repeats allowed): one context per (text, vision) pair to score."""
        index = torch.as_tensor(index, device=self.tokens.x.device)
        tokens = self.tokens.select(index)
        kv = None if self.kv is None else [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv]
        return FusionContext(tokens, kv)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ModelError(f"trunk width {dim} is not divisible by heads {num_heads}")
        self.num_heads = num_heads
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # A key bias adds the same q.b_k to every logit of a row, so softmax cancels it and its gradient
        # is float noise that Adam scales up to lr-sized steps (it made resumed runs drift). The slice
        # stays in ``qkv.bias`` for timm's layout but is multiplied by zero.
        self.register_buffer("bias_mask", torch.tensor([1.0, 0.0, 1.0]).repeat_interleave(dim), persistent=False)

    def _bias(self, rows: slice = slice(None)) -> torch.Tensor | None:
        return None if self.qkv.bias is None else (self.qkv.bias * self.bias_mask)[rows]

    def vision_kv(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, L, Dh) of normed vision tokens, the cross-fusion context of one layer."""
        batch, length, dim = vision.shape
        kv = F.linear(vision, self.qkv.weight[dim:], self._bias(slice(dim, None)))
        k, v = kv.view(batch, length, 2, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward_cross(self, text, k_vision, v_vision, mask):
        """Text queries over [text ; vision] keys/values; vision is context only (not updated)."""
        batch, length, dim = text.shape
        head_dim = dim // self.num_heads
        q, k_text, v_text = F.linear(text, self.qkv.weight, self._bias()).view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, torch.cat([k_text, k_vision], 2), torch.cat([v_text, v_vision], 2), mask=mask,
                        backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, x, mask=None, packed=None):
        head_dim = x.shape[-1] // self.num_heads
        qkv = F.linear(x, self.qkv.weight, self._bias())
        if packed is not None:
            q, k, v = qkv.view(x.shape[0], 3, self.num_heads, head_dim).unbind(1)
            out = packed_attention(q, k, v, packed, backend=self.backend).reshape(x.shape)
        else:
            batch, length, dim = x.shape
            q, k, v = qkv.view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
            out = attention(q, k, v, mask=mask, backend=self.backend).transpose(1, 2).reshape(batch, length, dim)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block with timm ViT parameter names."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, init_values=None,
                 attention_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attention_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, mask=None, packed=None, roll=None):
        if roll is not None:
            x = x.index_select(0 if packed is not None else 1, roll)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), mask, packed)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_cross(self, text, k_vision, v_vision, mask=None):
        """Update only the text tokens, attending to themselves and to the fixed vision keys/values."""
        text = text + self.drop_path1(self.ls1(self.attn.forward_cross(self.norm1(text), k_vision, v_vision, mask)))
        return text + self.drop_path2(self.ls2(self.mlp(self.norm2(text))))


class UnifiedTrunk(nn.Module):
    def __init__(
        self,
        width: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        fusion_layer: int | None = None,
        vision_depth: int | None = None,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        vocab_size: int = 49410,
        context_length: int = 40,
        max_frames: int = 32,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        rolling: bool = True,
        fusion_mode: str = "joint",
        text_bigram: bool = True,
        vision_tokenizer: str = "patch",
        vision_tokenizer_kwargs: dict | None = None,
        attention_backend: str = "auto",
    ):
        super().__init__()
        fusion_layer = depth if fusion_layer is None else fusion_layer
        if not 0 < fusion_layer <= depth:
            raise ModelError(f"model.fusion_layer={fusion_layer} must be in [1, depth={depth}]")
        if fusion_mode not in FUSION_MODES:
            raise ModelError(f"model.fusion_mode={fusion_mode!r}: use one of {', '.join(FUSION_MODES)}")
        vision_depth = depth if vision_depth == -1 else vision_depth or fusion_layer
        if vision_depth != fusion_layer and not (fusion_mode == "cross" and fusion_layer < vision_depth <= depth):
            raise ModelError(f"model.vision_depth={vision_depth}: vision can run past the fusion point only with "
                             f"model.fusion_mode=cross, up to depth={depth} (fusion_layer={fusion_layer}); "
                             "use -1 for all layers or 0 to stop at the fusion point")
        self.width, self.depth, self.fusion_layer, self.fusion_mode = width, depth, fusion_layer, fusion_mode
        self.vision_depth = vision_depth
        self.in_chans, self.rolling, self.max_frames = in_chans, rolling, max_frames
        self.grad_checkpointing = False

        self.vision_tokenizer = create_vision_tokenizer(vision_tokenizer, width, img_size, patch_size, in_chans,
                                                        **(vision_tokenizer_kwargs or {}))
        self.grid = self.vision_tokenizer.grid_for(img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], width))
        self.temporal_embed = nn.Parameter(torch.zeros(1, max_frames, width))
        self.token_embed = nn.Embedding(vocab_size, width)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        # Each text token also gets a projection of the previous token's embedding. A bidirectional
        # encoder pooled at [CLS] starts as a bag of words (near-uniform attention), so "a red circle and
        # a blue square" and "a blue circle and a red square" look alike until attention learns word
        # order; with the previous word mixed in, the first MLP already sees (colour, shape) pairs
        # (3-minute dual-encoder run: binding 52.8 -> 73.7, img_r1 19.3 -> 25.9, docs/benchmarks.md).
        self.text_bigram = nn.Linear(width, width) if text_bigram else None
        self.type_embed = nn.Parameter(torch.zeros(3, width))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias, rates[i], init_values, attention_backend)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self._init_weights()

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.text_pos_embed, std=0.02)
        trunc_normal_(self.temporal_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        # Xavier (timm's "jax" scheme), not trunc_normal(0.02): at narrow widths 0.02 is several times
        # below the fan-in scale and short from-scratch runs learn about half as fast.
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @classmethod
    def from_timm(cls, vit: nn.Module, **kwargs) -> "UnifiedTrunk":
        """A trunk of a timm VisionTransformer's dimensions holding its weights (see ``load_timm``)."""
        proj = vit.patch_embed.proj
        fc1 = vit.blocks[0].mlp.fc1
        ls = vit.blocks[0].ls1
        trunk = cls(
            width=vit.embed_dim, depth=len(vit.blocks), num_heads=vit.blocks[0].attn.num_heads,
            mlp_ratio=fc1.out_features / fc1.in_features, img_size=vit.patch_embed.img_size[0],
            patch_size=proj.kernel_size[0], in_chans=proj.in_channels,
            qkv_bias=vit.blocks[0].attn.qkv.bias is not None,
            init_values=float(ls.gamma.flatten()[0]) if isinstance(ls, LayerScale) else None, **kwargs,
        )
        trunk.load_timm(vit)
        return trunk

    def load_timm(self, vit: nn.Module) -> None:
        """Load a timm VisionTransformer (class token; no registers, pre-norm or patch norm) of this trunk's shape.

        ``patch_embed.proj`` goes to the vision tokenizer (``patch``, or ``tubelet``, which re-inflates its
        Conv3d from it); the text, temporal and modality-type embeddings keep their own initialisation.
        """
        unsupported = (
            getattr(vit, "num_reg_tokens", 0) or not getattr(vit, "has_class_token", True)
            or getattr(vit, "no_embed_class", False) or not isinstance(vit.norm_pre, nn.Identity)
            or not isinstance(vit.patch_embed.norm, nn.Identity)
        )
        if unsupported:
            raise ModelError(f"{type(vit).__name__}: only class-token ViTs without registers, pre-norm or "
                             "patch-embedding norm convert")
        source = {k: v for k, v in vit.state_dict().items() if not k.startswith(("head", "fc_norm", "patch_embed."))}
        try:
            missing, unexpected = self.load_state_dict(source, strict=False)
            self.vision_tokenizer.load_patch_embed(vit.patch_embed.proj)
        except RuntimeError as err:
            raise ModelError(f"timm ViT does not fit the trunk: {err}") from None
        own = {"temporal_embed", "token_embed.weight", "text_pos_embed", "type_embed", "text_bigram.weight",
               "text_bigram.bias"}
        missing = {k for k in missing if k not in own and not k.startswith("vision_tokenizer.")}
        if unexpected or missing:
            raise ModelError(f"timm ViT does not fit the trunk: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @property
    def fuses(self) -> bool:
        """Whether the trunk has fusion layers (fusion_layer < depth)."""
        return self.fusion_layer < self.depth

    def no_weight_decay(self) -> set[str]:
        own = {"cls_token", "pos_embed", "temporal_embed", "text_pos_embed", "type_embed", "token_embed.weight"}
        return own | {f"vision_tokenizer.{n}" for n in self.vision_tokenizer.no_weight_decay()}

    # ---- embeddings -------------------------------------------------------------------------------

    def _check_pixels(self, pixels: torch.Tensor, dims: int) -> None:
        if pixels.dim() != dims or pixels.shape[-3] != self.in_chans:
            raise ModelError(f"expected {PIXEL_LAYOUTS[dims]} with C={self.in_chans}, got shape {tuple(pixels.shape)}")

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) vision tokens with 2-D position added."""
        self._check_pixels(pixels, 4)
        tokens, grid = self.vision_tokenizer(pixels)
        return tokens + self._patch_pos_embed(grid)

    def _patch_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, h*w, D) 2-D position embedding, interpolated when the grid differs from the trained one."""
        pos = self.pos_embed[:, 1:]
        if grid != self.grid:
            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=0)
        return pos

    def _with_cls(self, tokens: torch.Tensor, modality: int) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.type_embed[modality]

    def embed_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> TokenBatch:
        length = ids.shape[1]
        if length > self.text_pos_embed.shape[1]:
            raise ModelError(f"text of {length} tokens exceeds context_length {self.text_pos_embed.shape[1]}")
        words = self.token_embed(ids)
        x = words + self.text_pos_embed[:, :length] + self.type_embed[TEXT]
        if self.text_bigram is not None:
            if mask is not None:
                words = words * mask[..., None].to(words.dtype)
            x = x + self.text_bigram(F.pad(words[:, :-1], (0, 0, 1, 0)))
        return TokenBatch(x, mask)

    def embed_image(self, pixels: torch.Tensor) -> TokenBatch:
        return TokenBatch(self._with_cls(self._image_tokens(pixels), IMAGE))

    def embed_video(self, frames: torch.Tensor) -> TokenBatch:
        """(B, T, C, H, W) -> [CLS, frame-major patches] with temporal embedding and a rolling index."""
        self._check_pixels(frames, 5)
        tokens, grid = self.vision_tokenizer.forward_video(frames)
        num_frames, per_frame = tokens.shape[1:3]
        if num_frames > self.max_frames:
            raise ModelError(f"clip of {num_frames} (token) frames exceeds model.max_frames={self.max_frames}")
        tokens = tokens + self._patch_pos_embed(grid) + self.temporal_embed[:, :num_frames, None]
        x = self._with_cls(tokens.flatten(1, 2), VIDEO)
        roll = roll_index(num_frames, per_frame).to(x.device) if self.rolling and num_frames > 1 else None
        return TokenBatch(x, roll=roll)

    def embed_images_packed(self, images: list[torch.Tensor]) -> TokenBatch:
        """Images of different sizes (each (C, H, W), patch multiples) packed without padding."""
        sequences = [self._with_cls(self._image_tokens(img[None]), IMAGE)[0] for img in images]
        packed = PackedSeqs([len(s) for s in sequences], sequences[0].device)
        return TokenBatch(torch.cat(sequences), packed=packed)

    def embed_videos_packed(self, videos: list[torch.Tensor]) -> TokenBatch:
        """Clips of different lengths (each (T_i, C, H, W)) packed without padding, with a packed rolling index."""
        embedded = [self.embed_video(clip[None]) for clip in videos]
        sequences = [e.x[0] for e in embedded]
        packed = PackedSeqs([len(s) for s in sequences], sequences[0].device)
        roll = None
        if any(e.roll is not None for e in embedded):
            starts = packed.cu_seqlens[:-1].tolist()
            roll = torch.cat([
                (e.roll if e.roll is not None else torch.arange(len(s), device=s.device)) + start
                for e, s, start in zip(embedded, sequences, starts)
            ])
        return TokenBatch(torch.cat(sequences), roll=roll, packed=packed)

    def embed_texts_packed(self, ids: torch.Tensor, mask: torch.Tensor) -> TokenBatch:
        """Padded text ids -> packed tokens of the real lengths only (linear layers skip padding)."""
        padded = self.embed_text(ids)
        lengths = mask.sum(1).tolist()
        return TokenBatch(padded.x[mask], packed=PackedSeqs(lengths, ids.device))

    # ---- layers -----------------------------------------------------------------------------------

    def run_layers(self, tokens: TokenBatch, start: int, end: int) -> TokenBatch:
        x = tokens.x
        for block in self.blocks[start:end]:
            args = (x, tokens.mask, tokens.packed, tokens.roll)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return replace(tokens, x=x)

    def unimodal(self, tokens: TokenBatch) -> TokenBatch:
        """Text: layers [0, fusion_layer) alone. The output is the residual stream."""
        return self.run_layers(tokens, 0, self.fusion_layer)

    def unimodal_vision(self, tokens: TokenBatch) -> TokenBatch:
        """Images / videos: layers [0, vision_depth) alone.

        With ``vision_depth > fusion_layer`` (``cross`` mode) vision runs on through the layers that fuse
        text, as ALBEF's image encoder is deeper than its text encoder: the same weights, no new parameters,
        and the fusion layers' text queries attend to these final vision tokens.
        """
        return self.run_layers(tokens, 0, self.vision_depth)

    def fusion_context(self, vision: TokenBatch) -> "FusionContext":
        """What the fusion layers need of the vision side, computed once and reusable for many texts.

        ``cross`` mode precomputes every fusion layer's vision keys/values, so ITM over hard negatives
        or re-ranking k candidates per query never recomputes them.
        """
        vision = vision.to_padded()
        if self.fusion_mode != "cross":
            return FusionContext(vision)
        kv = [block.attn.vision_kv(block.norm1(vision.x)) for block in self.blocks[self.fusion_layer:]]
        return FusionContext(vision, kv)

    def fuse(self, text: TokenBatch, vision: "TokenBatch | FusionContext") -> TokenBatch:
        """Layers [fusion_layer, depth) over [text ; vision]; returns final-norm tokens, text first.

        ``joint``: every token of [text ; vision] is updated (vision rolled for videos).
        ``cross``: only text tokens are updated, attending to [text ; unimodal vision] with the same
        shared weights (ALBEF's fusion cost: linear layers run on the short text only).
        """
        context = vision if isinstance(vision, FusionContext) else self.fusion_context(vision)
        text, vision = text.to_padded(), context.tokens
        if text.x.shape[0] != vision.x.shape[0]:
            raise ModelError(f"fusing {text.x.shape[0]} texts with {vision.x.shape[0]} images/videos")
        text_len = text.x.shape[1]
        mask = None
        if text.mask is not None or vision.mask is not None:
            mask = torch.cat([_ones_if_none(text.mask, text.x), _ones_if_none(vision.mask, vision.x)], dim=1)
        if context.kv is not None:
            return TokenBatch(self.norm(self._cross_layers(text.x, context.kv, mask)), text.mask)
        x = torch.cat([text.x, vision.x], dim=1)
        roll = None if vision.roll is None else offset_index(vision.roll, text_len, text_len)
        joint = self.run_layers(TokenBatch(x, mask, roll), self.fusion_layer, self.depth)
        return replace(joint, x=self.norm(joint.x))

    def _cross_layers(self, text, kv, mask):
        for block, (k, v) in zip(self.blocks[self.fusion_layer:], kv):
            if self.grad_checkpointing and torch.is_grad_enabled():
                text = checkpoint(block.forward_cross, text, k, v, mask, use_reentrant=False)
            else:
                text = block.forward_cross(text, k, v, mask)
        return text

    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """All layers on images alone, final norm: (B, 1 + N, D) — timm's ``forward_features``."""
        return self.norm(self.run_layers(self.embed_image(pixels), 0, self.depth).x)


def _ones_if_none(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if mask is not None:
        return mask
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
