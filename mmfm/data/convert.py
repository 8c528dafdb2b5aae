"""Turn a dataset into webdataset shards (or one ALBEF JSON): what `mmfm data convert` runs.

    records, bad = read_source(["train.csv"])                   # or a folder, karpathy / VQAv2 / MSRVTT /
    manifest = write_shards(records, "shards/", source="...")   # ALBEF JSON; then --to shards or json

Readers turn a source into records ``{"media", "captions", "questions", "id", "source"}`` (media an
absolute path, one record per media file: entries naming the same file are merged). The shard layout is
the one img2dataset / video2dataset write, so webdataset readers take it unchanged:

    OUT/00000.tar, 00001.tar, ...   per sample KEY = f"{shard:05d}{position:04d}" (unique over the set):
        KEY.jpg|png|webp or KEY.mp4|webm|mkv|avi|mov   the original file bytes, never re-encoded
        KEY.txt                                        the first caption (absent for question-only media)
        KEY.json   {"captions": [..], "questions": [{"question", "answer": [..], "question_type"}], "id"}
    OUT/_manifest.json   {"format", "kind", "samples", "shards": [{"name", "samples", "bytes", "sha256",
                          "inputs"}], "bad": [{"source", "reason"}], "source", "complete"}

Records go to shards in source order, `shard_size` per shard, before any file is opened, and a shard's
tar is written with a fixed mtime, so the bytes do not depend on the worker count. A media file that is
missing, empty or does not open (PIL ``verify`` for images, a PyAV probe for videos) is skipped, so a
shard may hold fewer samples than `shard_size`. Each shard is written to a temporary name and renamed
into place, and the manifest is rewritten (atomically) after each one: a re-run skips a shard whose file
still has the recorded sha256 and whose input records (`inputs`, a hash) are unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import sys
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mmfm.data.formats import (
    captions_of,
    load_annotations,
    load_msrvtt,
    load_vqav2,
    normalize_answer,
    read_json,
)
from mmfm.data.transforms import UnreadableFile
from mmfm.data.video import probe_video
from mmfm.errors import DataError
from mmfm.fileio import atomic_path, atomic_write_text

FORMAT = "mmfm-shards/1"
MANIFEST = "_manifest.json"
ANSWER_LIST_SIZE = 3129  # the size of the VQAv2 answer lists of BUTD / ViLT / ALBEF-style heads
FORMATS = ("csv", "tsv", "folder", "karpathy", "vqav2", "msrvtt", "albef")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
# PIL format → member extension; MPO is what PIL calls many phone-camera JPEGs
_IMAGE_MEMBERS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


# ---------------------------------------------------------------- reading sources

def read_source(paths, fmt: str | None = None, *, root=None, image_col: str = "image",
                caption_col: str = "caption", split: str | None = None) -> tuple[list[dict], list[dict]]:
    """Records of `paths` (merged by media file) and the bad ones: ``[{"source", "reason"}]``.

    `fmt` is detected from the first path when None. `root` is where relative media paths start
    (default: each file's folder; the image folder of VQAv2, the video folder of MSRVTT).
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists():
            raise DataError(f"source not found: {path}; pass a CSV/TSV, a folder or an annotation JSON")
    fmt = fmt or detect_format(paths[0])
    if fmt not in FORMATS:
        raise DataError(f"unknown source format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "vqav2":
        if len(paths) != 2:
            raise DataError("a VQAv2 source is two files: the questions JSON, then the annotations JSON")
        entries = load_vqav2(paths[0], paths[1], os.path.abspath(root or paths[0].parent))
        rows = _albef_records(entries, None, str(paths[0]))
    else:
        rows = [row for path in paths for row in _read_one(path, fmt, root, image_col, caption_col, split)]
    checked = [(record, _text_problem(record)) for record in _merge(rows)]
    bad = [_bad(record, problem) for record, problem in checked if problem]
    kept = [record for record, problem in checked if not problem]
    _check_kinds(kept, paths)
    return kept, bad


def detect_format(path: Path) -> str:
    """The source format of `path` from its type, extension and (JSON) top-level shape."""
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in (".csv", ".tsv"):
        return path.suffix.lower()[1:]
    if path.suffix.lower() != ".json":
        raise DataError(f"{path}: cannot tell the format from the name; pass --format ({', '.join(FORMATS)})")
    data = read_json(path)
    if isinstance(data, dict):
        for key, fmt in (("images", "karpathy"), ("questions", "vqav2"), ("sentences", "msrvtt")):
            if key in data:
                return fmt
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        return "albef" if {"image", "video"} & data[0].keys() else "msrvtt"
    raise DataError(f"{path}: not a known annotation JSON (karpathy, VQAv2, MSRVTT or ALBEF list); "
                    f"pass --format")


def _read_one(path: Path, fmt: str, root, image_col: str, caption_col: str, split) -> list[dict]:
    if fmt == "folder":
        return read_folder(path.absolute())
    base = os.path.abspath(root or path.parent)
    if fmt in ("csv", "tsv"):
        return read_table(path, base, "," if fmt == "csv" else "\t", image_col, caption_col)
    if fmt == "karpathy":
        return read_karpathy(path, base, split)
    if fmt == "msrvtt":
        return _albef_records(load_msrvtt(path, base), None, str(path))
    return _albef_records(load_annotations(path), base, str(path))


def read_table(path: Path, base: str, delimiter: str, image_col: str, caption_col: str) -> list[dict]:
    """One record per CSV/TSV row; media paths relative to `base`."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            image_col = _column(image_col, columns, path, "image", "filepath")
            caption_col = _column(caption_col, columns, path, "caption")
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable UTF-8 CSV/TSV ({err}); fix the file") from err
    if not rows:
        raise DataError(f"{path}: no rows under the header; point convert at a non-empty file")
    return [_record(_media_path(base, row[image_col]), [row[caption_col] or ""], [],
                    (row[image_col] or "").strip(), f"{path}:{line}") for line, row in rows]


def _column(name: str, columns: list[str], path: Path, *defaults: str) -> str:
    """`name` if the table has it; for the default name also its common alternatives."""
    candidates = defaults if name == defaults[0] else (name,)
    for candidate in candidates:
        if candidate in columns:
            return candidate
    flag = "--image-col" if defaults[0] == "image" else "--caption-col"
    raise DataError(f"{path}: no column {name!r} (columns: {', '.join(columns) or 'none'}); "
                    f"name the right one with {flag}")


def read_folder(folder: Path) -> list[dict]:
    """Every image/video under `folder` (recursive, sorted), captions from the sidecar `.txt` (one a line)."""
    media_exts = IMAGE_EXTS + VIDEO_EXTS
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in media_exts and p.is_file())
    if not files:
        raise DataError(f"{folder}: no image or video files ({', '.join(media_exts)}) in it")
    return [_record(str(p), _sidecar_captions(p.with_suffix(".txt")), [], p.relative_to(folder).as_posix(),
                    str(p)) for p in files]


def _sidecar_captions(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the caption file ({err}); fix or remove it") from err


def read_karpathy(path: Path, base: str, split: str | None) -> list[dict]:
    """COCO / Flickr karpathy JSON: ``{"images": [{"filepath", "filename", "sentences": [{"raw"}],
    "split"}]}``; `split` keeps the images of those splits (comma-separated, e.g. "train,restval").
    """
    data = read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: not a karpathy JSON; expected {{'images': [...]}} at the top")
    wanted = set(split.split(",")) if split else None
    try:
        records = [_record(os.path.join(base, image.get("filepath", ""), image["filename"]),
                           [s["raw"] for s in image["sentences"]], [],
                           image.get("cocoid", image.get("imgid", image["filename"])), f"{path} image {i}")
                   for i, image in enumerate(images) if wanted is None or image.get("split") in wanted]
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: not a karpathy JSON (an image lacks {err}); each image needs 'filename' "
                        f"and 'sentences' [{{'raw'}}]") from err
    if not records:
        found = sorted({str(image.get("split")) for image in images})
        raise DataError(f"{path}: no images with split {split!r} (splits in the file: {', '.join(found)})")
    return records


def _albef_records(entries: list[dict], base: str | None, where: str) -> list[dict]:
    """ALBEF / mmfm entries (captions or VQA questions) → one record per entry (merged later)."""
    if not entries:
        raise DataError(f"{where}: no entries; point convert at a non-empty annotation file")
    records = []
    for i, entry in enumerate(entries):
        kind = "video" if "video" in entry else "image"
        if kind not in entry:
            raise DataError(f"{where}: entry {i} has neither 'image' nor 'video' (has {sorted(entry)}); "
                            f"fix it")
        captions = captions_of(entry) if "caption" in entry else []
        questions = [_question(entry)] if "question" in entry else []
        media = entry[kind] if base is None else _media_path(base, entry[kind])
        media_id = entry.get(f"{kind}_id", entry[kind])
        records.append(_record(media, captions, questions, media_id, f"{where} entry {i}"))
    return records


def _question(entry: dict) -> dict:
    answers = entry.get("answer", [])
    question = {"question": entry["question"],
                "answer": [answers] if isinstance(answers, str) else list(answers),
                "question_type": entry.get("question_type", "")}
    if "question_id" in entry:
        question["question_id"] = entry["question_id"]
    return question


def _record(media: str, captions: list, questions: list[dict], media_id, source: str) -> dict:
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    return {"media": media, "captions": captions, "questions": questions, "id": media_id, "source": source}


def _media_path(base: str, path) -> str:
    path = (path or "").strip()
    return os.path.normpath(os.path.join(base, path)) if path else ""


def _merge(records: list[dict]) -> list[dict]:
    """One record per media file, in first-seen order; captions and questions gathered."""
    merged: dict[str, dict] = {}
    for record in records:
        key = record["media"] or record["source"]  # rows without a path stay apart (and bad)
        if key in merged:
            merged[key]["captions"] += record["captions"]
            merged[key]["questions"] += record["questions"]
        else:
            merged[key] = {**record, "captions": list(record["captions"]),
                           "questions": list(record["questions"])}
    return list(merged.values())


def _text_problem(record: dict) -> str | None:
    if not record["media"]:
        return "no media path"
    if not record["captions"] and not record["questions"]:
        return "no caption"
    return None


def media_kind(path: str) -> str:
    return "video" if os.path.splitext(path)[1].lower() in VIDEO_EXTS else "image"


def _check_kinds(records: list[dict], paths: list[Path]) -> None:
    kinds = Counter(media_kind(r["media"]) for r in records)
    if len(kinds) > 1:
        raise DataError(f"{paths[0]}: mixes images ({kinds['image']}) and videos ({kinds['video']}); "
                        f"convert them separately")


# ---------------------------------------------------------------- checking media

def media_member(path: str) -> tuple[str, bytes]:
    """(member extension, original bytes) of a media file that opens; raises UnreadableFile."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UnreadableFile(path, "file not found") from None
    except OSError as err:
        raise UnreadableFile(path, f"cannot read ({err.strerror})") from None
    if not data:
        raise UnreadableFile(path, "empty file (0 bytes)")
    if media_kind(path) == "video":
        probe_video(path)
        return os.path.splitext(path)[1].lower()[1:], data
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except _IMAGE_ERRORS as err:
        raise UnreadableFile(path, f"cannot decode image ({type(err).__name__}: {err})") from None
    if fmt not in _IMAGE_MEMBERS:
        raise UnreadableFile(path, f"{fmt} image; shards hold JPEG, PNG or WebP: convert the file first")
    return _IMAGE_MEMBERS[fmt], data


def _bad(record: dict, reason: str, **extra) -> dict:
    return {"source": record["source"], "reason": reason, **extra}


# ---------------------------------------------------------------- writing shards

class _HashingFile:
    """Write-through file that hashes and counts the bytes, so a shard is hashed while it is written."""

    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)


def write_shards(records: list[dict], out_dir, *, source: str, shard_size: int = 1000, workers: int = 1,
                 bad: list[dict] = (), quiet: bool = False) -> tuple[dict, int]:
    """Write `records` as shards under `out_dir`; return (the manifest, how many finished shards it kept)."""
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    out_dir = _out_dir(out_dir)
    plan = [records[i:i + shard_size] for i in range(0, len(records), shard_size)]
    kind = media_kind(records[0]["media"])
    old = _read_manifest(out_dir)
    manifest = {"format": FORMAT, "kind": kind, "samples": 0, "shards": [], "bad": list(bad),
                "source": source, "complete": False}
    jobs, skipped = [], 0
    for index, shard in enumerate(plan):
        inputs = _fingerprint(kind, shard_size, shard)
        done = _finished(out_dir, old, f"{index:05d}.tar", inputs)
        if done:
            _add_shard(manifest, *done)
            skipped += 1
        else:
            jobs.append((out_dir, index, shard, shard_size, inputs))
    _remove_stale(out_dir, old, len(plan))
    with tqdm(total=sum(len(job[2]) for job in jobs), desc="convert", unit="sample",
              disable=quiet or not sys.stderr.isatty()) as bar:
        for entry, shard_bad in _parallel(_write_shard, jobs, workers):
            _add_shard(manifest, entry, shard_bad)
            _save_manifest(out_dir, manifest)
            bar.update(entry["samples"] + len(shard_bad))
    manifest["complete"] = True
    _save_manifest(out_dir, manifest)
    return manifest, skipped


def _write_shard(job) -> tuple[dict, list[dict]]:
    out_dir, index, records, shard_size, inputs = job
    name, digits = f"{index:05d}.tar", max(4, len(str(shard_size - 1)))
    bad, samples = [], 0
    with atomic_path(out_dir / name) as tmp, open(tmp, "wb") as raw:
        sink = _HashingFile(raw)
        with wds.TarWriter(sink, encoder=False, mtime=0) as tar:  # fixed mtime: same bytes on every run
            for position, record in enumerate(records):
                try:
                    ext, data = media_member(record["media"])
                except UnreadableFile as err:
                    bad.append(_bad(record, err.reason, shard=name))
                    continue
                tar.write(_sample(f"{index:05d}{position:0{digits}d}", ext, data, record))
                samples += 1
    entry = {"name": name, "samples": samples, "bytes": sink.size, "sha256": sink.sha256.hexdigest(),
             "inputs": inputs}
    return entry, bad


def _sample(key: str, ext: str, data: bytes, record: dict) -> dict:
    meta = {"captions": record["captions"]}
    if record["questions"]:
        meta["questions"] = record["questions"]
    meta["id"] = record["id"]
    sample = {"__key__": key, ext: data, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    if record["captions"]:
        sample["txt"] = record["captions"][0].encode("utf-8")
    return sample


def _fingerprint(kind: str, shard_size: int, records: list[dict]) -> str:
    text = json.dumps([FORMAT, kind, shard_size, records], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _finished(out_dir: Path, old: dict, name: str, inputs: str) -> tuple[dict, list[dict]] | None:
    """(manifest entry, its bad records) of a shard the last run finished from the same inputs, else None."""
    entry = next((s for s in old.get("shards", []) if s.get("name") == name), None)
    if entry is None or entry.get("inputs") != inputs or file_sha256(out_dir / name) != entry.get("sha256"):
        return None
    return entry, [b for b in old.get("bad", []) if b.get("shard") == name]


def _add_shard(manifest: dict, entry: dict, bad: list[dict]) -> None:
    manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda s: s["name"])
    manifest["samples"] += entry["samples"]
    manifest["bad"] += bad


def _remove_stale(out_dir: Path, old: dict, count: int) -> None:
    """Delete shards of an earlier run that this plan does not reach (a smaller source or bigger shards)."""
    for entry in old.get("shards", []):
        name = str(entry.get("name", ""))
        if name[:5].isdigit() and name.endswith(".tar") and int(name[:5]) >= count:
            (out_dir / name).unlink(missing_ok=True)


def file_sha256(path: Path) -> str | None:
    """sha256 of a file, None when it is missing."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _read_manifest(out_dir: Path) -> dict:
    """The last run's manifest, or {} (none, unreadable, or another format: every shard is rewritten)."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else {}


def _save_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def _out_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a folder; pass another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _parallel(fn, jobs: list, workers: int):
    """`fn` over `jobs`, results in job order; a process pool when there is more than one job and worker."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    with Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(fn, jobs)


# ---------------------------------------------------------------- ALBEF JSON output, holdout

def write_json(records: list[dict], out_dir, *, workers: int = 1,
               quiet: bool = False) -> tuple[int, list[dict]]:
    """Write `OUT/annotations.json` (one entry per media, "caption": [..]) and, when there are questions,
    `OUT/questions.json` (ALBEF VQA entries). Media paths are absolute. Returns (entries, bad records)."""
    out_dir = _out_dir(out_dir)
    good, bad = check_media(records, workers, quiet)
    captioned = [r for r in good if r["captions"]]
    atomic_write_text(out_dir / "annotations.json", _dump([_retrieval_entry(r) for r in captioned]))
    questions = [_question_entry(r, q) for r in good for q in r["questions"]]
    if questions:
        atomic_write_text(out_dir / "questions.json", _dump(questions))
    return len(captioned), bad


def check_media(records: list[dict], workers: int = 1, quiet: bool = True) -> tuple[list[dict], list[dict]]:
    """(records whose media open, bad records), checked in parallel chunks."""
    chunks = [records[i:i + 256] for i in range(0, len(records), 256)]
    good, bad = [], []
    with tqdm(total=len(records), desc="check", unit="file", disable=quiet or not sys.stderr.isatty()) as bar:
        for chunk, reasons in zip(chunks, _parallel(_check_chunk, chunks, workers)):
            good += [r for r, reason in zip(chunk, reasons) if not reason]
            bad += [_bad(r, reason) for r, reason in zip(chunk, reasons) if reason]
            bar.update(len(chunk))
    return good, bad


def _check_chunk(records: list[dict]) -> list[str | None]:
    reasons = []
    for record in records:
        try:
            media_member(record["media"])
            reasons.append(None)
        except UnreadableFile as err:
            reasons.append(err.reason)
    return reasons


def split_holdout(records: list[dict], count: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(the rest, `count` captioned records chosen by `seed`), both in source order."""
    candidates = [i for i, r in enumerate(records) if r["captions"] or r["questions"]]
    if not 0 <= count < len(candidates):
        raise DataError(f"--holdout {count}: the source has {len(candidates)} media with captions or questions; "
                        f"hold out fewer so some are left to convert")
    chosen = set(random.Random(seed).sample(candidates, count))
    rest = [r for i, r in enumerate(records) if i not in chosen]
    return rest, [r for i, r in enumerate(records) if i in chosen]


def write_holdout(records: list[dict], out_dir, workers: int = 1) -> tuple[int, list[dict]]:
    """`OUT/holdout.json` (captioned media, ALBEF retrieval format) and `OUT/holdout_vqa.json` (their
    questions, ALBEF VQA format), absolute media paths; each written when it has entries; (media, bad records)."""
    good, bad = check_media(records, workers)
    retrieval = [_retrieval_entry(r) for r in good if r["captions"]]
    questions = [_question_entry(r, q) for r in good for q in r["questions"]]
    for name, entries in (("holdout.json", retrieval), ("holdout_vqa.json", questions)):
        if entries:
            atomic_write_text(_out_dir(out_dir) / name, _dump(entries))
    return len(good), bad


def write_answer_list(records: list[dict], out_dir, limit: int = ANSWER_LIST_SIZE) -> int:
    """`OUT/answer_list.json`: the `limit` most frequent (normalised) answers of the records' questions, the
    classes of a VQA head trained on them; written when there are questions. Returns its length."""
    counts = Counter(normalize_answer(a) for r in records for q in r["questions"] for a in _answers(q))
    answers = [answer for answer, _ in counts.most_common(limit) if answer]
    if answers:
        atomic_write_text(_out_dir(out_dir) / "answer_list.json", _dump(answers))
    return len(answers)


def _answers(question: dict) -> list[str]:
    answer = question.get("answer", [])
    return [answer] if isinstance(answer, str) else [a for a in answer if isinstance(a, str)]


def _retrieval_entry(record: dict) -> dict:
    kind = media_kind(record["media"])
    return {kind: record["media"], "caption": record["captions"], f"{kind}_id": record["id"]}


def _question_entry(record: dict, question: dict) -> dict:
    kind = media_kind(record["media"])
    return {kind: record["media"], f"{kind}_id": record["id"], **question}


def _dump(entries: list[dict]) -> str:
    return json.dumps(entries, indent=1, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- the whole command

def convert(paths, out_dir, *, to: str = "shards", fmt: str | None = None, holdout: int = 0, seed: int = 0,
            shard_size: int = 1000, workers: int = 1, quiet: bool = False, **read_options) -> dict:
    """Read `paths`, hold out `holdout` media, write shards or JSON to `out_dir`; return a summary dict.

    Raises DataError when nothing usable is left (every record bad).
    """
    records, bad = read_source(paths, fmt, **read_options)
    source = ", ".join(str(p) for p in paths)
    if not records:
        raise DataError(f"{source}: all {len(bad)} records are bad (first: {bad[0]['reason']} at "
                        f"{bad[0]['source']}); fix the source")
    summary = {"to": to, "out": str(out_dir), "held_out": 0}
    if holdout:
        records, held = split_holdout(records, holdout, seed)
        summary["held_out"], held_bad = write_holdout(held, out_dir, workers)
        bad += held_bad
    if to == "shards":
        manifest, skipped = write_shards(records, out_dir, source=source, shard_size=shard_size,
                                         workers=workers, bad=bad, quiet=quiet)
        summary.update(samples=manifest["samples"], shards=len(manifest["shards"]), skipped=skipped,
                       bad=manifest["bad"])
    else:
        summary["samples"], media_bad = write_json(records, out_dir, workers=workers, quiet=quiet)
        summary["bad"] = bad + media_bad
    summary["answers"] = write_answer_list(records, out_dir)
    if not summary["samples"]:
        raise DataError(f"{source}: every media file is bad (first: {summary['bad'][0]['reason']} at "
                        f"{summary['bad'][0]['source']}); fix the files or the paths (--root)")
    return summary
