"""Sharded streaming: webdataset tar shards as training streams, next to the map-style JSON datasets.

A shard is a tar in the layout img2dataset / video2dataset write (and ``mmfm data convert`` writes):
``KEY.jpg|jpeg|png|webp`` or ``KEY.mp4|webm|mkv|avi|mov``, ``KEY.txt`` (the caption) and an optional
``KEY.json`` (``captions``: several captions, ``questions``: ``[{"question", "answer": [..]}]``, ids).
Tars are read with webdataset's tar iterators; shards are local paths, directories, globs, brace patterns
(``shards/{00000..00127}.tar``) or http(s) URLs.

A stream (`ShardStream`) mixes one or more sources by weight and is read by *slots*: process ``rank`` of
``world``, DataLoader worker ``w`` of ``W`` is slot ``rank * W + w`` of ``world * W``. Each slot reads
its own shards, shuffles raw records in a buffer, decodes them (a task's decoder) and yields whole
collated batches that carry the slot's position (``batch["stream_state"]``).

Two modes, as open_clip has them:

- ``epoch``: epoch e permutes the shard list with (seed, e) and slot s takes every S-th shard of it, so
  every sample is read once per epoch; the shuffle buffer is seeded by (seed, source, epoch, slot). A slot's
  position is (epoch, records read) per source plus the mixer's draw count: a resumed run replays the
  current epoch's records of its shards up to the position *without decoding them* and continues with
  exactly the samples an uninterrupted run sees.
- ``resampled``: each slot draws shards with replacement, forever (a run is bounded by train.max_steps).
  A resumed run draws with a new deterministic seed (the resume step): it does not continue the
  interrupted draw, which with replacement has no "not seen yet" to continue.

Bad records are samples like any other: an unreadable or truncated shard, a corrupt tar member, a record
without caption or media, undecodable media all become a `BadSample` naming shard and key, which the
collate drops and counts (``data.on_error`` / ``data.max_bad_fraction``, as for the JSON datasets).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from mmfm.data.formats import (
    ON_ERROR_MODES,
    BadSample,
    answer_index,
    answer_target,
    answers_of,
    choose,
    maybe_swap,
)
from mmfm.data.sampling import epoch_permutation
from mmfm.data.transforms import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIDEO_PIXELS,
    ImageTransform,
    UnreadableFile,
    load_image,
)
from mmfm.data.video import load_clip
from mmfm.errors import DataError

MEDIA_EXTENSIONS = {"image": ("jpg", "jpeg", "png", "webp"), "video": ("mp4", "webm", "mkv", "avi", "mov")}
SHARD_MODES = ("epoch", "resampled")
MANIFEST = "_manifest.json"


# ---- shard lists ----------------------------------------------------------------------------------

def expand_shards(pattern: str | list, root: str | None = None) -> list[str]:
    """The shard URLs of a pattern: a URL (braces expanded), or a local directory (its ``*.tar``), glob,
    brace pattern or file, relative to ``root``. A local pattern that matches no file is a DataError."""
    if isinstance(pattern, list):
        return [url for item in pattern for url in expand_shards(item, root)]
    if urlparse(pattern).scheme not in ("", "file"):
        return expand_urls(pattern)
    local = pattern.removeprefix("file://")
    local = local if root is None or os.path.isabs(local) else os.path.join(root, local)
    if os.path.isdir(local):
        found = sorted(glob.glob(os.path.join(local, "*.tar")))
    elif any(char in local for char in "*?["):
        found = sorted({path for expanded in expand_urls(local) for path in glob.glob(expanded)})
    else:  # a missing file of a brace list is an unreadable shard (counted when read), unless all are missing
        found = expand_urls(local)
        found = found if any(os.path.isfile(path) for path in found) else []
    if not found:
        raise DataError(f"shards {pattern!r} match no file (looked for {local!r}); write shards with "
                        "`mmfm data convert SRC --to shards --out DIR` or fix data.sources")
    return found


def manifest_counts(urls: list[str]) -> dict[str, int]:
    """Records per local shard, from the ``_manifest.json`` beside it (``mmfm data convert`` writes one);
    shards without one are left out."""
    counts: dict[str, int] = {}
    for folder in {os.path.dirname(url) for url in urls if urlparse(url).scheme in ("", "file")}:
        try:
            manifest = json.loads((Path(folder) / MANIFEST).read_text())
            listed = {entry["name"]: int(entry["samples"]) for entry in manifest["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        counts.update({url: listed[os.path.basename(url)] for url in urls
                       if os.path.dirname(url) == folder and os.path.basename(url) in listed})
    return counts


# ---- records --------------------------------------------------------------------------------------

@dataclass
class BadRecord:
    """A record that could not be read out of a shard (the tar itself failed, not its media)."""

    url: str
    key: str
    reason: str


def shard_records(url: str, expected: int | None = None) -> Iterator[dict | BadRecord]:
    """The records of one shard (``{"__key__", "__url__", ext: bytes, ...}``), in tar order.

    webdataset's iterators call their handler on every failure (unopenable shard, corrupt or truncated
    member, duplicate names) and go on with the next member or shard; each failure becomes a `BadRecord`.
    Python's tarfile ends a stream quietly at a damaged header, so a shard that yields fewer records than
    its manifest lists (``expected``) gives one more `BadRecord`.
    """
    failures: list[Exception] = []

    def keep_going(exn: Exception) -> bool:
        failures.append(exn)
        return True

    opened = url_opener([{"url": url}], handler=keep_going)
    files = tar_file_expander(opened, handler=keep_going)
    read = 0
    for record in group_by_keys(files, handler=keep_going):
        yield from _failed(url, failures)
        read += 1
        yield record
    yield from _failed(url, failures)
    if expected is not None and read < expected:
        yield BadRecord(url, "", f"{read} of the {expected} records its manifest lists are readable")


def _failed(url: str, failures: list[Exception]) -> Iterator[BadRecord]:
    while failures:
        exn = failures.pop(0)
        yield BadRecord(url, "", f"unreadable shard data ({type(exn).__name__}: {_failure_detail(exn)[:200]})")


def _failure_detail(exn: Exception) -> str:
    """One line on a read failure; for an http(s) shard, which webdataset reads through `curl -f`, curl's exit."""
    detail = exn.strerror if isinstance(exn, OSError) and exn.strerror else str(exn.args[0]) if exn.args else ""
    curl_exit = re.search(r"exit (\d+) \(read\)", detail)
    code = int(curl_exit.group(1)) if curl_exit else _curl_exit(exn)
    if code == 22:
        return "the server answered an HTTP error (curl exit 22)"
    if code:
        return f"the download failed (curl exit {code})"
    return detail.split(" @ <")[0]  # webdataset appends the file object's repr


