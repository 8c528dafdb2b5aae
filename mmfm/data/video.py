"""Video decoding with decord and frame sampling.

`frame_indices` picks T frames out of n: "uniform" takes the centre of T equal segments, "random" one
random frame per segment (from the per-sample Generator). Videos shorter than T repeat frames.

The video datasets are the image ones with a clip (T, 3, H, W) under "video" instead of an image:
`VideoTextDataset`, `VideoRetrievalEvalDataset`, `VideoQADataset`; one crop/flip per clip.

`load_clip` reads them with `decord.VideoReader(path, num_threads=1).get_batch`. decord over-reports
the frame count of some files (and `get_batch` past the real end fails or hangs), so indices are
clamped to `len(reader)` and, when a read fails, retried against a shrinking frame count.

Limits. Opening a file in decord (or PyAV) already decodes frames, so `probe_video` first reads the
frame size and the declared frame count from the container with PyAV, passing FFmpeg's `max_pixels`
decoder option so that its stream probing decodes no frame over the limit. A frame over `max_pixels`
(`data.max_pixels`) or T frames over `max_video_pixels` (`data.max_video_pixels`, T x H x W in all)
raise `UnreadableFile` before anything else is decoded; the decoded clip is checked again. A video
that yields fewer frames than its container declares (a truncated file) loads from the frames there
are, with a warning naming both counts.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import av
import decord
import numpy as np
import torch

from mmfm.data.formats import ImageTextDataset, RetrievalEvalDataset, VQADataset, resolve
from mmfm.data.transforms import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIDEO_PIXELS,
    UnreadableFile,
    check_frame_size,
)

SAMPLING_MODES = ("uniform", "random")
_READ_ATTEMPTS = 4
_DECODE_ERRORS = (decord.DECORDError, RuntimeError, IndexError, ValueError)
_PROBE_ERRORS = (av.FFmpegError, ValueError, IndexError, OSError)
# MPEG-PS and FLV show their streams only while FFmpeg probes them, where it takes no decoder options:
# a tiny probe size makes that probing decode about one frame before the size can be checked.
_SMALL_PROBE = {"probesize": "32", "analyzeduration": "0"}


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


# ---- limits: what the container says, before decoding ------------------------------------------

@dataclass(frozen=True)
class VideoInfo:
    """The first video stream as the container's headers describe it."""

    width: int
    height: int
    frames: int  # declared count, else duration x frame rate; 0 when the container says neither
    fps: float = 0.0  # the stream's average frame rate; 0 when the container does not say


