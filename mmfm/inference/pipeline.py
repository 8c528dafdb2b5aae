"""Inference pipeline: a model in eval mode on the best device + its preprocessing (from the checkpoint).

    pipe = mmfm.load("mmfm-small-shapes")          # a zoo name, a run directory or a .safetensors file
    index = pipe.index(images=paths)               # gallery: features + cached unimodal tokens
    hits = index.search(text="a red circle", k=10, rerank=16)
    pipe.answer("photo.png", "what colour is the circle?", topk=5)   # [(answer, probability), ...]
    probs = pipe.classify(["a.png", "b.png"], ["circle", "star"])  # (2, 2) zero-shot probabilities
    top_labels(probs, ["circle", "star"], topk=1)                  # [[("circle", 0.98)], [("star", 0.91)]]

Every file a user hands in is decoded here; an unreadable one raises `InputError` naming the file.
Videos are recognised by their extension, or, for unknown extensions, by decord opening what PIL cannot.
Files over the limits (`max_pixels` per image or video frame, `max_video_pixels` per decoded clip of
`num_frames` frames) are refused from their headers, before decoding; `decoded_pixels` gives what a
file's decoding will hold without decoding it (the server budgets concurrent uploads with it).
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import cached_property, lru_cache
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
from mmfm.inference.encode import (
    DEFAULT_TEMPLATES,
    encode_texts,
    itm_scores,
    predict_answers,
    zeroshot_classifier,
)
from mmfm.inference.index import ApproxSearch, Hit, Index, PartialBuild
from mmfm.models.model import MMFM, Encoded
from mmfm.models.trunk import TokenBatch
from mmfm.tasks import answer_heads_by_modality

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv"}
DECODE_THREADS = 2
MAX_LABELS = 1000     # ImageNet's 1,000 classes; a softmax over more is rarely what a user means
MAX_TEMPLATES = 100   # CLIP's ImageNet ensemble has 80
CACHED_CLASSIFIERS = 8


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
        # A server classifies many uploads against the same labels: their text side is encoded once.
        self._class_features = lru_cache(CACHED_CLASSIFIERS)(self._encode_classes)

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
              ids: list[str] | None = None, batch_size: int = 64, progress: bool = True,
              approx: ApproxSearch | None = None, partial: str | Path | None = None,
              chunk_size: int = 1024) -> Index:
        """Encode a gallery (exactly one of images / videos / texts) once; returns an Index bound to self.

        ``approx``: when and how the index searches approximately (default `ApproxSearch()`). ``partial``
        (images / videos): a directory where each finished chunk of ``chunk_size`` items is saved; a re-run
        with the same items, ids and model continues after the last finished chunk (`PartialBuild`).
        """
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
            if partial is not None:
                raise InputError("partial= resumes image and video builds; texts are encoded in one call")
            tokens, features = self.encode_texts(items)
        else:
            resume = None if partial is None else PartialBuild(partial, items, ids, modality, self.fingerprint,
                                                               chunk_size)
            tokens, features = self._encode_files(items, modality, batch_size, progress, resume)
        metadata = {"model": self.name, "image_size": self.image_size, "num_frames": self.num_frames}
        return Index(modality, ids, features, tokens, self.fingerprint, metadata, pipeline=self, approx=approx)

    @torch.inference_mode()
    def _encode_files(self, paths: list[str], modality: str, batch_size: int, progress: bool,
                      partial: PartialBuild | None = None) -> tuple[TokenBatch, torch.Tensor]:
        """Encode files into contiguous (N, L, D) tokens and (N, E) features; with ``partial``, chunk by
        chunk, each saved when finished, skipping the chunks a previous run finished."""
        read = self.read_video if modality == "video" else self.read_image
        with tqdm(total=len(paths), desc=f"index {modality}s", unit=modality, disable=not progress) as bar:
            if partial is None:
                return self._encode_batches(paths, read, batch_size, bar)
            bar.update(partial.finished)
            for start in range(partial.finished, len(paths), partial.chunk_size):
                chunk = paths[start:start + partial.chunk_size]
                partial.write(start, *self._encode_batches(chunk, read, batch_size, bar))
        return partial.read()

    def _encode_batches(self, paths: list[str], read, batch_size: int, bar) -> tuple[TokenBatch, torch.Tensor]:
        """Encode files in batches into preallocated contiguous (N, L, D) tokens and (N, E) features."""
        tokens = features = roll = None
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

    # ---- zero-shot classification ---------------------------------------------------------------

    def classify(self, images, labels: list[str], templates: list[str] | None = None,
                 batch_size: int = 64) -> torch.Tensor:
        """Zero-shot probabilities (N, len(labels)) of N image / video files (one path: N = 1), CLIP-style.

        Column j is ``labels[j]``; each row sums to 1 (`top_labels` ranks them). Every label is put in
        every template ("{}" marks where; default `DEFAULT_TEMPLATES`) and the prompts' ITC features
        are averaged (CLIP's prompt ensemble); a file's ITC feature against them, over the model's
        temperature, gives the softmax. Raises InputError for bad labels / templates or unreadable files.
        """
        paths = [images] if isinstance(images, str | Path) else list(images)
        if not paths:
            raise InputError("classify: pass an image path or a non-empty list of image / video paths")
        labels, templates = check_labels(labels, templates)
        return torch.cat([self._classify_files(paths[start:start + batch_size], labels, templates)
                          for start in range(0, len(paths), batch_size)])

    def _classify_files(self, paths: list, labels: list[str], templates: list[str]) -> torch.Tensor:
        media = [self.read_media(path) for path in paths]
        probabilities = torch.empty(len(paths), len(labels))
        for kind in ("image", "video"):
            rows = [i for i, (k, _) in enumerate(media) if k == kind]
            if rows:
                pixels = torch.stack([media[i][1] for i in rows])
                probabilities[rows] = self.classify_pixels(pixels, labels, templates)
        return probabilities

    @torch.inference_mode()
    def classify_pixels(self, pixels: torch.Tensor, labels: list[str],
                        templates: list[str] | None = None) -> torch.Tensor:
        """`classify` for stacked (B, 3, H, W) images or (B, T, 3, H, W) videos -> (B, len(labels)) on CPU."""
        labels, templates = check_labels(labels, templates)
        classes = self._class_features(tuple(labels), tuple(templates))
        logits = self.encode_pixels(pixels).feat.float() @ classes.t() / self.model.temp.float()
        return logits.softmax(dim=-1).cpu()

    def _encode_classes(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        return zeroshot_classifier(self.model, list(labels), list(templates))


def check_labels(labels, templates=None) -> tuple[list[str], list[str]]:
    """(labels, templates) checked for zero-shot classification; templates None -> `DEFAULT_TEMPLATES`."""
    if isinstance(labels, str) or not len(labels):
        raise InputError("labels: pass a non-empty list of class names, e.g. ['cat', 'dog']")
    if len(labels) > MAX_LABELS:
        raise InputError(f"labels: {len(labels)} labels, more than the limit of {MAX_LABELS}; pass fewer classes")
    _check_texts(labels, "label")
    repeated = sorted(label for label, count in Counter(labels).items() if count > 1)
    if repeated:
        raise InputError(f"labels: {reprlib.repr(repeated)} given more than once; pass each class once")
    templates = list(DEFAULT_TEMPLATES if templates is None else templates)
    if not templates or len(templates) > MAX_TEMPLATES:
        raise InputError(f"templates: {len(templates)} templates; pass 1 to {MAX_TEMPLATES}, or none for the "
                         "defaults")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise InputError(f"template {reprlib.repr(template)} has no '{{}}' where the label goes; "
                             "write e.g. 'a photo of a {}.'")
    return list(labels), templates


def parse_labels(text: str) -> list[str]:
    """Class names from one string: a JSON list (``["a, b", "c"]``) or comma-separated (``cat, dog``), stripped."""
    labels = _json_list(text, "labels") if text.lstrip().startswith("[") else text.split(",")
    return [label.strip() for label in labels]


def parse_templates(values: list) -> list[str] | None:
    """Templates from form fields, each one template or a JSON list of them; None when there are none."""
    templates = []
    for value in values:
        is_list = isinstance(value, str) and value.lstrip().startswith("[")
        templates.extend(_json_list(value, "templates") if is_list else [value])
    return templates or None


def _json_list(text: str, field: str) -> list[str]:
    try:
        items = json.loads(text)
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise InputError(f"{field} {reprlib.repr(text)}: not a JSON list of strings; send e.g. [\"cat\", \"dog\"]")
    return items


def top_labels(probabilities: torch.Tensor, labels: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
    """The ``topk`` most probable (label, probability) of each row of `Pipeline.classify`, best first."""
    if not isinstance(topk, int) or topk < 1:
        raise InputError(f"topk={topk!r}: must be a positive integer")
    top = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
    return [[(labels[j], float(p)) for p, j in zip(row_p, row_j)]
            for row_p, row_j in zip(top.values.tolist(), top.indices.tolist())]


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