def _curl_exit(exn: Exception) -> int | None:
    pipe = next((arg for arg in exn.args if hasattr(arg, "proc") and hasattr(arg.proc, "wait")), None)
    try:
        return pipe.proc.wait(timeout=10) if pipe is not None else None
    except subprocess.TimeoutExpired:
        return None


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer of ``size`` items: each new item replaces a random buffered one, which is yielded.

    Its draws depend only on the number of items, never on their content, so a replay is exact.
    """
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = int(rng.integers(size))
        yield buffer[k]
        buffer[k] = item
    yield from (buffer[k] for k in rng.permutation(len(buffer)))


# ---- decoding -------------------------------------------------------------------------------------

class RecordError(Exception):
    """A record that is readable but unusable (no caption, no media, bad JSON)."""


def record_name(record: dict) -> str:
    return f"{record['__url__']}#{record['__key__']}"


def record_id(record: dict) -> int:
    """A stable 62-bit id of a record (shard URL + key): the image_id / video_id of its samples."""
    digest = hashlib.blake2b(record_name(record).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def record_metadata(record: dict) -> dict:
    if "json" not in record:
        return {}
    try:
        meta = json.loads(record["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"its .json member is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise RecordError("its .json member is not a JSON object")
    return meta


def record_captions(record: dict, meta: dict) -> list[str]:
    captions = meta.get("captions")
    if isinstance(captions, str):
        captions = [captions]
    if not captions and "txt" in record:
        captions = [record["txt"].decode("utf-8", errors="replace").strip()]
    captions = [c for c in captions or [] if isinstance(c, str) and c.strip()]
    if not captions:
        raise RecordError("it has no caption (a .txt member or 'captions' in its .json)")
    return captions


def record_questions(meta: dict) -> list[dict]:
    questions = meta.get("questions") or []
    return [q for q in questions if isinstance(q, dict) and isinstance(q.get("question"), str)]


@dataclass
class MediaReader:
    """Decodes a record's image or video member with the same limits as the map-style datasets."""

    modality: str = "image"           # image | video
    num_frames: int = 8
    sampling: str = "random"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS

    def __call__(self, record: dict, rng: np.random.Generator) -> torch.Tensor:
        """(H, W, 3) PIL image or (T, H, W, 3) uint8 clip."""
        ext = next((e for e in MEDIA_EXTENSIONS[self.modality] if e in record), None)
        if ext is None:
            raise RecordError(f"it has no {self.modality} member (.{', .'.join(MEDIA_EXTENSIONS[self.modality])})")
        name = f"{record_name(record)}.{ext}"
        if self.modality == "image":
            return load_image(io.BytesIO(record[ext]), self.max_pixels, name=name)
        return self._clip(record[ext], ext, name, rng)

    def _clip(self, data: bytes, ext: str, name: str, rng) -> torch.Tensor:
        # decord and PyAV open paths; a clip is small enough to go through a temporary file
        with tempfile.NamedTemporaryFile(suffix=f".{ext}", dir=_scratch_dir()) as handle:
            handle.write(data)
            handle.flush()
            try:
                return load_clip(handle.name, self.num_frames, self.sampling, rng, self.max_pixels,
                                 self.max_video_pixels)
            except UnreadableFile as err:
                raise UnreadableFile(name, err.reason) from None


