"""Vision tokenizers: pixels -> patch tokens + their grid, the unit of change of mmfm's vision input.

A tokenizer maps frames (N, C, H, W) to tokens (N, h*w, width) and the grid (h, w), and clips
(B, T, C, H, W) to (B, T', h*w, width). It adds no position and no CLS: ``UnifiedTrunk`` adds the CLS
token, the modality type, the 2-D position (sized for ``grid_for(img_size)``), the temporal embedding and
the rolling index once, for every tokenizer. Chosen by ``model.vision_tokenizer`` and its
``model.vision_tokenizer_kwargs``:

  ``patch``     linear patchify (ViT): a Conv2d with kernel = stride = patch
  ``conv``      early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"):
                log2(patch) 3x3 stride-2 convs with GroupNorm + ReLU, then a 1x1 conv to the width
  ``patch_conv`` ``patch`` plus a zero-initialised ``conv`` branch: starts as the linear patchify, learns shapes
  ``backbone``  any timm feature model (CrossViT, TNT, BiFormer, HorNet, P2AT, ResNets): one feature map
                through a 1x1 projection (Linear) to the width
  ``tubelet``   C-ViViT (Villegas et al. 2022): the first frame patched alone, later frames as t x p x p tubelets
  ``cvivit``    a trained C-ViViT tokenizer's discrete codes or quantised latents (``mmfm/tokenizers/cvivit.py``)

A new tokenizer is one ``VisionTokenizer`` subclass decorated with ``@register_vision_tokenizer(name)``: its
``__init__`` takes ``(width, img_size, patch_size, in_chans, **own_kwargs)`` and it implements ``forward``
and ``grid_for`` (``forward_video`` only when it tokenizes time jointly).
"""

import inspect
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.backbones.timm_models import create_timm_model, feature_taps, fixed_input_size, require_timm_model
from mmfm.errors import ModelError

_TOKENIZERS: dict[str, type["VisionTokenizer"]] = {}


def register_vision_tokenizer(name: str):
    """Class decorator: make a ``VisionTokenizer`` subclass available as ``model.vision_tokenizer: name``."""
    def register(cls):
        _TOKENIZERS[name] = cls
        return cls
    return register


def list_vision_tokenizers() -> list[str]:
    return sorted(_TOKENIZERS)


def create_vision_tokenizer(name: str, width: int, img_size: int, patch_size: int, in_chans: int = 3, /,
                            **kwargs) -> "VisionTokenizer":
    """The tokenizer registered as ``name``; unknown names and keyword arguments are ModelErrors.

    The arguments before ``/`` are positional-only, so ``kwargs`` may hold a ``name`` (the backbone's).
    """
    if name not in _TOKENIZERS:
        raise ModelError(f"model.vision_tokenizer={name!r} is not a vision tokenizer; "
                         f"choose one of {', '.join(list_vision_tokenizers())}")
    cls = _TOKENIZERS[name]
    try:
        inspect.signature(cls).bind(width, img_size, patch_size, in_chans, **kwargs)
    except TypeError as err:
        raise ModelError(f"model.vision_tokenizer_kwargs for {name!r}: {err}") from None
    return cls(width, img_size, patch_size, in_chans, **kwargs)


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    if height % patch_size or width % patch_size:
        raise ModelError(f"image size {height}x{width} is not a multiple of patch {patch_size}; "
                         "use the native-aspect transform, which rounds sizes up to the patch grid")
    return height // patch_size, width // patch_size


class VisionTokenizer(nn.Module):
    """Pixels -> tokens without position or CLS. Subclasses implement ``forward`` and ``grid_for``."""

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N, C, H, W) -> tokens (N, h*w, width), grid (h, w)."""
        raise NotImplementedError

    def grid_for(self, img_size: int) -> tuple[int, int]:
        """The token grid of an ``img_size`` x ``img_size`` input (the trunk sizes its position embedding by it)."""
        raise NotImplementedError

    def forward_video(self, clips: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, T, C, H, W) -> tokens (B, T', h*w, width), grid; by default every frame alone (T' = T)."""
        tokens, grid = self(clips.flatten(0, 1))
        return tokens.unflatten(0, clips.shape[:2]), grid

    def no_weight_decay(self) -> set[str]:
        return set()

    def stored_kwargs(self, kwargs: dict) -> dict:
        """The ``model.vision_tokenizer_kwargs`` a checkpoint stores to rebuild this tokenizer (as given, by default)."""
        return kwargs

    def load_patch_embed(self, proj: nn.Conv2d) -> None:
        """Start from a ViT's linear patch embedding (``UnifiedTrunk.from_timm``); only patch tokenizers can."""
        raise ModelError(f"{type(self).__name__} has no linear patch embedding to load a timm ViT's into; "
                         "use model.vision_tokenizer=patch or tubelet with a timm init")


