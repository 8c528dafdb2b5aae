"""C-ViViT: a causal video tokenizer with discrete codes (the ``tokenizer`` model family), and ``cvivit``, the
vision tokenizer that feeds a trained one's codes to the trunk.

Paper: Villegas et al. 2022, "Phenaki: Variable Length Video Generation from Open Domain Textual Descriptions"
(https://arxiv.org/abs/2210.02399). No official code; lucidrains/phenaki-pytorch (``CViViT``) is the reference
implementation. What changed here: the codes come from FSQ (Mentzer et al. 2023) or LFQ (MAGVIT-v2) of
vector-quantize-pytorch instead of a VQ codebook; time positions are fixed sinusoids (any number of
token-frames) instead of a learned relative bias; no GAN discriminator; linear heads back to pixels.

    clip (B, 1 + k*t, C, H, W) ─► first frame as p x p patches, later frames as t x p x p tubelets
        ─► spatial transformer within each token-frame ─► causal temporal transformer per grid position
        ─► FSQ / LFQ per token: codes (B, 1 + k, h*w[, num_codebooks])
        ─► decoder: the mirror (causal temporal, then spatial)

A token-frame's codes depend only on the frames up to its own, so any frame count 1 + k*t works and an image
is a one-frame clip whose codes are those of a clip's first token-frame.
"""

import math
from dataclasses import asdict, dataclass

import torch
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from torch import nn

from mmfm.config import TokenizerModelConfig, model_config
from mmfm.errors import ConfigError, ModelError
from mmfm.layers.attention import attention, check_backend
from mmfm.tokenizers.vision import VisionTokenizer, patch_grid, register_vision_tokenizer

QUANTIZERS = ("fsq", "lfq")
USES = ("latents", "codes")
IN_CHANS = 3


def check_frames(num_frames: int, tubelet_size: int) -> None:
    if num_frames < 1 or (num_frames - 1) % tubelet_size:
        raise ModelError(f"clip of {num_frames} frames: with tubelet_size={tubelet_size} a C-ViViT clip needs "
                         f"1 + k*{tubelet_size} frames (the first frame alone, then whole tubelets); sample "
                         f"data.num_frames = 1 + k*{tubelet_size}")


