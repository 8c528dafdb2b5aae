"""Check a converted dataset: what `mmfm data inspect PATH` runs.

PATH is a shard folder (its `*.tar`, and `_manifest.json` when there is one), one `.tar`, a brace
pattern (`DIR/{00000..00003}.tar`) or an ALBEF annotation JSON. Every sample is read (shards through
webdataset's tar iterator) and its media decoded (the first frame of a video); a sample is bad when its
media does not decode, it has no media member, or it has neither a caption nor a question. A tar that
ends early, a shard missing or differing from the manifest's sha256 are bad too. `write_grid` draws a
few samples with their captions (matplotlib, no pyplot state).
"""

from __future__ import annotations

import io
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path

import av
import braceexpand
from PIL import Image
from tqdm import tqdm
from webdataset import tariterators

from mmfm.data.convert import IMAGE_EXTS, MANIFEST, VIDEO_EXTS, file_sha256, read_source
from mmfm.errors import DataError
from mmfm.fileio import atomic_path

MEDIA_EXTS = {e[1:] for e in IMAGE_EXTS + VIDEO_EXTS}
_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, SyntaxError, EOFError, StopIteration,
                  Image.DecompressionBombError)


def inspect(path: str, examples: int = 3, quiet: bool = False, grid: int = 0) -> dict:
    """A report: counts, the first `examples` samples, bad records, up to `grid` decoded (image, caption)."""
    report = {"path": path, "shards": 0, "samples": 0, "media": Counter(), "with_questions": 0,
              "examples": [], "bad": [], "grid": [], "manifest": None}
    if Path(path).suffix.lower() == ".json":
        samples = _json_samples(Path(path), report)
    else:
        samples = _shard_samples(_shard_paths(path, report), report, quiet)
    for sample in samples:
        _check(sample, report, examples, grid)
    return report


def _check(sample: dict, report: dict, examples: int, grid: int) -> None:
    report["samples"] += 1
    report["with_questions"] += bool(sample["questions"])
    if len(report["examples"]) < examples:
        report["examples"].append(sample)
    problems = [] if sample["ext"] else ["no media member"]
    if not sample["captions"] and not sample["questions"]:
        problems.append("no caption")
    if sample["ext"]:
        report["media"][sample["ext"]] += 1
        try:
            image = decode(sample["ext"], sample["data"]())
            if len(report["grid"]) < grid and sample["captions"]:
                report["grid"].append((image, sample["captions"][0]))
        except _DECODE_ERRORS as err:
            problems.append(f"cannot decode {sample['ext']} ({type(err).__name__}: {err})")
    if problems:
        report["bad"].append({"source": sample["where"], "reason": ", ".join(problems)})


def decode(ext: str, data: bytes) -> Image.Image:
    """The decoded image (a video's first frame) as RGB; raises what PIL / PyAV raise."""
    if f".{ext}" in VIDEO_EXTS:
        with av.open(io.BytesIO(data)) as container:
            return next(container.decode(video=0)).to_image()
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


# ---------------------------------------------------------------- shards

def _shard_paths(path: str, report: dict) -> list[Path]:
    folder = Path(path)
    if folder.is_dir():
        paths = sorted(folder.glob("*.tar"))
        if not paths:
            raise DataError(f"{folder}: no .tar shards in it; point inspect at a shard folder")
        report["manifest"] = _manifest(folder, report)
        return paths
    paths = [Path(p) for p in braceexpand.braceexpand(path)]
    if len(paths) == 1 and not paths[0].exists():
        raise DataError(f"{path}: not found; pass a shard folder, a .tar, a brace pattern or an ALBEF JSON")
    return paths


def _manifest(folder: Path, report: dict) -> dict | None:
    """The folder's manifest; shards it lists that are missing or changed are reported bad."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        report["bad"].append({"source": str(folder / MANIFEST), "reason": f"unreadable manifest ({err})"})
        return None
    for shard in manifest.get("shards", []):
        sha = file_sha256(folder / shard["name"])
        if sha != shard["sha256"]:
            reason = "missing" if sha is None else "sha256 differs from the manifest"
            report["bad"].append({"source": shard["name"], "reason": f"{reason}; re-run the convert"})
    if not manifest.get("complete", True):
        report["bad"].append({"source": MANIFEST, "reason": "the convert did not finish; re-run it"})
    return manifest


def _shard_samples(paths: list[Path], report: dict, quiet: bool):
    listed = {s["name"]: s["samples"] for s in (report["manifest"] or {}).get("shards", [])}
    for path in tqdm(paths, desc="inspect", unit="shard", disable=quiet or not sys.stderr.isatty()):
        report["shards"] += 1
        if not path.is_file():
            report["bad"].append({"source": str(path), "reason": "shard not found"})
            continue
        read = 0
        for sample in tariterators.tarfile_samples([{"url": str(path)}], handler=_recorder(path, report)):
            read += 1
            yield _from_shard(sample)
        # a tar cut at a member boundary reads without an error: only the count shows it
        if listed.get(path.name, read) != read:
            reason = f"other sample count than the manifest lists ({read}, not {listed[path.name]})"
            report["bad"].append({"source": path.name, "reason": reason})


def _recorder(path: Path, report: dict):
    """A webdataset handler that records a read error (a truncated or corrupt tar) and stops the shard."""
    def handler(exn: Exception) -> bool:
        message = str(exn.args[0]) if exn.args else type(exn).__name__
        report["bad"].append({"source": path.name, "reason": f"unreadable tar ({message.split(' @ ')[0]})"})
        return False
    return handler


def _from_shard(sample: dict) -> dict:
    ext = next((k for k in sample if k in MEDIA_EXTS), None)
    where = f"{Path(sample['__url__']).name} {sample['__key__']}"
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        meta = {}
    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
    return {"where": where, "key": sample["__key__"], "ext": ext, "data": lambda: sample[ext],
            "captions": [caption] if caption else [], "questions": meta.get("questions", [])}


# ---------------------------------------------------------------- ALBEF JSON

def _json_samples(path: Path, report: dict):
    records, bad = read_source([path], "albef")
    report["bad"] += bad
    report["samples"] += len(bad)
    for record in records:
        media = Path(record["media"])
        yield {"where": str(media), "key": str(record["id"]), "ext": media.suffix.lower()[1:],
               "data": media.read_bytes, "captions": record["captions"], "questions": record["questions"]}


# ---------------------------------------------------------------- grid

def write_grid(items: list[tuple[Image.Image, str]], path, columns: int = 4) -> None:
    """A PNG of the images with their captions below (atomically written)."""
    from matplotlib.figure import Figure

    if not items:
        raise DataError(f"no decodable captioned sample to draw in {path}")
    rows = (len(items) + columns - 1) // columns
    fig = Figure(figsize=(2.6 * columns, 3.2 * rows))
    for k, ax in enumerate(fig.subplots(rows, columns, squeeze=False).flat):
        ax.set_axis_off()
        if k < len(items):
            ax.imshow(items[k][0], interpolation="nearest")
            ax.set_title(_wrap(items[k][1], 34), fontsize=7, y=-0.02, va="top")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def _wrap(text: str, width: int) -> str:
    text = text if len(text) <= 3 * width else text[:3 * width - 3] + "..."
    return textwrap.fill(text, width, break_long_words=False)