def _scratch_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@dataclass
class CaptionDecoder:
    """A record → an alignment sample, as `ImageTextDataset` / `VideoTextDataset` build them: media, one
    caption (a random one of several), ``image_id`` / ``video_id``, optional caption negatives and, with an
    answer list, one of the record's questions (``question``, ``target``, ``has_question``)."""

    media: MediaReader
    transform: ImageTransform
    negatives: Callable | None = None
    answer_list: list[str] | None = None

    def __post_init__(self):
        self._answer_index = answer_index(self.answer_list or [])

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        meta = record_metadata(record)
        captions = record_captions(record, meta)
        pixels, flipped = _transformed(self.media, self.transform, record, rng)
        key, identity = self.media.modality, record_id(record)
        text = maybe_swap(choose(captions, rng), flipped)
        sample = {key: pixels, "text": text, f"{key}_id": identity, "index": identity, "key": record["__key__"]}
        if self.negatives is not None:
            negative = self.negatives(text, rng)
            sample["negative_text"], sample["has_negative"] = negative or "", negative is not None
        if self.answer_list is not None:
            sample.update(self._question(record_questions(meta), flipped, rng))
        return sample

    def _question(self, questions: list[dict], flipped: bool, rng) -> dict:
        if not questions:
            return {"question": "", "target": torch.zeros(len(self.answer_list)), "has_question": False}
        entry = choose(questions, rng)
        target = answer_target(answers_of(entry, flipped), self._answer_index, len(self.answer_list))
        return {"question": maybe_swap(entry["question"], flipped), "target": target, "has_question": True}


@dataclass
class QuestionDecoder:
    """A record → a VQA sample, as `VQADataset` builds them, from one of the record's questions."""

    media: MediaReader
    transform: ImageTransform
    answer_list: list[str]

    def __post_init__(self):
        self._answer_index = answer_index(self.answer_list)

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        questions = record_questions(record_metadata(record))
        if not questions:
            raise RecordError("it has no questions ('questions' in its .json)")
        entry = choose(questions, rng)
        pixels, flipped = _transformed(self.media, self.transform, record, rng)
        answers, identity = answers_of(entry, flipped), record_id(record)
        return {self.media.modality: pixels, "question": maybe_swap(entry["question"], flipped), "answers": answers,
                "target": answer_target(answers, self._answer_index, len(self.answer_list)),
                "question_id": identity, "question_type": str(entry.get("question_type", "")),
                "index": identity, "key": record["__key__"]}


