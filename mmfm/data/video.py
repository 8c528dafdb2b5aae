"""Video decoding with decord and frame sampling.

`frame_indices` picks T frames out of n: "uniform" takes the centre of T equal segments, "random" one
random frame per segment (from the per-sample Generator). Videos shorter than T repeat frames.

The video datasets are the image ones with a clip (T, 3, H, W) under "video" instead of an image:
`VideoTextDataset`, `VideoRetrievalEvalDataset`, `VideoQADataset`; one crop/flip per clip.

`load_clip` reads them with `decord.VideoReader(path, num_threads=1).get_batch`. decord over-reports
the frame count of some files (and `get_batch` past the real end fails or hangs), so indices are
clamped to `len(reader)` and, when a read fails, retried against a shrinking frame count.
"""

from __future__ import annotations

import os

import av
import decord
import numpy as np
import torch

from mmfm.data.formats import ImageTextDataset, RetrievalEvalDataset, VQADataset, resolve
from mmfm.data.transforms import UnreadableFile

SAMPLING_MODES = ("uniform", "random")
_READ_ATTEMPTS = 4
_DECODE_ERRORS = (decord.DECORDError, RuntimeError, IndexError, ValueError)


def frame_indices(num_available: int, num_frames: int, sampling: str = "uniform",
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """T frame indices in [0, num_available): segment centres ("uniform") or one random per segment."""
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"frame sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    bounds = np.arange(num_frames + 1) * (num_available / num_frames)
    if sampling == "uniform":
        indices = np.floor((bounds[:-1] + bounds[1:]) / 2)
    else:
        low = np.floor(bounds[:-1])
        high = np.maximum(low + 1, np.floor(bounds[1:]))
        indices = rng.integers(low, high)
    return np.clip(indices.astype(np.int64), 0, num_available - 1)


def open_video(path: str):
    """A decord VideoReader (single-threaded) for `path`; raises UnreadableFile."""
    if not os.path.isfile(path):
        raise UnreadableFile(path, "file not found")
    if os.path.getsize(path) == 0:
        raise UnreadableFile(path, "empty file (0 bytes)")
    try:
        return decord.VideoReader(path, num_threads=1)
    except _DECODE_ERRORS as err:
        raise UnreadableFile(path, f"cannot open video ({_first_line(err)})") from None


def read_frames(reader, path: str, num_frames: int, sampling: str = "uniform",
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Sample and decode T frames → uint8 (T, H, W, 3), shrinking the frame count when reads fail."""
    available = len(reader)
    if available <= 0:
        raise UnreadableFile(path, "video has no frames")
    error = None
    for _ in range(_READ_ATTEMPTS):
        indices = frame_indices(available, num_frames, sampling, rng)
        try:
            return reader.get_batch(indices.tolist()).asnumpy()
        except _DECODE_ERRORS as err:
            error = err
            available = max(1, (available * 3) // 4)
    raise UnreadableFile(path, f"cannot decode frames ({_first_line(error)})")


def load_clip(path: str, num_frames: int, sampling: str = "uniform",
              rng: np.random.Generator | None = None) -> torch.Tensor:
    """Decode T sampled frames of `path` as a uint8 tensor (T, H, W, 3). Raises UnreadableFile.

    If decord opens the file but cannot return its frames (decord2 fails on some frame widths, e.g.
    48 or 96 px: "The size must exactly match"), the frames are decoded with PyAV instead.
    """
    reader = open_video(path)
    try:
        frames = read_frames(reader, path, num_frames, sampling, rng)
    except UnreadableFile as decord_error:
        frames = _read_frames_pyav(path, num_frames, sampling, rng, decord_error)
    return torch.from_numpy(frames)


def _read_frames_pyav(path: str, num_frames: int, sampling: str, rng, decord_error: UnreadableFile) -> np.ndarray:
    """Fallback decoder: all frames with PyAV, then the same sampling; re-raises decord's error on failure."""
    try:
        with av.open(path) as container:
            decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.FFmpegError, ValueError, IndexError):
        raise decord_error from None
    if not decoded:
        raise decord_error
    indices = frame_indices(len(decoded), num_frames, sampling, rng)
    return np.stack([decoded[i] for i in indices])


def _first_line(err: BaseException | None) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class _VideoMedia:
    """Mixin: replaces the image of an AnnotationDataset by a clip of `num_frames` sampled frames."""

    media_key = "video"

    def _init_video(self, num_frames: int, sampling: str) -> None:
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"frame sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.num_frames = num_frames
        self.sampling = sampling

    def load_media(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
        """Decode T frames of the entry's video → (float clip (T, 3, H, W), whether it was flipped)."""
        frames = load_clip(resolve(self.root, self.entries[index]["video"]), self.num_frames, self.sampling, rng)
        geom = self.transform.sample(frames.shape[2], frames.shape[1], rng)
        return self.transform.frames(frames, geom), geom.flip


class VideoTextDataset(_VideoMedia, ImageTextDataset):
    """``{"video", "caption": str | [..], "video_id"?}`` → video (T, 3, H, W), text, video_id, index."""

    def __init__(self, ann_file, root=None, num_frames: int = 8, transform=None, sampling: str = "uniform",
                 **kwargs):
        self._init_video(num_frames, sampling)
        super().__init__(ann_file, root, transform, **kwargs)


class VideoRetrievalEvalDataset(_VideoMedia, RetrievalEvalDataset):
    """Video retrieval eval: items are videos; `texts`, `txt2img` (= `txt2vid`), `img2txt` (= `vid2txt`)."""

    def __init__(self, ann_file, root=None, num_frames: int = 8, transform=None, sampling: str = "uniform",
                 **kwargs):
        self._init_video(num_frames, sampling)
        super().__init__(ann_file, root, transform, **kwargs)

    @property
    def txt2vid(self) -> list[int]:
        return self.txt2img

    @property
    def vid2txt(self) -> list[list[int]]:
        return self.img2txt


class VideoQADataset(_VideoMedia, VQADataset):
    """Video QA: VQADataset entries with ``"video"`` → video, question, answers, target, question_id."""

    def __init__(self, ann_file, root=None, num_frames: int = 8, transform=None, sampling: str = "uniform",
                 answer_list=None, **kwargs):
        self._init_video(num_frames, sampling)
        super().__init__(ann_file, root, transform, answer_list, **kwargs)