def probe_video(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Frame size and declared frame count of `path`; no frame over `max_pixels` is decoded. Raises UnreadableFile."""
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableFile(path, "empty file (0 bytes)")
        container, streams_in_header = _open_limited(path, max_pixels)
    except FileNotFoundError:
        raise UnreadableFile(path, "file not found") from None
    except _PROBE_ERRORS as err:
        raise UnreadableFile(path, f"cannot open video ({_first_line(err)})") from None
    with container:
        if not container.streams.video:
            raise UnreadableFile(path, "no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise UnreadableFile(path, "the container does not give the frame size")
        # a count guessed from a tiny probe (MPEG-PS / FLV) is unreliable: only the size is used
        frames = _declared_frames(container, stream) if streams_in_header else 0
        return VideoInfo(width, height, frames, float(stream.average_rate or 0))


def _open_limited(path: str, max_pixels: int):
    """(PyAV container whose stream probing decodes no frame over max_pixels, whether that limit applied)."""
    limit = {"max_pixels": str(max_pixels)}
    try:
        return av.open(path, options=limit, stream_options=[limit]), True
    except ValueError:  # PyAV: this format has no streams before probing, so no per-stream options
        return av.open(path, container_options=_SMALL_PROBE), False


def _declared_frames(container, stream) -> int:
    if stream.frames > 0:
        return stream.frames
    if not stream.average_rate:
        return 0
    seconds = stream.duration * stream.time_base if stream.duration else (container.duration or 0) / av.time_base
    return round(seconds * stream.average_rate)


def check_clip_size(num_frames: int, width: int, height: int, path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                    max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS) -> None:
    """Raise UnreadableFile when a frame is over `max_pixels` or the T frames over `max_video_pixels` in all."""
    check_frame_size(width, height, path, max_pixels)
    total = num_frames * width * height
    if total > max_video_pixels:
        raise UnreadableFile(path, f"video too large to decode: {num_frames} frames of {width}x{height} are "
                                   f"{total} pixels, more than the limit of {max_video_pixels} per clip (sample "
                                   f"fewer frames, data.num_frames, or raise data.max_video_pixels in the "
                                   f"config, or max_video_pixels= in the Python API, if the file is genuine)")


def _warn_if_short(path: str, readable: int, declared: int) -> None:
    """Warn when fewer frames could be read than declared (one frame of slack: durations round)."""
    if readable < declared - 1:
        warnings.warn(f"{path}: only {readable} of the {declared} frames its container declares could be "
                      f"read (truncated or damaged file?); the clip is sampled from those {readable}",
                      stacklevel=2)


# ---- decoding -----------------------------------------------------------------------------------

def open_video(path: str):
    """A decord VideoReader (single-threaded) for `path`; raises UnreadableFile."""
    try:
        return decord.VideoReader(path, num_threads=1)
    except _DECODE_ERRORS as err:
        raise UnreadableFile(path, f"cannot open video ({_first_line(err)})") from None


def read_frames(reader, path: str, num_frames: int, sampling: str = "uniform",
                rng: np.random.Generator | None = None, declared: int = 0) -> np.ndarray:
    """Sample and decode T frames → uint8 (T, H, W, 3), shrinking the frame count when reads fail.

    `declared` is the container's frame count (0: unknown); reading fewer frames gives a warning.
    """
    available = len(reader)
    if available <= 0:
        raise UnreadableFile(path, "video has no frames")
    error = None
    for _ in range(_READ_ATTEMPTS):
        indices = frame_indices(available, num_frames, sampling, rng)
        try:
            frames = reader.get_batch(indices.tolist()).asnumpy()
        except _DECODE_ERRORS as err:
            error = err
            available = max(1, (available * 3) // 4)
        else:
            _warn_if_short(path, available, declared)
            return frames
    raise UnreadableFile(path, f"cannot decode frames ({_first_line(error)})")


def load_clip(path: str, num_frames: int, sampling: str = "uniform", rng: np.random.Generator | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS, max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS) -> torch.Tensor:
    """Decode T sampled frames of `path` as a uint8 tensor (T, H, W, 3). Raises UnreadableFile.

    The limits are checked on the container's headers before decoding and on the decoded frames after.
    If decord opens the file but cannot return its frames (decord2 fails on some frame widths, e.g.
    48 or 96 px: "The size must exactly match"), the frames are decoded with PyAV instead.
    """
    info = probe_video(path, max_pixels)
    check_clip_size(num_frames, info.width, info.height, path, max_pixels, max_video_pixels)
    reader = open_video(path)
    try:
        frames = read_frames(reader, path, num_frames, sampling, rng, info.frames)
    except UnreadableFile as decord_error:
        frames = _read_frames_pyav(path, num_frames, sampling, rng, max_pixels, info.frames)
        if frames is None:
            raise decord_error from None
    check_clip_size(len(frames), frames.shape[2], frames.shape[1], path, max_pixels, max_video_pixels)
    return torch.from_numpy(frames)


def _read_frames_pyav(path: str, num_frames: int, sampling: str, rng, max_pixels: int,
                      declared: int) -> np.ndarray | None:
    """Fallback decoder: PyAV, keeping only the sampled frames; None when it cannot decode a frame either.

    Decoding stops after the last sampled frame. When the stream ends before it (a truncated file),
    the frames are sampled again from the count seen; with no declared count, a first pass counts them.
    """
    try:
        count = declared or _decode_pyav(path, np.zeros(0, np.int64), max_pixels)[1]
        while count > 0:
            indices = frame_indices(count, num_frames, sampling, rng)
            kept, seen = _decode_pyav(path, indices, max_pixels)
            if seen > indices.max():
                _warn_if_short(path, count, declared)
                return np.stack([kept[i] for i in indices])
            count = seen
    except _PROBE_ERRORS:
        return None
    return None


def _decode_pyav(path: str, indices: np.ndarray, max_pixels: int) -> tuple[dict[int, np.ndarray], int]:
    """({index: RGB frame} for `indices`, frames decoded), up to the last index (all frames when none).

    The decoder refuses frames over `max_pixels`; a decode error ends the stream (a truncated file).
    """
    wanted, last = set(indices.tolist()), int(indices.max(initial=-1))
    kept, seen = {}, 0
    container, _ = _open_limited(path, max_pixels)
    with container:
        container.streams.video[0].codec_context.options = {"max_pixels": str(max_pixels)}
        try:
            for frame in container.decode(video=0):
                if seen in wanted:
                    kept[seen] = frame.to_ndarray(format="rgb24")
                seen += 1
                if seen > last >= 0:
                    break
        except av.FFmpegError:
            pass
    return kept, seen


def write_mp4(path, frames: list[np.ndarray], fps: float = 8, lossless: bool = False) -> None:
    """(H, W, 3) uint8 frames as H.264 MP4 with a short GOP so that decoders can seek cheaply: yuv420p at
    crf 18, or ``lossless`` (yuv444p, qp 0: only the RGB -> YUV rounding is lost)."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps) or 8)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
        quality = {"qp": "0"} if lossless else {"crf": "18"}
        stream.options = {"preset": "ultrafast", **quality, "g": "8", "threads": "1"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


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
        frames = load_clip(resolve(self.root, self.entries[index]["video"]), self.num_frames, self.sampling, rng,
                           self.max_pixels, self.max_video_pixels)
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
