"""Shared test fixtures: tiny PNG / MP4 / JSON writers (generic, no mmfm imports)."""

import json

import numpy as np
import pytest
from PIL import Image


def _write_png(path, array=None, size=(32, 24), color=(200, 30, 30), mode=None):
    """Write a PNG from an array (or a solid `size` (w, h) image of `color`); returns the path as str."""
    image = Image.fromarray(array, mode) if array is not None else Image.new("RGB", size, color)
    image.save(path)
    return str(path)


def _write_mp4(path, frames, fps=8):
    """Write uint8 frames (T, H, W, 3) as an H.264 MP4 with PyAV (near-lossless); returns the path as str."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def write_png():
    return _write_png


@pytest.fixture
def write_mp4():
    return _write_mp4


@pytest.fixture
def write_json():
    return _write_json


TINY_MODEL = [
    "model.width=64", "model.depth=3", "model.heads=2", "model.fusion_layer=2", "model.embed_dim=32",
    "model.patch_size=16", "objective.queue_size=37", "objective.momentum=0.995", "model.max_frames=4",
    "data.num_frames=2",
    "data.num_workers=0", "train.batch_size=16", "train.video_batch_size=16", "train.warmup_steps=2",
    "train.log_every=1",
    "train.threads=1", "eval.batch_size=64",
]


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A tiny ShapesWorld corpus (generated once per test session)."""
    from mmfm.data.shapes import generate

    root = tmp_path_factory.mktemp("shapes")
    generate(root, images=160, videos=24, size=64, frames=4, seed=0, workers=1)
    return root


@pytest.fixture
def tiny_overrides(tiny_shapes):
    """Overrides that make configs/demo_shapes.yaml a seconds-long run on the tiny corpus."""
    return [f"data.root={tiny_shapes}", *TINY_MODEL]
