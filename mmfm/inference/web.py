"""What the web page of `mmfm serve` needs: its files, the model card and the gallery's thumbnails.

The routes are in `mmfm.inference.server`:

- ``GET /`` -> ``static/index.html``; ``GET /static/{file}`` -> its script and style sheet
- ``GET /model`` -> {"name", "device", "image_size", "num_frames", "answers": {head: count},
  "zoo": {"description", "tasks", "metrics", ...} | null, "index": {"modality", "size"} | null,
  "endpoints": ["POST /search", ...]}
- ``GET /thumb/{position}`` -> a JPEG of gallery item ``position`` (its place in ``index.ids``, as
  ``/search`` hits give it): an image fitted in ``THUMB_SIZE`` px, a video as a strip of ``STRIP_FRAMES``
  frames side by side; ``Cache-Control`` + ``ETag`` (304 on ``If-None-Match``)
- ``GET /item/{position}`` -> the gallery file itself (the page asks ``/vqa`` about a picked hit)

Items are addressed by position only, so a request can reach no file outside the index's own ids.
A position that is not an index item, or whose id is not a file, is a JSON 404. Thumbnails are sized
from the file's header and decoded within the server's `DecodeBudget`, like uploads.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.routing import APIRoute
from PIL import Image

from mmfm.data.transforms import UnreadableFile, load_image
from mmfm.errors import InputError
from mmfm.zoo import load_manifest

STATIC = Path(__file__).parent / "static"
THUMB_SIZE = 128  # px: the longer side of an image thumbnail, the height of a video strip
STRIP_FRAMES = 4
STRIP_GAP = 2  # px of dark background between the frames of a strip
THUMB_QUALITY = 85
THUMB_CACHE = "public, max-age=3600"  # then revalidated with the ETag
POSITION = re.compile(r"[0-9]{1,18}")
ZOO_FIELDS = ("description", "tasks", "metrics", "license", "params", "training", "tags")


class ItemNotFound(InputError):
    """A gallery position that the index does not hold, or whose item is not a file (HTTP 404)."""


def model_card(pipeline, index) -> dict:
    """What the page shows about the model: its name, preprocessing, answer heads, zoo entry and index."""
    entry = next((e for e in load_manifest() if e.name == pipeline.name), None)
    return {
        "name": pipeline.name,
        "device": str(pipeline.device),
        "image_size": pipeline.image_size,
        "num_frames": pipeline.num_frames,
        "answers": {head: len(names) for head, names in pipeline.model.answers.items()},
        "zoo": None if entry is None else {k: v for k, v in entry.to_dict().items() if k in ZOO_FIELDS},
        "index": None if index is None else {"modality": index.modality, "size": len(index)},
    }


def endpoints(app: FastAPI) -> list[str]:
    """``METHOD /path`` of every documented route (the page shows the panels the server can answer)."""
    return [f"{method} {route.path}" for route in app.routes
            if isinstance(route, APIRoute) and route.include_in_schema for method in sorted(route.methods)]


def gallery_file(index, position: str) -> Path:
    """The file of gallery item ``position`` (ASCII digits, < len(index)); ItemNotFound otherwise."""
    if index is None:
        raise ItemNotFound("this server has no index: start it with `mmfm serve --index DIR` for a gallery")
    if not POSITION.fullmatch(position) or int(position) >= len(index):
        raise ItemNotFound(f"no gallery item {position!r}: positions are 0 to {len(index) - 1}, "
                           "as the 'position' of /search hits")
    if index.modality == "text":
        raise ItemNotFound("this index holds texts: its items have no files or thumbnails")
    path = Path(index.ids[int(position)])
    if not path.is_file():
        raise ItemNotFound(f"gallery item {position} ({index.ids[int(position)]!r}) is not a file on this "
                           "server; the page needs an index built from files, run from the directory it was "
                           "built in (relative ids are read from the server's working directory)")
    return path


def thumbnail_jpeg(pipeline, kind: str, path: Path, what: str) -> bytes:
    """JPEG bytes of an image fitted in THUMB_SIZE, or of a strip of STRIP_FRAMES frames of a video."""
    from mmfm.data.video import load_clip

    try:
        if kind == "image":
            picture = load_image(str(path), pipeline.max_pixels)
            picture.thumbnail((THUMB_SIZE, THUMB_SIZE))
        else:
            frames = load_clip(str(path), STRIP_FRAMES, "uniform", None, pipeline.max_pixels,
                               pipeline.max_video_pixels)
            picture = _strip([Image.fromarray(frame) for frame in frames.numpy()])
    except UnreadableFile as err:
        raise InputError(f"{what}: {err.reason}") from None
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=THUMB_QUALITY)
    return buffer.getvalue()


def _strip(frames: list[Image.Image]) -> Image.Image:
    for frame in frames:
        frame.thumbnail((THUMB_SIZE, THUMB_SIZE))
    width = sum(frame.width for frame in frames) + STRIP_GAP * (len(frames) - 1)
    strip = Image.new("RGB", (width, max(frame.height for frame in frames)))
    left = 0
    for frame in frames:
        strip.paste(frame, (left, 0))
        left += frame.width + STRIP_GAP
    return strip


def etag(path: Path) -> str:
    """Changes with the file (path, size, mtime) and with the thumbnail's geometry."""
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{THUMB_SIZE}|{STRIP_FRAMES}|{THUMB_QUALITY}"
    return f'"{hashlib.sha256(key.encode()).hexdigest()[:32]}"'


def etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header, weak ones (W/) compared as strong (RFC 9110 13.1.2)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}
