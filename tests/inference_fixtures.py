"""Shared fixtures of the inference tests: a tiny ShapesWorld corpus, a tiny model trained on it in-process,
its Pipeline and image index, and writers of the bad inputs every interface must reject.

The model (width 64, depth 3, fusion at layer 2) is trained for a few seconds with ITC + ITM on
``GALLERY_SIZE`` (image, caption) pairs, so retrieval of those captions is far better than chance.
Import the fixtures with ``from inference_fixtures import *  # noqa: F401,F403``.
"""

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmfm.config import ModelConfig
from mmfm.models.io import save_model
from mmfm.models.model import MMFM
from mmfm.models.trunk import TokenBatch

REPO = Path(__file__).resolve().parents[1]
GALLERY_SIZE = 16
TRAIN_STEPS = 80
NUM_FRAMES = 4


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A tiny ShapesWorld corpus (images, videos, captions, QA)."""
    root = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_data.py"), "shapes", "--out", str(root),
                    "--images", "40", "--videos", "6", "--seed", "0", "--workers", "1"],
                   check=True, capture_output=True)
    return root


@pytest.fixture(scope="session")
def gallery(shapes_root) -> tuple[list[str], list[str]]:
    """(image paths, one caption each) of ``GALLERY_SIZE`` distinct training images."""
    entries = json.loads((shapes_root / "annotations" / "pretrain.json").read_text())
    paths, captions = [], []
    for entry in entries:
        path = str(shapes_root / entry["image"])
        if path not in paths and entry["caption"] not in captions:
            paths.append(path)
            captions.append(entry["caption"])
    return paths[:GALLERY_SIZE], captions[:GALLERY_SIZE]


@pytest.fixture(scope="session")
def videos(shapes_root) -> list[str]:
    return sorted(str(p) for p in (shapes_root / "videos").rglob("*.mp4"))


def _tiny_model(shapes_root: Path) -> MMFM:
    annotations = shapes_root / "annotations"
    answers = {"vqa": json.loads((annotations / "answer_list.json").read_text()),
               "video_qa": json.loads((annotations / "videoqa_answer_list.json").read_text())}
    preprocess = {"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "num_frames": NUM_FRAMES}
    arch = ModelConfig(width=64, depth=3, heads=2, fusion_layer=2, embed_dim=32, img_size=64, patch_size=8)
    return MMFM(arch, answers, preprocess)


def _train_itc_itm(model: MMFM, pixels: torch.Tensor, captions: list[str], steps: int) -> None:
    """Symmetric InfoNCE + ITM (true pair vs the hardest wrong caption) on one fixed batch."""
    ids, mask = model.tokenizer(captions)
    targets = torch.arange(len(captions))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        vision, text = model.encode_vision(pixels), model.encode_text(ids, mask)
        logits = vision.feat @ text.feat.t() / 0.07
        itc = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        hardest = logits.detach().fill_diagonal_(float("-inf")).argmax(1)
        negatives = TokenBatch(text.tokens.x[hardest], text.tokens.mask[hardest])
        itm_logits = torch.cat([model.itm_logits(text.tokens, vision.tokens),
                                model.itm_logits(negatives, vision.tokens)])
        itm = F.cross_entropy(itm_logits, torch.cat([torch.ones_like(targets), torch.zeros_like(targets)]))
        optimizer.zero_grad()
        (itc + itm).backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(shapes_root, gallery, tmp_path_factory) -> Path:
    """A .safetensors file of the tiny model trained on the gallery (usable by mmfm.load and the CLI)."""
    from mmfm.inference.pipeline import Pipeline

    torch.manual_seed(0)
    model = _tiny_model(shapes_root)
    paths, captions = gallery
    pixels = torch.stack([Pipeline(model, "cpu").read_image(p) for p in paths])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is several times faster on a loaded 2-core machine
    try:
        _train_itc_itm(model, pixels, captions, TRAIN_STEPS)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint):
    import mmfm

    return mmfm.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def image_index(tiny_pipe, gallery):
    return tiny_pipe.index(images=gallery[0], progress=False)


# ---- bad inputs ---------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb_png(path: Path, side: int = 100_000) -> Path:
    """A ~100-byte PNG whose header claims side x side pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(data + _png_chunk(b"IEND", b""))
    return path


def write_bad_inputs(directory: Path) -> dict[str, Path]:
    """Files every interface must reject: non-image bytes (.png), an unreadable video (.mp4), a bomb."""
    directory.mkdir(parents=True, exist_ok=True)
    not_image = directory / "not_image.png"
    not_image.write_bytes(b"this is plain text, not a PNG\n" * 4)
    bad_video = directory / "broken.mp4"
    bad_video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    return {"not_image": not_image, "bad_video": bad_video, "bomb": write_bomb_png(directory / "bomb.png")}


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))
