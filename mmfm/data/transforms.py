"""Image decoding and the image / mask / clip transforms.

Decoding (`load_image`) accepts every common PIL mode (grayscale, RGBA composited on black, palette,
CMYK, 16-bit) and applies the EXIF orientation; an unreadable file or a decompression bomb raises
`UnreadableFile`, which the datasets turn into a skipped sample (or a DataError). A bomb is an image (or
a video frame) over `max_pixels` (default `DEFAULT_MAX_PIXELS`, config key `data.max_pixels`), checked
from the header before any pixel is decoded.

`ImageTransform` splits every transform in two steps so that one random draw can be applied to
several things: `sample(width, height, rng)` draws a `Geometry` (crop box, output size, flip) from a
per-sample numpy Generator, then `image()`, `mask()` (nearest) and `frames()` (a whole clip, same crop
for every frame) apply it. Modes:

- train: random resized crop (scale (0.5, 1), aspect 3/4..4/3) + optional horizontal flip;
- eval: resize the short side + center crop (one square crop, resized);
- native aspect (SOLO): long side = `max_size` (a multiple of `patch`), short side scaled and rounded
  up to a multiple of `patch`; output sizes vary per image.

When an image is flipped, texts that mention "left"/"right" must be swapped: `swap_left_right`.
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 64_000_000  # per image or video frame (an 8000x8000 photo; 192 MB as RGB)
DEFAULT_MAX_VIDEO_PIXELS = 300_000_000  # per decoded clip, frames x H x W: 8 frames of 8K or 32 of 4K (0.9 GB)


class UnreadableFile(Exception):
    """A media file that cannot be decoded (missing, empty, truncated, not media, too large)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# --- decoding ---

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)


@contextmanager
def _decoding(path: str, what: str):
    """Turn any decode failure of `path` into UnreadableFile; PIL's bomb warning counts as a failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except FileNotFoundError:
        raise UnreadableFile(path, "file not found") from None
    except _DECODE_ERRORS as err:
        raise UnreadableFile(path, f"cannot decode {what} ({type(err).__name__}: {err})") from None


def check_frame_size(width: int, height: int, path: str, max_pixels: int) -> None:
    """Raise UnreadableFile when one image / video frame of width x height is over `max_pixels`."""
    if width * height > max_pixels:
        raise UnreadableFile(path, f"decompression bomb: {width}x{height} pixels is more than the limit of "
                                   f"{max_pixels} per image or frame (raise data.max_pixels in the config, "
                                   f"or max_pixels= in the Python API, if the file is genuine)")


def load_image(path: str | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "") -> Image.Image:
    """Decode `path` (or an open binary file, called `name` in errors) to an RGB PIL image, EXIF orientation
    applied. Raises UnreadableFile."""
    name = name or str(path)
    with _decoding(name, "image"), Image.open(path) as img:
        check_frame_size(img.width, img.height, name, max_pixels)
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


def image_pixels(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Width x height of an image from its header alone (nothing decoded). Raises UnreadableFile."""
    with _decoding(path, "image"), Image.open(path) as img:
        check_frame_size(img.width, img.height, path, max_pixels)
        return img.width * img.height