@register_vision_tokenizer("patch")
class PatchTokenizer(VisionTokenizer):
    """Linear patchify: ``proj`` is timm's ``patch_embed.proj`` (a Conv2d, kernel = stride = patch)."""

    def __init__(self, width: int, img_size: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, patch_size, patch_size)

    def grid_for(self, img_size: int) -> tuple[int, int]:
        return patch_grid(img_size, img_size, self.patch_size)

    def forward(self, frames):
        grid = patch_grid(*frames.shape[-2:], self.patch_size)
        return self.proj(frames).flatten(2).transpose(1, 2), grid

    def load_patch_embed(self, proj: nn.Conv2d) -> None:
        self.proj.load_state_dict(proj.state_dict())


@register_vision_tokenizer("tubelet")
class TubeletTokenizer(PatchTokenizer):
    """C-ViViT embedding: the first frame through the 2-D ``proj``, later frames as t x p x p tubelets.

    The Conv3d starts as the 2-D kernel copied into every time slice and divided by t, so a still clip
    embeds every token-frame exactly like its image. A clip needs 1 + k*t frames; an image is one frame.
    """

    def __init__(self, width: int, img_size: int, patch_size: int, in_chans: int = 3, tubelet_size: int = 2):
        super().__init__(width, img_size, patch_size, in_chans)
        if not isinstance(tubelet_size, int) or tubelet_size < 1:
            raise ModelError(f"model.vision_tokenizer_kwargs.tubelet_size={tubelet_size!r} must be an integer >= 1")
        self.tubelet_size = tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.tubelet_proj = nn.Conv3d(in_chans, width, kernel, kernel)
        self.inflate()

    @torch.no_grad()
    def inflate(self) -> None:
        """Copy the 2-D patch kernel into every time slice of the tubelet Conv3d, divided by t."""
        weight = self.proj.weight[:, :, None].expand_as(self.tubelet_proj.weight)
        self.tubelet_proj.weight.copy_(weight / self.tubelet_size)
        self.tubelet_proj.bias.copy_(self.proj.bias)

    def load_patch_embed(self, proj: nn.Conv2d) -> None:
        super().load_patch_embed(proj)
        self.inflate()

    def forward_video(self, clips):
        num_frames = clips.shape[1]
        if (num_frames - 1) % self.tubelet_size:
            raise ModelError(f"clip of {num_frames} frames: with tubelet_size={self.tubelet_size} a clip needs "
                             f"1 + k*{self.tubelet_size} frames (first frame alone, then whole tubelets)")
        first, grid = self(clips[:, 0])
        if num_frames == 1:
            return first[:, None], grid
        later = self.tubelet_proj(clips[:, 1:].transpose(1, 2))  # (B, D, T' - 1, h, w)
        return torch.cat([first[:, None], later.flatten(3).permute(0, 2, 3, 1)], dim=1), grid