def time_embedding(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """(length, dim) fixed sinusoids (Vaswani et al. 2017): a position for any number of token-frames."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim))
    return torch.cat([torch.sin(position * frequency), torch.cos(position * frequency)], dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool, backend: str):
        super().__init__()
        self.heads, self.causal, self.backend = heads, causal, check_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, causal=self.causal, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block; ``causal``: each token attends to itself and the tokens before it."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, causal: bool = False, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal, backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SpaceTime(nn.Module):
    """Factorised transformer on (B, T', N, D) tokens: spatial blocks within each token-frame, causal temporal
    blocks along the token-frames of each grid position. The encoder runs space then time, the decoder time
    then space."""

    def __init__(self, cfg: TokenizerModelConfig, temporal_first: bool, backend: str):
        super().__init__()
        self.temporal_first = temporal_first
        self.spatial = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, False, backend)
                                     for _ in range(cfg.spatial_depth))
        self.temporal = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, True, backend)
                                      for _ in range(cfg.temporal_depth))

    def forward(self, x):
        stages = (self._temporal, self._spatial) if self.temporal_first else (self._spatial, self._temporal)
        for stage in stages:
            x = stage(x)
        return x

    def _spatial(self, x):
        y = x.flatten(0, 1)
        for block in self.spatial:
            y = block(y)
        return y.view_as(x)

    def _temporal(self, x):
        y = x.transpose(1, 2).flatten(0, 1)  # (B * N, T', D)
        for block in self.temporal:
            y = block(y)
        return y.unflatten(0, (x.shape[0], x.shape[2])).transpose(1, 2)


class Positions(nn.Module):
    """A learned 2-D position per grid cell (resampled for other grids) plus the sinusoid of the token-frame."""

    def __init__(self, width: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, grid[0] * grid[1], width), std=0.02))

    def forward(self, x, grid: tuple[int, int]):
        pos = self.pos_embed
        if grid != self.grid:
            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=0)
        return x + pos[:, None] + time_embedding(x.shape[1], x.shape[-1], x.device)[None, :, None]

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


class CViViTEncoder(nn.Module):
    """(B, 1 + k*t, C, H, W) -> latents (B, 1 + k, h*w, D) and the grid (h, w)."""

    def __init__(self, cfg: TokenizerModelConfig, backend: str):
        super().__init__()
        self.patch_size, self.tubelet_size = cfg.patch_size, cfg.tubelet_size
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.first = nn.Conv2d(IN_CHANS, cfg.width, cfg.patch_size, cfg.patch_size)
        self.tubelets = nn.Conv3d(IN_CHANS, cfg.width, kernel, kernel)
        self.positions = Positions(cfg.width, patch_grid(cfg.img_size, cfg.img_size, cfg.patch_size))
        self.transformer = SpaceTime(cfg, temporal_first=False, backend=backend)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if clips.dim() != 5 or clips.shape[2] != IN_CHANS:
            raise ModelError(f"C-ViViT takes (B, T, {IN_CHANS}, H, W) clips, got shape {tuple(clips.shape)}")
        check_frames(clips.shape[1], self.tubelet_size)
        grid = patch_grid(*clips.shape[-2:], self.patch_size)
        tokens = [self.first(clips[:, 0]).flatten(2).transpose(1, 2)[:, None]]
        if clips.shape[1] > 1:
            later = self.tubelets(clips[:, 1:].transpose(1, 2))  # (B, D, k, h, w)
            tokens.append(later.flatten(3).permute(0, 2, 3, 1))
        x = self.positions(torch.cat(tokens, dim=1), grid)
        return self.norm(self.transformer(x)), grid


class CViViTDecoder(nn.Module):
    """Quantised latents (B, 1 + k, h*w, D) -> pixels (B, 1 + k*t, C, H, W)."""

    def __init__(self, cfg: TokenizerModelConfig, backend: str):
        super().__init__()
        self.patch_size, self.tubelet_size = cfg.patch_size, cfg.tubelet_size
        self.positions = Positions(cfg.width, patch_grid(cfg.img_size, cfg.img_size, cfg.patch_size))
        self.transformer = SpaceTime(cfg, temporal_first=True, backend=backend)
        self.norm = nn.LayerNorm(cfg.width)
        self.first = nn.Linear(cfg.width, IN_CHANS * cfg.patch_size ** 2)
        self.tubelets = nn.Linear(cfg.width, cfg.tubelet_size * IN_CHANS * cfg.patch_size ** 2)

    def forward(self, latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.norm(self.transformer(self.positions(latents, grid)))
        frames = [self._unpatchify(self.first(x[:, :1]), 1, grid)]
        if x.shape[1] > 1:
            frames.append(self._unpatchify(self.tubelets(x[:, 1:]), self.tubelet_size, grid))
        return torch.cat(frames, dim=1)

    def _unpatchify(self, pixels: torch.Tensor, frames: int, grid: tuple[int, int]) -> torch.Tensor:
        """(B, T', h*w, frames*C*p*p) -> (B, T' * frames, C, h*p, w*p)."""
        (h, w), p = grid, self.patch_size
        x = pixels.view(pixels.shape[0], pixels.shape[1], h, w, frames, IN_CHANS, p, p)
        x = x.permute(0, 1, 4, 5, 2, 6, 3, 7)
        return x.reshape(pixels.shape[0], pixels.shape[1] * frames, IN_CHANS, h * p, w * p)


class Quantizer(nn.Module):
    """FSQ or LFQ of vector-quantize-pytorch on (B, L, D) latents -> quantised latents, codes, losses.

    Codes are (B, L), or (B, L, num_codebooks) with several codes a token (the library's convention), each
    from the same codebook. Both project D down to the code dimensions (times num_codebooks) and back. LFQ's
    entropy and commitment terms come back unweighted (the task weighs them with
    ``objective.loss_weights.lfq_*``); FSQ has no loss.
    """

    def __init__(self, cfg: TokenizerModelConfig):
        super().__init__()
        from vector_quantize_pytorch import FSQ, LFQ

        self.kind = cfg.quantizer
        if cfg.quantizer == "fsq":
            levels = list(cfg.levels)
            if not levels or not all(isinstance(n, int) and n >= 3 for n in levels):
                raise ModelError(f"model.levels={levels!r}: FSQ needs a list of integers >= 3 (e.g. [8, 5, 5, 5]: "
                                 "1,000 codes)")
            self.inner = FSQ(levels=levels, dim=cfg.width, num_codebooks=cfg.num_codebooks)
        else:
            size = cfg.codebook_size
            if size < 2 or size & (size - 1):
                raise ModelError(f"model.codebook_size={size}: LFQ needs a power of two (one bit per code dimension)")
            self.inner = LFQ(dim=cfg.width, codebook_size=size, num_codebooks=cfg.num_codebooks,
                             entropy_loss_weight=1.0, commitment_loss_weight=1.0)
        self.codebook_size = int(self.inner.codebook_size)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "fsq":
            quantized, codes = self.inner(latents)
            return quantized, codes.long(), {}
        (quantized, codes, _), parts = self.inner(latents, return_loss_breakdown=True)
        if not self.training:
            return quantized, codes.long(), {}
        # MAGVIT-v2: confident codes per token (low entropy), all codes used over the batch (high entropy)
        losses = {"lfq_entropy": parts.per_sample_entropy - parts.batch_entropy, "lfq_commit": parts.commitment}
        return quantized, codes.long(), losses

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, L[, num_codebooks]) codes -> (B, L, D) quantised latents, as ``forward`` gives them."""
        return self.inner.indices_to_codes(codes)


@dataclass
class Encoding:
    quantized: torch.Tensor        # (B, T', h*w, D) what the decoder reads
    codes: torch.Tensor            # (B, T', h*w[, num_codebooks]) code indices in [0, codebook_size)
    grid: tuple[int, int]
    losses: dict                   # the quantiser's training losses (LFQ), unweighted


class CViViT(nn.Module):
    """The ``tokenizer`` model family: encoder, quantiser, decoder; ``forward(clips) -> (reconstruction, Encoding)``."""

    def __init__(self, cfg: TokenizerModelConfig, preprocess: dict | None = None, attention_backend: str = "auto"):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        self.preprocess = dict(preprocess or {})
        self.answers: dict[str, list[str]] = {}
        self.encoder = CViViTEncoder(cfg, attention_backend)
        self.quantizer = Quantizer(cfg)
        self.decoder = CViViTDecoder(cfg, attention_backend)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def encode(self, clips: torch.Tensor) -> Encoding:
        latents, grid = self.encoder(clips)
        batch, frames, cells, width = latents.shape
        quantized, codes, losses = self.quantizer(latents.reshape(batch, frames * cells, width))
        codes = codes.view(batch, frames, cells, *codes.shape[2:])
        return Encoding(quantized.view_as(latents), codes, grid, losses)

    def decode(self, quantized: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.decoder(quantized, grid)

    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Pixels of (B, T', h*w[, num_codebooks]) codes, e.g. ones a generator sampled."""
        latents = self.quantizer.codes_to_latents(codes.flatten(1, 2))
        return self.decode(latents.view(*codes.shape[:3], -1), grid)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, Encoding]:
        encoding = self.encode(clips)
        return self.decode(encoding.quantized, encoding.grid), encoding

    def arch_dict(self) -> dict:
        return asdict(self.cfg)


def _check(cfg: TokenizerModelConfig) -> None:
    if cfg.quantizer not in QUANTIZERS:
        raise ModelError(f"model.quantizer={cfg.quantizer!r}: use one of {', '.join(QUANTIZERS)}")
    if cfg.width % cfg.heads or cfg.width % 2:
        raise ModelError(f"model.width={cfg.width} must be even and divisible by model.heads={cfg.heads}")
    if cfg.num_codebooks < 1:
        raise ModelError(f"model.num_codebooks={cfg.num_codebooks}: a token needs at least one code")
    if cfg.tubelet_size < 1 or cfg.patch_size < 1:
        raise ModelError(f"model.tubelet_size={cfg.tubelet_size} and model.patch_size={cfg.patch_size} must be >= 1")


# ---- the trunk's vision tokenizer --------------------------------------------------------------------------


@register_vision_tokenizer("cvivit")
class CViViTTokenizer(VisionTokenizer):
    """A C-ViViT's encoder and quantiser as the trunk's vision tokenizer (Phenaki's tokens, one per t x p x p).

    ``use: latents`` projects the quantised latents to the trunk width (a Linear, then a LayerNorm: the frozen
    latents come at about a third of the scale of linear patch tokens); ``use: codes`` embeds the
    code indices (an Embedding of the codebook). ``frozen`` (default): the C-ViViT stays in eval mode and gets
    no gradient, only the projection / embedding trains. The pixels must be normalised as the tokenizer was
    trained (its ``data.mean`` / ``data.std``; both runs default to ImageNet's); ``model.patch_size`` is the
    C-ViViT's, and ``model.max_frames`` counts token-frames (17 frames with t = 4 are 5).
    """

    def __init__(self, width: int, img_size: int, patch_size: int, in_chans: int = 3, *, checkpoint: str = "",
                 arch: dict | None = None, frozen: bool = True, use: str = "latents"):
        """
        Args:
            checkpoint: a tokenizer run directory or .safetensors (``mmfm train`` with task ``tokenizer``).
            arch: the C-ViViT architecture (a ``family: tokenizer`` model block); filled in from the checkpoint
                and stored with the trunk, so a saved trunk rebuilds without the tokenizer's file.
            frozen: keep the C-ViViT fixed (eval mode, no gradient).
            use: ``latents`` or ``codes``.
        """
        super().__init__()
        if use not in USES:
            raise ModelError(f"model.vision_tokenizer_kwargs.use={use!r}: use one of {', '.join(USES)}")
        if use == "codes" and not frozen:
            raise ModelError("model.vision_tokenizer_kwargs: use=codes passes no gradient through the discrete codes "
                             "into the C-ViViT; set frozen: true, or use: latents to fine-tune it")
        if in_chans != IN_CHANS:
            raise ModelError(f"model.vision_tokenizer=cvivit reads RGB ({IN_CHANS} channels), not {in_chans}")
        model = _tokenizer_model(checkpoint, arch)
        self.arch, self.frozen, self.use = model.arch_dict(), frozen, use
        self.encoder, self.quantizer = model.encoder, model.quantizer
        if use == "latents":
            self.proj = nn.Sequential(nn.Linear(model.cfg.width, width), nn.LayerNorm(width))
        else:  # one table per codebook position, the embeddings of a token's codes summed
            self.embed = nn.Embedding(model.codebook_size * model.cfg.num_codebooks, width)
            offsets = torch.arange(model.cfg.num_codebooks) * model.codebook_size
            self.register_buffer("code_offsets", offsets, persistent=False)
        if frozen:
            self.encoder.requires_grad_(False)
            self.quantizer.requires_grad_(False)
        self.train(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
            self.quantizer.eval()
        return self

    def grid_for(self, img_size: int) -> tuple[int, int]:
        return patch_grid(img_size, img_size, self.encoder.patch_size)

    def forward(self, frames):
        tokens, grid = self.forward_video(frames[:, None])
        return tokens[:, 0], grid

    def forward_video(self, clips):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            latents, grid = self.encoder(clips)
            quantized, codes, _ = self.quantizer(latents.flatten(1, 2))
        if self.use == "latents":
            tokens = self.proj(quantized)
        else:
            tokens = self.embed(codes.view(*codes.shape[:2], -1) + self.code_offsets).sum(-2)
        return tokens.view(*latents.shape[:3], -1), grid

    def stored_kwargs(self, kwargs: dict) -> dict:
        return {**kwargs, "arch": self.arch}


def _tokenizer_model(checkpoint: str, arch: dict | None) -> CViViT:
    """The C-ViViT of ``checkpoint`` (weights and architecture), else an untrained one of ``arch``."""
    if checkpoint:
        from mmfm.models.io import load_model  # the one save/load module; it imports no model at import time

        model = load_model(checkpoint)
        if not isinstance(model, CViViT):
            raise ModelError(f"model.vision_tokenizer_kwargs.checkpoint={checkpoint!r} holds a "
                             f"{model.arch_dict()['family']!r} model, not a C-ViViT; train one with `mmfm train "
                             "--config configs/tokenizer_cvivit.yaml`")
        if arch and tokenizer_config(arch) != model.cfg:
            raise ModelError(f"model.vision_tokenizer_kwargs.arch differs from the architecture of {checkpoint!r}; "
                             "drop arch (the checkpoint's is used)")
        return model
    if arch:
        return CViViT(tokenizer_config(arch))
    raise ModelError("model.vision_tokenizer=cvivit needs model.vision_tokenizer_kwargs.checkpoint: a tokenizer run "
                     "directory or .safetensors (`mmfm train --config configs/tokenizer_cvivit.yaml`)")


def tokenizer_config(arch: dict) -> TokenizerModelConfig:
    """The TokenizerModelConfig of an architecture block (``family`` may be left out)."""
    try:
        config = model_config({"family": "tokenizer", **arch}, prefix="model.vision_tokenizer_kwargs.arch.")
    except ConfigError as err:
        raise ModelError(str(err)) from None
    if not isinstance(config, TokenizerModelConfig):
        raise ModelError(f"model.vision_tokenizer_kwargs.arch is a {config.family!r} block, not a C-ViViT's "
                         "(family: tokenizer)")
    return config