def load_mask(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a class-id mask PNG (uint8 ids, 255 = ignore) as stored ("L" or "P"). Raises UnreadableFile."""
    with _decoding(path, "mask"), Image.open(path) as mask:
        check_frame_size(mask.width, mask.height, path, max_pixels)
        mask.load()
        return mask.copy() if mask.mode in ("L", "P") else mask.convert("L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB: alpha composited on black, 16/32-bit scaled to 0..255."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGB", img.size, (0, 0, 0))
        black.paste(rgba, mask=rgba.getchannel("A"))
        return black
    return img.convert("RGB")


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """16-bit ("I;16*", "I") → 8-bit by value * 255 / 65535; float ("F") assumed in 0..255."""
    if mode == "F":
        return np.clip(array, 0, 255).astype(np.uint8)
    scaled = np.clip(array.astype(np.float32), 0, 65535) * (255.0 / 65535.0)
    return np.rint(scaled).astype(np.uint8)


# --- text side of a flip ---

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap the words "left" and "right" (whole words only), keeping their case: Left ↔ Right, LEFT ↔ RIGHT."""
    return _LEFT_RIGHT.sub(_swapped_word, text)


def _swapped_word(match: re.Match) -> str:
    word = match.group(0)
    other = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return other.upper()
    return other.capitalize() if word[0].isupper() else other


# --- geometry ---

@dataclass(frozen=True)
class Geometry:
    """One draw of a transform: source crop box (left, top, right, bottom), output (height, width), flip."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    flip: bool


def native_size(width: int, height: int, max_size: int, patch: int) -> tuple[int, int]:
    """SOLO native-aspect (height, width): long side = max_size, short side rounded up to a patch multiple."""
    long_side, short_side = max(width, height), min(width, height)
    short_out = patch * math.ceil(short_side * max_size / long_side / patch)
    short_out = min(max(short_out, patch), max_size)
    return (max_size, short_out) if height >= width else (short_out, max_size)


def random_resized_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, drawn from a numpy Generator; returns a crop box."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    return center_box(width, height, min(max(width / height, ratio[0]), ratio[1]))


def center_box(width: int, height: int, aspect: float = 1.0) -> tuple[int, int, int, int]:
    """The largest centred box of the given aspect (width / height)."""
    w, h = (round(height * aspect), height) if width / height > aspect else (width, round(width / aspect))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageTransform:
    """Crop / resize / flip / normalize for images, masks and clips, with explicit per-sample randomness."""

    def __init__(self, size: int = 224, *, train: bool = False, scale: tuple[float, float] = (0.5, 1.0),
                 flip: bool = True, native_aspect: bool = False, max_size: int | None = None,
                 patch: int = 16, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = size
        self.train = train
        self.scale = tuple(scale)
        self.flip = flip and train
        self.native_aspect = native_aspect
        self.max_size = max_size or size
        self.patch = patch
        if native_aspect and self.max_size % patch:
            raise ValueError(f"native-aspect max_size={self.max_size} must be a multiple of patch={patch}")
        # normalize uint8 in one fused op: (x / 255 - mean) / std == x * gain + bias
        std_255 = torch.tensor(std, dtype=torch.float32).mul(255).view(3, 1, 1)
        self._gain = 1.0 / std_255
        self._bias = -torch.tensor(mean, dtype=torch.float32).mul(255).view(3, 1, 1) / std_255

    def __repr__(self) -> str:
        mode = f"native(max_size={self.max_size}, patch={self.patch})" if self.native_aspect else self.size
        return f"ImageTransform({mode}, train={self.train}, flip={self.flip}, scale={self.scale})"

    def sample(self, width: int, height: int, rng: np.random.Generator | None) -> Geometry:
        """Draw the geometry for a (width, height) source; only train mode consumes randomness."""
        if self.native_aspect:
            box, size = (0, 0, width, height), native_size(width, height, self.max_size, self.patch)
        elif self.train and self.scale != (1.0, 1.0):
            box, size = random_resized_box(width, height, self.scale, rng), (self.size, self.size)
        else:
            box, size = center_box(width, height), (self.size, self.size)
        flip = bool(self.flip and rng.random() < 0.5)
        return Geometry(box, size, flip)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Transform one PIL image (a fresh random draw when `rng` is None)."""
        rng = np.random.default_rng() if rng is None else rng
        return self.image(img, self.sample(img.width, img.height, rng))

    def image(self, img: Image.Image, geom: Geometry) -> torch.Tensor:
        """RGB PIL image → normalized float tensor (3, H, W)."""
        out = _pil_resized_crop(img, geom, Image.Resampling.BILINEAR)
        return self.normalize(torch.from_numpy(np.array(out)).permute(2, 0, 1))

    def mask(self, mask: Image.Image, geom: Geometry) -> torch.Tensor:
        """Class-id mask (PIL "L"/"P"/"I") → LongTensor (H, W), nearest resampling (ignore ids survive)."""
        out = _pil_resized_crop(mask, geom, Image.Resampling.NEAREST)
        return torch.from_numpy(np.array(out)).long()

    def frames(self, frames: torch.Tensor, geom: Geometry) -> torch.Tensor:
        """uint8 clip (T, H, W, 3) → normalized float (T, 3, h, w), the same crop and flip for all frames."""
        left, top, right, bottom = geom.box
        clip = frames.permute(0, 3, 1, 2)[:, :, top:bottom, left:right]
        clip = TF.resize(clip, list(geom.size), antialias=True)
        if geom.flip:
            clip = clip.flip(-1)
        return self.normalize(clip)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) → contiguous float, (x / 255 - mean) / std."""
        return torch.addcmul(self._bias, pixels.contiguous().float(), self._gain)


def _pil_resized_crop(img: Image.Image, geom: Geometry, resample) -> Image.Image:
    """Crop + resize in one PIL call (the box is resampled directly), then flip."""
    height, width = geom.size
    out = img.resize((width, height), resample, box=geom.box, reducing_gap=None)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if geom.flip else out


def train_transform(size: int = 224, scale=(0.5, 1.0), flip: bool = True, **norm) -> ImageTransform:
    """Random resized crop + (optional) horizontal flip + normalize."""
    return ImageTransform(size, train=True, scale=scale, flip=flip, **norm)


def eval_transform(size: int = 224, **norm) -> ImageTransform:
    """Resize short side + center crop + normalize."""
    return ImageTransform(size, train=False, **norm)


def native_transform(max_size: int = 224, patch: int = 16, train: bool = False, flip: bool = True,
                     **norm) -> ImageTransform:
    """SOLO native aspect: long side = max_size, short side rounded up to a multiple of patch."""
    return ImageTransform(max_size, train=train, flip=flip, native_aspect=True, max_size=max_size,
                          patch=patch, **norm)
