"""Video tokenizer: decoded frames -> the (T, C, H, W) layout the trunk embeds.

Frames keep their aspect ratio (the same native size rule as images, one size for the whole clip). With
tubelets of t frames (C-ViViT) a clip must hold 1 + k*t frames: the first frame is patched alone and
the rest as whole tubelets, so ``trim_for_tubelets`` drops the trailing frames that do not fill one.
"""

import torch
from torchvision.transforms.v2 import functional as TF

from mmfm.errors import InputError
from mmfm.tokenizers.image import IMAGENET_MEAN, IMAGENET_STD, native_grid_size


def trim_for_tubelets(num_frames: int, tubelet_size: int) -> int:
    """The largest 1 + k*t <= num_frames (at least 1)."""
    if num_frames < 1:
        raise InputError("a clip needs at least one frame")
    return 1 + (num_frames - 1) // tubelet_size * tubelet_size


class VideoTokenizer:
    """Callable: ``clip = tok(frames)`` with frames (T, H, W, C) uint8 (decord / PyAV layout) -> (T', C, H', W')."""

    def __init__(self, patch_size: int = 16, max_side: int = 224, tubelet_size: int = 1,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if max_side % patch_size:
            raise InputError(f"max_side={max_side} must be a multiple of patch_size={patch_size}")
        self.patch_size, self.max_side, self.tubelet_size = patch_size, max_side, tubelet_size
        self.mean, self.std = list(mean), list(std)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 4 or frames.shape[-1] not in (1, 3):
            raise InputError(f"expected frames (T, H, W, C) with C in (1, 3), got {tuple(frames.shape)}")
        frames = frames[: trim_for_tubelets(frames.shape[0], self.tubelet_size)]
        clip = TF.to_dtype(frames.permute(0, 3, 1, 2), torch.float32, scale=True)
        if clip.shape[1] == 1:
            clip = clip.expand(-1, 3, -1, -1)
        size = native_grid_size(*clip.shape[-2:], self.patch_size, self.max_side)
        clip = TF.resize(clip, list(size), antialias=True)
        return TF.normalize(clip, self.mean, self.std)