def early_conv_stem(in_chans: int, width: int, patch_size: int) -> tuple[nn.Sequential, int]:
    """log2(patch) 3x3 stride-2 convs (GroupNorm + ReLU), channels doubling up to ``width``; and their output channels.

    GroupNorm, not the paper's BatchNorm: the trunk embeds packed images one at a time and folds video
    frames into the batch, so batch statistics would make an image's tokens depend on its batch and on
    train vs eval mode (and need syncing across GPUs); GroupNorm gives every image the same tokens alone,
    batched, packed or as a frame.
    """
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ModelError(f"model.patch_size={patch_size}: a convolutional vision tokenizer needs a power of two >= 2 "
                         "(one stride-2 conv per halving)")
    depth = patch_size.bit_length() - 1
    channels = [in_chans] + [max(width >> (depth - 1 - i), 1) for i in range(depth)]
    layers = []
    for fan_in, fan_out in itertools.pairwise(channels):
        layers += [nn.Conv2d(fan_in, fan_out, 3, 2, 1, bias=False),
                   nn.GroupNorm(math.gcd(32, fan_out), fan_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers), channels[-1]


@register_vision_tokenizer("conv")
class ConvTokenizer(VisionTokenizer):
    """Early convolutions: the stem of ``early_conv_stem``, then a 1x1 conv to the width."""

    def __init__(self, width: int, img_size: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.stem, channels = early_conv_stem(in_chans, width, patch_size)
        self.proj = nn.Conv2d(channels, width, 1)

    def grid_for(self, img_size: int) -> tuple[int, int]:
        return patch_grid(img_size, img_size, self.patch_size)

    def forward(self, frames):
        grid = patch_grid(*frames.shape[-2:], self.patch_size)
        return self.proj(self.stem(frames)).flatten(2).transpose(1, 2), grid


@register_vision_tokenizer("patch_conv")
class PatchConvTokenizer(PatchTokenizer):
    """The linear patchify plus an early-convolution branch whose 1x1 output starts at zero.

    At initialisation the tokens are exactly the ``patch`` tokenizer's, so the colour and position signal
    a linear patch carries from the first step is kept (a conv stem alone starts slower: its ITC plateaus
    for ~150 steps); the convolutions then add what a linear patch cannot see cheaply, the shape of an
    object that straddles patch borders at any offset (translation-equivariant 3x3 filters).
    """

    def __init__(self, width: int, img_size: int, patch_size: int, in_chans: int = 3):
        super().__init__(width, img_size, patch_size, in_chans)
        self.stem, channels = early_conv_stem(in_chans, width, patch_size)
        self.conv_proj = nn.Conv2d(channels, width, 1)
        nn.init.zeros_(self.conv_proj.weight)
        nn.init.zeros_(self.conv_proj.bias)

    def forward(self, frames):
        tokens, grid = super().forward(frames)
        return tokens + self.conv_proj(self.stem(frames)).flatten(2).transpose(1, 2), grid


@register_vision_tokenizer("backbone")
class BackboneTokenizer(VisionTokenizer):
    """A timm feature map (``features_only``) -> h*w tokens through a Linear projection to the width.

    * multi-branch models (CrossViT): timm taps every branch at the same block; all of them are taken, each
      resampled (bilinear, antialiased) onto the coarsest branch grid and concatenated along channels. For
      ``crossvit_tiny_240``: the 20x20x96 branch onto the 14x14x192 one, 196 tokens of 288 channels (the
      two token sets side by side would be 596 tokens, three times the trunk cost, for little gain).
    * token models (TNT): timm's features are the patch tokens, CLS dropped, as an NCHW map.
    * fixed-input models (``pretrained_cfg['fixed_input_size']``: CrossViT 240, TNT 224): inputs are resized
      to that size here; ``input_size=S`` builds them for S x S instead (timm resamples pretrained positions).
    """

    def __init__(self, width: int, img_size: int, patch_size: int, in_chans: int = 3, *, name: str = "",
                 out_index: int = -1, input_size: int | None = None, pretrained: bool = False,
                 pretrained_file: str | None = None, **timm_kwargs):
        """
        Args:
            name: timm model name (any model with ``features_only`` support).
            out_index: which feature map (timm feature-info index, negative from the end).
            input_size: build a fixed-size model (CrossViT, TNT) for this input side instead of its default.
            pretrained: load the model's pretrained weights (timm hub or ``pretrained_file``).
            pretrained_file: local weights file (.safetensors / .pth), implies ``pretrained``.
            timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``, BiFormer's ``n_win``).
        """
        super().__init__()
        if not name:
            raise ModelError("model.vision_tokenizer=backbone needs model.vision_tokenizer_kwargs.name, "
                             "a timm model name such as hornet_tiny_7x7 (timm.list_models())")
        require_timm_model(name, "model.vision_tokenizer_kwargs.name")
        self.name, self.in_chans = name, in_chans
        timm_kwargs["in_chans"] = in_chans
        if input_size:
            timm_kwargs["img_size"] = input_size
        try:
            taps = feature_taps(name, out_index, **timm_kwargs)
        except TypeError as err:
            raise ModelError(f"model.vision_tokenizer_kwargs for timm model {name!r}: {err}") from None
        self.backbone = create_timm_model(name, pretrained, pretrained_file, features_only=True,
                                          out_indices=taps, **timm_kwargs)
        self.input_size = fixed_input_size(self.backbone, input_size)
        channels, self._grid = self._probe(img_size)
        self.img_size = img_size
        self.proj = nn.Linear(channels, width)

    @torch.no_grad()
    def _probe(self, img_size: int) -> tuple[int, tuple[int, int]]:
        """Channels and grid of the merged feature map for an ``img_size`` input (eval mode: BN untouched)."""
        was_training = self.backbone.training
        self.backbone.eval()
        feature = self.feature_map(torch.zeros(1, self.in_chans, img_size, img_size))
        self.backbone.train(was_training)
        return feature.shape[1], (feature.shape[2], feature.shape[3])

    def grid_for(self, img_size: int) -> tuple[int, int]:
        return self._grid if img_size == self.img_size else self._probe(img_size)[1]

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "model", self.backbone)
        own = inner.no_weight_decay() if hasattr(inner, "no_weight_decay") else set()
        prefix = "backbone.model." if inner is not self.backbone else "backbone."
        return {prefix + n for n in own}

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C', h, w): the chosen stage, branches merged on the coarsest grid."""
        if self.input_size is not None and tuple(pixels.shape[-2:]) != self.input_size:
            pixels = F.interpolate(pixels, size=self.input_size, mode="bilinear", align_corners=False,
                                   antialias=True)
        maps = self.backbone(pixels)
        grid = min((m.shape[-2:] for m in maps), key=lambda size: size[0] * size[1])
        maps = [m if m.shape[-2:] == grid else
                F.interpolate(m, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
                for m in maps]
        return torch.cat(maps, dim=1)

    def forward(self, frames):
        feature = self.feature_map(frames)
        return self.proj(feature.flatten(2).transpose(1, 2)), (feature.shape[2], feature.shape[3])


# Tokenizers in files of their own register when imported here, after the names they use are defined.
from mmfm.tokenizers import cvivit  # noqa: F401
