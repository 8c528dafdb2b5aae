"""Decoding of odd images, EXIF, flip ↔ text, native aspect, and bad files being skipped / raised."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfm.data import (
    ImageTextDataset,
    ImageTransform,
    UnreadableFile,
    collate,
    eval_transform,
    load_image,
    native_size,
    native_transform,
    swap_left_right,
    train_transform,
)
from mmfm.errors import DataError


def test_odd_modes_decode_to_rgb(tmp_path):
    base = Image.new("RGB", (12, 8), (10, 200, 30))
    rgba = Image.new("RGBA", (12, 8), (255, 255, 255, 0))
    rgba.putpixel((0, 0), (255, 255, 255, 255))
    sixteen = Image.fromarray(np.full((8, 12), 65535, np.uint16))
    cases = {"gray.png": base.convert("L"), "palette.png": base.convert("P"), "rgba.png": rgba,
             "cmyk.jpg": base.convert("CMYK"), "sixteen.png": sixteen, "bw.png": base.convert("1")}
    for name, image in cases.items():
        image.save(tmp_path / name)
        out = load_image(str(tmp_path / name))
        assert out.mode == "RGB" and out.size == (12, 8), name
        assert eval_transform(8)(out).shape == (3, 8, 8)
    transparent = np.asarray(load_image(str(tmp_path / "rgba.png")))
    assert transparent[0, 0].tolist() == [255, 255, 255] and transparent[5, 5].tolist() == [0, 0, 0]
    assert np.asarray(load_image(str(tmp_path / "sixteen.png"))).min() == 255  # 16-bit white stays white


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 5, 10))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(str(tmp_path / "rot.jpg"))
    assert out.size == (10, 30)
    pixels = np.asarray(out).astype(int)
    assert pixels[:5, :, 0].mean() > 200 and pixels[-5:, :, 0].mean() < 50  # the stripe is now on top


def test_swap_left_right_keeps_case_and_word_boundaries():
    assert swap_left_right("Left of the cube, right of RIGHT.") == "Right of the cube, left of LEFT."
    assert swap_left_right("leftover bright copyright") == "leftover bright copyright"


def test_flip_swaps_text_only_when_flipped(tmp_path, write_png, write_json):
    array = np.zeros((16, 16, 3), np.uint8)
    array[:, :8] = 255  # bright left half
    write_png(tmp_path / "half.png", array)
    ann = write_json(tmp_path / "a.json", [{"image": "half.png", "caption": "white on the left"}])
    ds = ImageTextDataset(ann, root=tmp_path, transform=train_transform(16, scale=(1.0, 1.0)))
    outcomes = set()
    for g in range(20):
        item = ds[g]
        flipped = item["image"][0, :, -1].mean() > item["image"][0, :, 0].mean()
        assert item["text"] == ("white on the right" if flipped else "white on the left")
        outcomes.add(bool(flipped))
    assert outcomes == {True, False}
    no_flip = ImageTextDataset(ann, root=tmp_path, transform=train_transform(16, flip=False))
    assert all(no_flip[g]["text"] == "white on the left" for g in range(10))


def test_native_aspect_sizes_are_patch_multiples():
    assert native_size(640, 480, 224, 16) == (176, 224)  # 480 * 224 / 640 = 168 → 176
    assert native_size(100, 400, 64, 16) == (64, 16)
    assert native_size(1000, 10, 64, 16) == (16, 64)  # never below one patch
    transform = native_transform(64, 16)
    for w, h in [(90, 60), (60, 90), (50, 50), (300, 40)]:
        out = transform(Image.new("RGB", (w, h)))
        height, width = out.shape[1:]
        assert height % 16 == 0 and width % 16 == 0 and max(height, width) == 64
        short_exact = min(w, h) * 64 / max(w, h)
        assert min(height, width) - 16 < short_exact <= min(height, width)


def test_train_crop_is_deterministic_per_generator():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    transform = ImageTransform(24, train=True)
    first = transform(image, np.random.default_rng(5))
    assert torch.equal(first, transform(image, np.random.default_rng(5)))
    assert not torch.equal(first, transform(image, np.random.default_rng(6)))


def _bad_files(tmp_path, write_png):
    """One file per kind of bad image input."""
    good = write_png(tmp_path / "good.png", size=(64, 64))
    data = Path(good).read_bytes()
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_bytes(b"this is not an image at all\n" * 10)
    Image.new("1", (10000, 10000)).save(tmp_path / "bomb.png")  # 100 MPixels, a few KB on disk
    return ["missing.png", "zero.png", "truncated.png", "text.png", "bomb.png"]


def test_bad_images_are_skipped_counted_or_raised(tmp_path, write_png, write_json):
    bad = _bad_files(tmp_path, write_png)
    ann = write_json(tmp_path / "a.json", [{"image": name, "caption": "x"} for name in ["good.png", *bad]])
    ds = ImageTextDataset(ann, root=tmp_path, transform=eval_transform(8))
    samples = []
    for index, name in enumerate(bad, start=1):
        with pytest.warns(UserWarning, match=name):
            samples.append(ds[index])
        assert not samples[-1]
    batch = collate([ds[0], *samples])
    assert (batch["num_seen"], batch["num_bad"], batch["image"].shape[0]) == (6, 5, 1)
    assert [p.rsplit("/", 1)[-1] for p in batch["bad_files"]] == bad
    strict = ImageTextDataset(ann, root=tmp_path, transform=eval_transform(8), on_error="raise")
    for index, name in enumerate(bad, start=1):
        with pytest.raises(DataError, match=rf"a.json entry {index}: unreadable file .*{name}"):
            strict[index]


def test_pixel_limit_is_configurable(tmp_path, write_png):
    path = write_png(tmp_path / "big.png", size=(64, 64))
    assert load_image(path, max_pixels=4096).size == (64, 64)
    with pytest.raises(UnreadableFile, match="decompression bomb"):
        load_image(path, max_pixels=4095)


def test_crop_scale_one_keeps_the_whole_image_and_only_flips():
    gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    img = Image.fromarray(gradient)
    whole = eval_transform(64, mean=(0, 0, 0), std=(1, 1, 1))(img)
    no_crop = train_transform(64, scale=(1.0, 1.0), flip=True, mean=(0, 0, 0), std=(1, 1, 1))
    outputs = [no_crop(img, np.random.default_rng(seed)) for seed in range(8)]
    assert all(torch.equal(o, whole) or torch.equal(o, whole.flip(-1)) for o in outputs)
    assert any(torch.equal(o, whole.flip(-1)) for o in outputs) and any(torch.equal(o, whole) for o in outputs)
