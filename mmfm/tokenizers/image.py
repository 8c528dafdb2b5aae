"""Image tokenizer at native aspect ratio (SOLO): variable-size images, no padding, no square crop.

Each image is resized so that its long side is the smallest patch multiple >= the original, capped at
``max_side``, and its short side is scaled by the same factor and rounded UP to a patch multiple (so no
content is cropped away). The output is a list of normalised (C, H, W) tensors whose sides are patch
multiples, ready for ``UnifiedTrunk.embed_images_packed``.
"""

import math

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from mmfm.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def native_grid_size(height: int, width: int, patch_size: int, max_side: int) -> tuple[int, int]:
    """Output (height, width): long side = min(round_up(long, patch), max_side), short side scaled, rounded up."""
    if height < 1 or width < 1:
        raise InputError(f"image of size {height}x{width} has no pixels")
    long_side, short_side = max(height, width), min(height, width)
    long_out = min(patch_size * math.ceil(long_side / patch_size), max_side)
    short_out = patch_size * math.ceil(short_side * long_out / long_side / patch_size)
    short_out = min(max(short_out, patch_size), long_out)
    return (long_out, short_out) if height >= width else (short_out, long_out)


class ImageTokenizer:
    """Callable: ``pixels = tok([pil_or_uint8_chw, ...])`` -> list of normalised (C, H, W) float tensors."""

    def __init__(self, patch_size: int = 16, max_side: int = 512, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if max_side % patch_size:
            raise InputError(f"max_side={max_side} must be a multiple of patch_size={patch_size}")
        self.patch_size, self.max_side = patch_size, max_side
        self.mean, self.std = list(mean), list(std)

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        return native_grid_size(height, width, self.patch_size, self.max_side)

    def __call__(self, images) -> list[torch.Tensor]:
        if isinstance(images, (Image.Image, torch.Tensor)):
            images = [images]
        return [self.one(image) for image in images]

    def one(self, image) -> torch.Tensor:
        """A PIL image or a (C, H, W) uint8 / float-in-[0, 1] tensor -> normalised (C, H', W')."""
        pixels = _as_float_chw(image)
        pixels = TF.resize(pixels, list(self.size_for(*pixels.shape[-2:])), antialias=True)
        return TF.normalize(pixels, self.mean, self.std)


def _as_float_chw(image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image.convert("RGB"))
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise InputError(f"expected a PIL image or a (C, H, W) tensor, got {type(image).__name__}")
    return TF.to_dtype(image, torch.float32, scale=True)
