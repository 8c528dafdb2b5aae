"""Inference pipeline: a model in eval mode on the best device + its preprocessing (from the checkpoint).

    pipe = mmfm.load("mmfm-small-shapes")          # a zoo name, a run directory or a .safetensors file
    index = pipe.index(images=paths)               # gallery: features + cached unimodal tokens
    hits = index.search(text="a red circle", k=10, rerank=16)
    pipe.answer("photo.png", "what colour is the circle?", topk=5)   # [(answer, probability), ...]

Every file a user hands in is decoded here; an unreadable one raises `InputError` naming the file.
Videos are recognised by their extension, or, for unknown extensions, by decord opening what PIL cannot.
Files over the limits (`max_pixels` per image or video frame, `max_video_pixels` per decoded clip of
`num_frames` frames) are refused from their headers, before decoding; `decoded_pixels` gives what a
file's decoding will hold without decoding it (the server budgets concurrent uploads with it).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import torch
from tqdm import tqdm

from mmfm.data.transforms import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIDEO_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UnreadableFile,
    eval_transform,
    image_pixels,
    load_image,
)
from mmfm.errors import InputError, ModelError
from mmfm.inference.encode import encode_texts, itm_scores, predict_answers
from mmfm.inference.index import Hit, Index
from mmfm.models.model import MMFM, Encoded
from mmfm.models.trunk import TokenBatch
from mmfm.tasks import answer_heads_by_modality

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv"}
DECODE_THREADS = 2


class Pipeline:
    """A model + its eval preprocessing on one device; encodes, indexes, searches and answers."""

    def __init__(self, model: MMFM, device: str | torch.device | None = None, name: str = "",
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.name, self.max_pixels, self.max_video_pixels = name, max_pixels, max_video_pixels
        pre = model.preprocess
        self.image_size = int(pre.get("image_size", model.cfg.img_size))
        self.num_frames = int(pre.get("num_frames", 8))
        self.transform = eval_transform(self.image_size, mean=tuple(pre.get("mean", IMAGENET_MEAN)),
                                        std=tuple(pre.get("std", IMAGENET_STD)))

    def __repr__(self) -> str:
        return f"Pipeline({self.name or 'model'}, device={self.device}, image_size={self.image_size})"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the model config and weights: an index remembers the model that built it."""
        digest = hashlib.sha256(json.dumps(asdict(self.model.cfg), sort_keys=True).encode())
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ---- decoding -------------------------------------------------------------------------------

    def read_image(self, path: str | Path) -> torch.Tensor:
        """Decode + transform one image file -> (3, H, W). Raises InputError naming the file."""
        try:
            return self.transform(load_image(str(path), self.max_pixels))
        except UnreadableFile as err:
            raise _image_error(path, err) from None

    def read_video(self, path: str | Path) -> torch.Tensor:
        """Decode ``num_frames`` uniformly sampled frames + transform -> (T, 3, H, W). Raises InputError."""
        from mmfm.data.video import load_clip

        try:
            frames = load_clip(str(path), self.num_frames, "uniform", None, self.max_pixels, self.max_video_pixels)
        except UnreadableFile as err:
            raise _video_error(path, err) from None
        geometry = self.transform.sample(frames.shape[2], frames.shape[1], None)
        return self.transform.frames(frames, geometry)

    def decoded_pixels(self, path: str | Path, kind: str | None = None) -> tuple[str, int]:
        """(kind, pixels decoding holds: W x H, or num_frames x W x H for a video) from the headers alone.

        ``kind`` "image" / "video" or None (by extension, else image first, as `read_media`). Raises
        InputError for unreadable files and files over the limits, before anything is decoded.
        """
        from mmfm.data.video import check_clip_size, probe_video

        kind = kind or _kind_by_extension(path)
        if kind is None:
            return _first_readable(path, lambda k: self.decoded_pixels(path, k))
        try:
            if kind == "image":
                return "image", image_pixels(str(path), self.max_pixels)
            info = probe_video(str(path), self.max_pixels)
            check_clip_size(self.num_frames, info.width, info.height, str(path), self.max_pixels,
                            self.max_video_pixels)
        except UnreadableFile as err:
            raise (_image_error(path, err) if kind == "image" else _video_error(path, err)) from None
        return "video", self.num_frames * info.width * info.height

    def read(self, kind: str, path: str | Path) -> torch.Tensor:
        """`read_image` (kind "image") or `read_video` (kind "video")."""
        return self.read_image(path) if kind == "image" else self.read_video(path)

    def read_media(self, path: str | Path) -> tuple[str, torch.Tensor]:
        """("image" | "video", pixels) for a file: by extension, else image first, then video."""
        kind = _kind_by_extension(path)
        if kind is not None:
            return kind, self.read(kind, path)
        return _first_readable(path, lambda k: (k, self.read(k, path)))

    # ---- encoding -------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> tuple[TokenBatch, torch.Tensor]:
        """Unimodal text tokens (padded, masked) and ITC features of a batch of non-empty texts."""
        _check_texts(texts, "text")
        return encode_texts(self.model, list(texts))

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> Encoded:
        """Unimodal tokens and ITC features of (B, 3, H, W) images or (B, T, 3, H, W) videos."""
        return self.model.encode_vision(pixels.to(self.device))

    @torch.inference_mode()
    def itm_scores(self, text: TokenBatch, vision: TokenBatch, text_idx: torch.Tensor,
                   vision_idx: torch.Tensor) -> torch.Tensor:
        """Positive-class ITM logits of the pairs (text row text_idx[i], vision row vision_idx[i]).

        Only the fusion layers run: both sides are cached unimodal tokens (e.g. an Index's gallery).
        """
        return itm_scores(self.model, text, self.model.fusion_context(vision), text_idx, vision_idx)

    # ---- retrieval ------------------------------------------------------------------------------

    def index(self, images: list | None = None, videos: list | None = None, texts: list[str] | None = None,
              ids: list[str] | None = None, batch_size: int = 64, progress: bool = True) -> Index:
        """Encode a gallery (exactly one of images / videos / texts) once; returns an Index bound to self."""
        given = {k: v for k, v in (("image", images), ("video", videos), ("text", texts)) if v is not None}
        if len(given) != 1:
            raise InputError("index takes exactly one of images=, videos=, texts=")
        (modality, items), = given.items()
        items = [str(item) for item in items] if modality != "text" else list(items)
        if not items:
            raise InputError(f"index of {modality}s: the list is empty")
        ids = [str(i) for i in ids] if ids is not None else items
        if len(ids) != len(items):
            raise InputError(f"ids: {len(ids)} ids for {len(items)} {modality}s")
        if modality == "text":
            tokens, features = self.encode_texts(items)
        else:
            tokens, features = self._encode_files(items, modality, batch_size, progress)
        metadata = {"model": self.name, "image_size": self.image_size, "num_frames": self.num_frames}
        return Index(modality, ids, features, tokens, self.fingerprint, metadata, pipeline=self)

    @torch.inference_mode()
    def _encode_files(self, paths: list[str], modality: str, batch_size: int,
                      progress: bool) -> tuple[TokenBatch, torch.Tensor]:
        """Encode files in batches into preallocated contiguous (N, L, D) tokens and (N, E) features."""
        read = self.read_video if modality == "video" else self.read_image
        tokens = features = roll = None
        bar = tqdm(total=len(paths), desc=f"index {modality}s", unit=modality, disable=not progress)
        start = 0
        for pixels in _prefetched_batches(paths, read, batch_size):
            encoded = self.encode_pixels(pixels)
            if tokens is None:
                tokens = encoded.tokens.x.new_empty((len(paths), *encoded.tokens.x.shape[1:]))
                features = encoded.feat.new_empty((len(paths), encoded.feat.shape[1]))
                roll = encoded.tokens.roll
            stop = start + len(pixels)
            tokens[start:stop], features[start:stop] = encoded.tokens.x, encoded.feat
            start = stop
            bar.update(len(pixels))
        bar.close()
        return TokenBatch(tokens, roll=roll), features

    def search(self, index: Index, text: str | None = None, image: str | None = None,
               video: str | None = None, k: int = 10, rerank: int | None = None) -> list[Hit]:
        """Search ``index`` with this pipeline's model (binds the index to it first)."""
        if index.pipeline is not self:
            index.bind(self)
        return index.search(text=text, image=image, video=video, k=k, rerank=rerank)

    # ---- VQA ------------------------------------------------------------------------------------

    def answer(self, path: str | Path, question: str, topk: int = 5) -> list[tuple[str, float]]:
        """Top-``topk`` (answer, probability) for a question about an image or a video file."""
        return self.answer_batch([path], [question], topk)[0]

    def answer_batch(self, paths: list, questions: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
        """Answers for (file, question) pairs; images and videos are batched separately."""
        if len(paths) != len(questions):
            raise InputError(f"answer_batch: {len(paths)} files but {len(questions)} questions")
        _check_texts(questions, "question")
        media = [self.read_media(path) for path in paths]
        results: list = [None] * len(paths)
        for kind in answer_heads_by_modality():
            rows = [i for i, (k, _) in enumerate(media) if k == kind]
            if rows:
                pixels = torch.stack([media[i][1] for i in rows])
                answers = self.answer_pixels(kind, pixels, [questions[i] for i in rows], topk)
                for row, answer in zip(rows, answers):
                    results[row] = answer
        return results

    @torch.inference_mode()
    def answer_pixels(self, kind: str, pixels: torch.Tensor, questions: list[str],
                      topk: int = 5) -> list[list[tuple[str, float]]]:
        """Answers for stacked images (kind "image") or videos (kind "video") and their questions."""
        head = answer_heads_by_modality()[kind]
        if head not in self.model.answer_heads:
            raise ModelError(f"model {self.name or ''} has no {head!r} answer head, so it cannot answer "
                             f"questions about {kind}s; use a checkpoint trained with the {head} task")
        if not isinstance(topk, int) or topk < 1:
            raise InputError(f"topk={topk!r}: must be a positive integer")
        _check_texts(questions, "question")
        return predict_answers(self.model, head, pixels, list(questions), topk)


def _image_error(path, err: UnreadableFile) -> InputError:
    return InputError(f"image {path}: {err.reason}; pass a PNG/JPEG/WebP/BMP/TIFF image")


def _video_error(path, err: UnreadableFile) -> InputError:
    return InputError(f"video {path}: {err.reason}; pass a video decord/FFmpeg can read (MP4, AVI, ...)")


def _kind_by_extension(path) -> str | None:
    suffix = Path(path).suffix.lower()
    return "video" if suffix in VIDEO_EXTENSIONS else "image" if suffix in IMAGE_EXTENSIONS else None


def _first_readable(path, attempt):
    """attempt("image"), else attempt("video"); an InputError giving both reasons when neither works."""
    try:
        return attempt("image")
    except InputError as image_error:
        try:
            return attempt("video")
        except InputError as video_error:
            raise InputError(f"{path}: neither an image ({image_error}) nor a video ({video_error})") from None


def _check_texts(texts, field: str) -> None:
    if isinstance(texts, str) or not len(texts):
        raise InputError(f"{field}: pass a non-empty list of strings")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{field} is empty: pass a non-empty {field} string")


def _prefetched_batches(paths: list[str], read, batch_size: int):
    """Stacked batches of ``read(path)``; the next batch decodes in threads while the current one runs."""
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        pending = None
        for start in range(0, len(paths), batch_size):
            futures = [pool.submit(read, path) for path in paths[start:start + batch_size]]
            if pending is not None:
                yield torch.stack([f.result() for f in pending])
            pending = futures
        if pending:
            yield torch.stack([f.result() for f in pending])


def load(name_or_path: str | Path, pretrained: bool | str | Path = True, device: str | None = None) -> Pipeline:
    """A ready Pipeline: ``mmfm.create_model(name_or_path, pretrained)`` in eval mode on ``device``."""
    from mmfm.factory import create_model

    return Pipeline(create_model(name_or_path, pretrained), device, name=str(name_or_path))