def _transformed(media: MediaReader, transform: ImageTransform, record: dict, rng) -> tuple[torch.Tensor, bool]:
    decoded = media(record, rng)
    if media.modality == "image":
        geom = transform.sample(decoded.width, decoded.height, rng)
        return transform.image(decoded, geom), geom.flip
    geom = transform.sample(decoded.shape[2], decoded.shape[1], rng)
    return transform.frames(decoded, geom), geom.flip


# ---- the stream -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardSource:
    """One entry of ``data.sources``: its shard URLs and mixing weight."""

    urls: tuple[str, ...]
    weight: float = 1.0
    pattern: str = ""


class ShardStream(IterableDataset):
    """Batches from weighted shard sources, split over processes and DataLoader workers (module docstring).

    The trainer calls ``configure(...)`` before building its DataLoader (``batch_size=None``): the stream
    then yields collated batches of ``batch_size`` samples (bad ones dropped and counted by the collate),
    each with ``stream_state`` = ``{"slot", "sources": [[epoch, records read], ...], "draws"}``.
    """

    def __init__(self, sources: list[ShardSource], decode: Callable, *, mode: str = "epoch", seed: int = 0,
                 shuffle_buffer: int = 1000, on_error: str = "skip"):
        if not sources or any(not s.urls for s in sources):
            raise DataError("a shard stream needs at least one source with shards (data.sources)")
        if mode not in SHARD_MODES:
            raise DataError(f"data.shard_mode={mode!r}: use one of {', '.join(SHARD_MODES)}")
        if on_error not in ON_ERROR_MODES:
            raise ValueError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if (weights <= 0).any() or not np.isfinite(weights).all():
            raise DataError(f"data.sources weights must be positive numbers, got {weights.tolist()}")
        self.sources, self.decode, self.mode, self.seed = sources, decode, mode, seed
        self.shuffle_buffer, self.on_error = shuffle_buffer, on_error
        self.cumulative = np.cumsum(weights / weights.sum())
        self.expected = manifest_counts([url for source in sources for url in source.urls])
        self.num_samples = sum(self.expected.values()) if len(self.expected) == sum(len(s.urls) for s in sources) \
            else None
        self.configure(1, None)

    def configure(self, batch_size: int, collate_fn: Callable | None, *, rank: int = 0, world: int = 1,
                  num_workers: int = 0, batches_done: int = 0, positions: dict | None = None) -> None:
        """Set how the trainer reads the stream: this process's batch size and collate, its place among
        ``world`` processes with ``num_workers`` workers each, the batches it has already consumed, and the
        slots' positions from a checkpoint (``{slot: stream_state}``)."""
        self.batch_size, self.collate_fn = batch_size, collate_fn
        self.rank, self.world, self.workers = rank, world, max(1, num_workers)
        self.batches_done, self.positions = batches_done, dict(positions or {})
        slots = self.world * self.workers
        for source in self.sources:
            if self.mode == "epoch" and len(source.urls) < slots:
                raise DataError(f"shards {source.pattern!r}: {len(source.urls)} shard(s) for {slots} readers "
                                f"({world} process(es) x {self.workers} worker(s)); in epoch mode every reader "
                                "needs a shard of its own: write smaller shards (mmfm data convert --shard-size), "
                                "lower data.num_workers, or use data.shard_mode=resampled")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # DataLoader asks its workers in turn from worker 0; rotating which slot each one reads keeps the
        # batch sequence of a resumed run the same as an uninterrupted one.
        slot = self.rank * self.workers + (physical + self.batches_done) % self.workers
        samples = self.slot_samples(slot, self.world * self.workers, self.positions.get(slot))
        while True:
            chunk = [next(samples) for _ in range(self.batch_size)]
            batch = self.collate_fn([sample for sample, _ in chunk])
            batch["stream_state"] = {"slot": slot, **chunk[-1][1]}
            yield batch

    def slot_samples(self, slot: int, slots: int, position: dict | None) -> Iterator[tuple[dict, dict]]:
        """(decoded sample or BadSample, the slot's position after it), forever."""
        position = position or {"sources": [[0, 0] for _ in self.sources], "draws": 0}
        at = [list(p) for p in position["sources"]]
        draws = int(position["draws"])
        streams = [self._source_items(i, slot, slots, at[i]) for i in range(len(self.sources))]
        mixer = np.random.default_rng([self.seed, slot, 2, self._generation()])
        _advance(mixer, draws if self.mode == "epoch" else 0)
        while True:
            which = int(np.searchsorted(self.cumulative, mixer.random(), side="right")) if len(streams) > 1 else 0
            which = min(which, len(streams) - 1)
            epoch, read, item = next(streams[which])
            at[which] = [epoch, read]
            draws += 1
            rng = np.random.default_rng([self.seed, slot, draws, 3, self._generation()])
            yield self._decoded(item, rng), {"sources": [list(p) for p in at], "draws": draws}

    def _generation(self) -> int:
        """Resampled runs draw anew after a resume: seeded by the batches consumed before it."""
        return self.batches_done if self.mode == "resampled" else 0

    def _source_items(self, i: int, slot: int, slots: int, start: list) -> Iterator[tuple]:
        """(epoch, records read this epoch, raw record) of source ``i`` for this slot, from ``start``."""
        if self.mode == "resampled":
            yield from ((0, 0, item) for item in self._resampled(i, slot))
            return
        epoch, skip = start
        while True:
            read = 0
            for read, item in enumerate(self._epoch(i, slot, slots, epoch), start=1):
                if read > skip:
                    yield epoch, read, item
            if read == 0:
                raise DataError(f"shards {self.sources[i].pattern!r} hold no samples for reader {slot}; "
                                "check them with `mmfm data inspect`")
            epoch, skip = epoch + 1, 0

    def _epoch(self, i: int, slot: int, slots: int, epoch: int) -> Iterator:
        urls = self.sources[i].urls
        order = epoch_permutation(len(urls), self.seed + 1_000_003 * i, epoch).tolist()
        records = chain.from_iterable(shard_records(urls[k], self.expected.get(urls[k])) for k in order[slot::slots])
        return shuffled(records, self.shuffle_buffer, np.random.default_rng([self.seed, i, epoch, slot, 1]))

    def _resampled(self, i: int, slot: int) -> Iterator:
        urls = self.sources[i].urls
        rng = np.random.default_rng([self.seed, i, slot, 4, self.batches_done])
        picks = (urls[int(rng.integers(len(urls)))] for _ in repeat(None))
        records = chain.from_iterable(shard_records(url, self.expected.get(url)) for url in picks)
        return shuffled(records, self.shuffle_buffer, rng)

    def _decoded(self, item, rng) -> dict | BadSample:
        if isinstance(item, BadRecord):
            return self._bad(item.url, item.reason)
        try:
            return self.decode(item, rng)
        except UnreadableFile as err:
            return self._bad(err.path, err.reason)
        except RecordError as err:
            return self._bad(record_name(item), str(err))

    def _bad(self, where: str, reason: str) -> BadSample:
        if self.on_error == "raise":
            raise DataError(f"{where}: {reason}; fix or rewrite the shard, or set data.on_error=skip")
        warnings.warn(f"skipping bad record {where}: {reason}", stacklevel=2)
        return BadSample(where, -1, reason)


def _advance(rng: np.random.Generator, draws: int) -> None:
    """Consume ``draws`` uniforms, as ``draws`` calls of ``rng.random()`` would (in bounded chunks)."""
    while draws > 0:
        rng.random(min(draws, 1 << 20))
        draws -= 1 << 20
