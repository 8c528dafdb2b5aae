"""HTTP server (FastAPI + uvicorn) for retrieval and VQA, with micro-batching of concurrent requests.

    app = create_app(pipeline, index=None, max_upload_mb=20, batch_wait_ms=5)
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or: mmfm serve --model M --index DIR

Endpoints:
- ``GET /health`` -> {"status": "ok", "model", "device", "index": {"modality", "size"} | null}
- ``POST /search`` JSON ``{"text": str, "k": 10, "rerank": null|int}``, or multipart with a file under
  ``image`` / ``video`` / ``file`` (+ optional ``k`` / ``rerank`` fields)
  -> {"hits": [{"id", "position", "score", "itc", "itm"}]} (``itc`` / ``itm`` when re-ranked)
- ``POST /vqa`` multipart: file under ``image`` / ``video`` / ``file`` + ``question`` (+ ``topk``)
  -> {"answers": [{"answer", "probability"}]}
- ``POST /classify`` multipart: file + ``labels`` (comma-separated or a JSON list; + ``templates``, ``topk``)
  -> {"labels": [{"label", "probability"}]} (zero-shot, CLIP-style prompt ensembling)
- the web page: ``GET /`` (+ ``/static/...``), ``GET /model`` (the model card), ``GET /thumb/{position}``
  and ``GET /item/{position}`` (a gallery item's thumbnail and file, by its place in the index, which
  every /search hit gives as ``position``); see `mmfm.inference.web`

Every error is a JSON ``{"error": {"type", "message"}}`` with a 4xx status: 400 for unreadable files,
empty texts / questions, malformed JSON (syntax, nesting, over-long numbers) or fields (``k`` /
``rerank`` / ``topk`` are ASCII integers in ``INT_FIELD_RANGES``) and malformed multipart; 404 for an
unknown route or gallery position; 405 for a wrong method; 413 for a body over ``max_upload_mb``. The
framework's own errors are rewritten into that body; anything unexpected is a JSON 500 that hides
internals. ``/openapi.json`` declares the request bodies and the error responses.

Micro-batching: handlers decode uploads in the thread pool, then submit the pixels/texts to a
`MicroBatcher`. Its loop takes the first queued request, waits ``batch_wait_ms`` for more, groups them
by what they ask (same endpoint, modality, k, rerank / topk) and runs ONE batched model call per group
in a single model thread. ``batcher.batch_sizes`` counts the batch sizes it ran.

Decode budget: an upload is sized from its header first (an over-limit file is a 400 before any
decoding), then waits in a `DecodeBudget` until the uploads being decoded leave room for its pixels.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import reprlib
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from http import HTTPStatus
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mmfm.errors import InputError, MmfmError
from mmfm.inference.index import Index
from mmfm.inference.pipeline import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Pipeline,
    check_labels,
    parse_labels,
    parse_templates,
    top_labels,
)
from mmfm.inference.web import (
    STATIC,
    STRIP_FRAMES,
    THUMB_CACHE,
    ItemNotFound,
    endpoints,
    etag,
    etags,
    gallery_file,
    model_card,
    thumbnail_jpeg,
)

MEDIA_FIELDS = ("image", "video", "file")
MAX_HITS = 10_000
INT_FIELD_RANGES = {"k": (1, MAX_HITS), "rerank": (0, MAX_HITS), "topk": (1, MAX_HITS)}
INTEGER = re.compile(r"[+-]?[0-9]{1,20}")  # ASCII digits only: str.isdigit() also accepts "²" and "①"
BYTE_COUNT = re.compile(rb"[0-9]{1,18}")   # a Content-Length int() parses instantly; longer is over any limit


class UploadTooLarge(InputError):
    """A request body over the server's upload limit (HTTP 413)."""


# ---- request-size limit -------------------------------------------------------------------------

class BodySizeLimit:
    """ASGI middleware: 413 when Content-Length (or the streamed body) exceeds ``max_bytes``."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        rejection = None if declared is None else self._check_declared(declared.strip())
        if rejection is not None:
            return await rejection(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise UploadTooLarge(self._message(received))
            return message

        await self.app(scope, limited_receive, send)

    def _check_declared(self, declared: bytes) -> JSONResponse | None:
        """413 for a Content-Length over the limit, 400 for one that is not a byte count, else None."""
        if declared.isdigit() and not BYTE_COUNT.fullmatch(declared):
            return error_response(413, UploadTooLarge(self._message(f"a {len(declared)}-digit number of")))
        if not BYTE_COUNT.fullmatch(declared):
            message = f"Content-Length {reprlib.repr(declared)} is not a byte count"
            return error_response(400, InputError(message))
        if int(declared) > self.max_bytes:
            return error_response(413, UploadTooLarge(self._message(int(declared))))
        return None

    def _message(self, size: int | str) -> str:
        return (f"request body of {size} bytes exceeds the server limit of {self.max_bytes} bytes; "
                "upload a smaller file or start the server with a larger --max-upload-mb")


# ---- errors and their OpenAPI description -------------------------------------------------------

def error_response(status: int, err: Exception) -> JSONResponse:
    return _error_json(status, type(err).__name__, str(err))


def _error_json(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def framework_error(request: Request, err: HTTPException) -> JSONResponse:
    """The framework's own errors (unknown route, wrong method, bad multipart) in the documented body."""
    route = f"{request.method} {request.url.path}"
    if err.status_code == 404:
        message = f"no route {route}; the endpoints are {', '.join(endpoints(request.app))} (/openapi.json)"
    elif err.status_code == 405:
        message = f"{route}: method not allowed; use {(err.headers or {}).get('Allow', 'another method')}"
    else:
        message = f"{route}: {err.detail}"
    kind = HTTPStatus(err.status_code).phrase.replace(" ", "")  # NotFound, MethodNotAllowed, BadRequest
    return _error_json(err.status_code, kind, message, err.headers)


def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI's parameter validation (a 422 by default) as a 400 in the documented body."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return _error_json(400, "InputError", f"{request.method} {request.url.path}: {problems}")


def internal_error(_request: Request, _err: Exception) -> JSONResponse:
    """Anything unexpected: a JSON 500 without internals (uvicorn logs the traceback)."""
    return _error_json(500, "InternalError", "internal server error; the server log has the details")


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {"type", "message"}}``."""

    error: ErrorDetail


def _error_doc(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


BAD_METHOD = {405: _error_doc("wrong method for this path (the Allow header names the right one)")}
NO_ITEM = {**BAD_METHOD, 404: _error_doc("no gallery item at this position, or it is not a file")}
BAD_REQUEST = {400: _error_doc("unreadable file, empty text / question, malformed field or body"),
               **BAD_METHOD, 413: _error_doc("request body over the server's --max-upload-mb")}
_FILE = {"type": "string", "format": "binary"}
_MEDIA = {"image": _FILE, "video": _FILE, "file": {**_FILE, "description": "an image or a video"}}
_TEXT = {"type": "string", "minLength": 1}
_K = {"type": "integer", "minimum": 1, "maximum": MAX_HITS, "default": 10}
_TOPK = {**_K, "default": 5}
_RERANK = {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_HITS, "description": "ITM re-ranks the top N"}


def _body(*media_types: tuple[str, dict, list[str], str]) -> dict:
    """An ``openapi_extra`` declaring a required request body: (media type, properties, required, about)."""
    content = {media: {"schema": {"type": "object", "properties": properties, "required": required,
                                  "description": about}}
               for media, properties, required, about in media_types}
    return {"requestBody": {"required": True, "content": content}}


SEARCH_BODY = _body(("application/json", {"text": _TEXT, "k": _K, "rerank": _RERANK}, ["text"], "a text query"),
                    ("multipart/form-data", {**_MEDIA, "k": _K, "rerank": _RERANK}, [],
                     "an image / video query: exactly one of image, video, file"))
VQA_BODY = _body(("multipart/form-data", {**_MEDIA, "question": _TEXT, "topk": _TOPK}, ["question"],
                  "exactly one of image, video, file, and a question"))
_LABELS = {**_TEXT, "description": "class names, comma-separated (cat,dog) or a JSON list ([\"cat\", \"dog\"])"}
_TEMPLATES = {"type": "array", "items": _TEXT,
              "description": "prompt templates, {} where the label goes: repeat the field or send one JSON "
                             "list (default: 4 built in)"}
CLASSIFY_BODY = _body(("multipart/form-data", {**_MEDIA, "labels": _LABELS, "templates": _TEMPLATES, "topk": _TOPK},
                       ["labels"], "exactly one of image, video, file, and the class labels"))


# ---- micro-batching -----------------------------------------------------------------------------

class MicroBatcher:
    """Collects concurrent requests for ``wait_s`` and runs one batched call per group in a model thread."""

    def __init__(self, run_group, wait_s: float = 0.005, max_batch: int = 32):
        self.run_group, self.wait_s, self.max_batch = run_group, wait_s, max_batch
        self.batch_sizes: Counter = Counter()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mmfm-model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, key: tuple, item):
        """Queue ``item`` under group ``key``; returns its result once its batch has run."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((key, item, future))
        return await future

    async def _loop(self):
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(self.wait_s)
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            groups: dict[tuple, list] = {}
            for key, item, future in batch:
                groups.setdefault(key, []).append((item, future))
            for key, members in groups.items():
                await self._run(key, members)

    async def _run(self, key: tuple, members: list):
        items = [item for item, _ in members]
        self.batch_sizes[len(items)] += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.run_group, key, items)
        except Exception as err:  # noqa: BLE001 - handed to every waiting request
            results = [err] * len(items)
        for (_, future), result in zip(members, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def close(self):
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def batched_runner(pipeline: Pipeline, index: Index | None):
    """The function the batcher calls: (group key, items) -> one result per item."""

    def run_group(key: tuple, items: list) -> list:
        kind = key[0]
        if kind == "search_text":
            return index.search_texts(items, k=key[1], rerank=key[2])
        if kind == "search_pixels":
            return index.search_pixels(torch.stack(items), k=key[2], rerank=key[3])
        if kind == "classify":
            labels, templates, topk = list(key[2]), list(key[3]), key[4]
            return top_labels(pipeline.classify_pixels(torch.stack(items), labels, templates), labels, topk)
        pixels = torch.stack([pixels for pixels, _ in items])
        return pipeline.answer_pixels(key[1], pixels, [question for _, question in items], topk=key[2])

    return run_group


# ---- decode budget ------------------------------------------------------------------------------

class DecodeBudget:
    """Caps the decoded pixels that concurrent uploads hold at once (each sized from its header first).

    An upload that does not fit waits, first come first served, until earlier ones are decoded; one
    larger than the whole budget is refused (400). ``peak`` is the most pixels ever held at once.
    """

    def __init__(self, max_pixels: int):
        if max_pixels < 1:
            raise InputError(f"max_decode_pixels={max_pixels}: give a positive number of pixels")
        self.max_pixels, self.in_use, self.peak = max_pixels, 0, 0
        self._line = asyncio.Lock()  # FIFO: only the head of the line waits for room
        self._freed = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, pixels: int, what: str):
        """Hold ``pixels`` of the budget for the body of the ``async with``."""
        if pixels > self.max_pixels:
            raise InputError(f"{what} decodes to {pixels} pixels, more than this server's decode budget of "
                             f"{self.max_pixels}; send a smaller file, or start the server with a larger "
                             f"--max-decode-pixels")
        async with self._line, self._freed:
            await self._freed.wait_for(lambda: self.in_use + pixels <= self.max_pixels)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            async with self._freed:
                self.in_use -= pixels
                self._freed.notify_all()


# ---- the app ------------------------------------------------------------------------------------

def create_app(pipeline: Pipeline, index: Index | None = None, max_upload_mb: float = 20,
               batch_wait_ms: float = 5, max_batch: int = 32, max_decode_pixels: int | None = None) -> FastAPI:
    """The FastAPI app serving ``pipeline`` (and ``index`` for /search).

    ``max_decode_pixels`` caps the pixels that concurrent uploads decode at once (`DecodeBudget`);
    None: the pipeline's ``max_video_pixels``, room for one video at the clip limit.
    """
    if index is not None and index.pipeline is not pipeline:
        index.bind(pipeline)
    batcher = MicroBatcher(batched_runner(pipeline, index), batch_wait_ms / 1000.0, max_batch)
    positions = {} if index is None else {item: position for position, item in enumerate(index.ids)}
    budget = DecodeBudget(pipeline.max_video_pixels if max_decode_pixels is None else max_decode_pixels)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="mmfm", lifespan=lifespan)
    app.state.pipeline, app.state.index, app.state.batcher = pipeline, index, batcher
    app.state.decode_budget = budget
    app.add_middleware(BodySizeLimit, max_bytes=int(max_upload_mb * 1024 * 1024))
    app.add_exception_handler(UploadTooLarge, lambda _request, err: error_response(413, err))
    app.add_exception_handler(ItemNotFound, lambda _request, err: error_response(404, err))
    app.add_exception_handler(MmfmError, lambda _request, err: error_response(400, err))
    app.add_exception_handler(HTTPException, framework_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/model", responses=BAD_METHOD)
    async def model(request: Request):
        return {**model_card(pipeline, index), "endpoints": endpoints(request.app)}

    @app.get("/thumb/{position}", responses=NO_ITEM)
    async def thumb(position: str, request: Request):
        path = gallery_file(index, position)
        headers = {"Cache-Control": THUMB_CACHE, "ETag": etag(path)}
        if headers["ETag"] in etags(request.headers.get("if-none-match", "")):
            return Response(status_code=304, headers=headers)
        what = f"gallery item {position} ({path.name})"
        kind, pixels = await run_in_threadpool(pipeline.decoded_pixels, path, index.modality)
        if kind == "video":  # the strip decodes STRIP_FRAMES frames, not the model's num_frames
            pixels = pixels // pipeline.num_frames * STRIP_FRAMES
        async with budget.reserve(pixels, what):
            jpeg = await run_in_threadpool(thumbnail_jpeg, pipeline, kind, path, what)
        return Response(jpeg, media_type="image/jpeg", headers=headers)

    @app.get("/item/{position}", responses=NO_ITEM)
    async def item(position: str):
        return FileResponse(gallery_file(index, position))

    @app.get("/health", responses=BAD_METHOD)
    async def health():
        about_index = None if index is None else {"modality": index.modality, "size": len(index)}
        return {"status": "ok", "model": pipeline.name, "device": str(pipeline.device), "index": about_index}

    @app.post("/search", responses=BAD_REQUEST, openapi_extra=SEARCH_BODY)
    async def search(request: Request):
        if index is None:
            raise InputError("this server has no index: start it with `mmfm serve --index DIR` to search")
        if _is_form(request):
            form = await request.form()
            try:
                kind, pixels = await _decoded_upload(pipeline, form, budget)
                k, rerank = _int_field(form, "k", 10), _int_field(form, "rerank", None)
            finally:
                await form.close()
            hits = await batcher.submit(("search_pixels", kind, k, rerank), pixels)
        else:
            body = await _json_body(request)
            text, k, rerank = _text_field(body, "text"), _int_field(body, "k", 10), _int_field(body, "rerank", None)
            hits = await batcher.submit(("search_text", k, rerank), text)
        return {"hits": [{**hit.to_dict(), "position": positions[hit.id]} for hit in hits]}

    @app.post("/vqa", responses=BAD_REQUEST, openapi_extra=VQA_BODY)
    async def vqa(request: Request):
        if not _is_form(request):
            raise InputError("/vqa takes multipart/form-data: a file under 'image' or 'video' and a 'question'")
        form = await request.form()
        try:
            question, topk = _text_field(form, "question"), _int_field(form, "topk", 5)
            kind, pixels = await _decoded_upload(pipeline, form, budget)
        finally:
            await form.close()
        answers = await batcher.submit(("vqa", kind, topk), (pixels, question))
        return {"answers": [{"answer": a, "probability": p} for a, p in answers]}

    @app.post("/classify", responses=BAD_REQUEST, openapi_extra=CLASSIFY_BODY)
    async def classify(request: Request):
        if not _is_form(request):
            raise InputError("/classify takes multipart/form-data: a file under 'image' or 'video' and 'labels'")
        form = await request.form()
        try:
            labels = parse_labels(_text_field(form, "labels"))
            labels, templates = check_labels(labels, parse_templates(form.getlist("templates")))
            topk = _int_field(form, "topk", 5)
            kind, pixels = await _decoded_upload(pipeline, form, budget)
        finally:
            await form.close()
        ranked = await batcher.submit(("classify", kind, tuple(labels), tuple(templates), topk), pixels)
        return {"labels": [{"label": label, "probability": p} for label, p in ranked]}

    return app


# ---- request parsing ----------------------------------------------------------------------------

def _is_form(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


async def _json_body(request: Request) -> dict:
    raw = await request.body()  # outside the try: an over-limit body raises UploadTooLarge, a ValueError
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InputError("request body: JSON nested too deeply; send a flat object like "
                         "{\"text\": \"...\", \"k\": 10}") from None
    except ValueError as err:  # bad syntax, bad UTF-8, or an integer past Python's int-string digit limit
        reason = "" if isinstance(err, json.JSONDecodeError | UnicodeDecodeError) else " (a number is too long)"
        raise InputError(f"request body is not valid JSON{reason}; send {{\"text\": \"...\", \"k\": 10}} or a "
                         "multipart upload") from None
    if not isinstance(body, dict):
        raise InputError("JSON body must be an object like {\"text\": \"...\", \"k\": 10}")
    return body


def _text_field(fields, name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"field {name!r} is missing or empty: pass a non-empty {name} string")
    return value


def _int_field(fields, name: str, default):
    """A JSON integer or a string of ASCII digits (one optional sign) within ``INT_FIELD_RANGES[name]``."""
    value = fields.get(name)
    if value is None or value == "":
        return default
    low, high = INT_FIELD_RANGES[name]
    if isinstance(value, str) and (digits := INTEGER.fullmatch(value.strip())):
        number = int(digits.group())
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        number = None
    if number is None or not low <= number <= high:
        raise InputError(f"field {name!r}={reprlib.repr(value)}: must be an integer from {low} to {high}")
    return number


async def _decoded_upload(pipeline: Pipeline, form, budget: DecodeBudget) -> tuple[str, torch.Tensor]:
    """The form's uploaded image/video -> (kind, pixels): spilled, sized from its header, decoded within budget.

    Decoding and the header probe run in the thread pool; errors name the upload, not the temp file.
    """
    present = [name for name in MEDIA_FIELDS if name in form]
    if len(present) != 1 or isinstance(form[present[0]], str):
        raise InputError(f"upload exactly one file, under one of the form fields {', '.join(MEDIA_FIELDS)}")
    field, upload = present[0], form[present[0]]
    name = f"upload {upload.filename or field!r}"
    path = await run_in_threadpool(_spill_upload, upload)
    try:
        with _naming_upload(path, name):
            kind, pixels = await run_in_threadpool(pipeline.decoded_pixels, path, None if field == "file" else field)
            async with budget.reserve(pixels, name):
                return kind, await run_in_threadpool(pipeline.read, kind, path)
    finally:
        os.unlink(path)


def _spill_upload(upload) -> str:
    """Copy an upload to a temp file (decord and PyAV read paths), keeping a known media extension."""
    suffix = Path(upload.filename or "").suffix.lower()
    suffix = suffix if suffix in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS else ""
    upload.file.seek(0)
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as tmp:
        while chunk := upload.file.read(1 << 20):
            tmp.write(chunk)
    return tmp.name


@contextmanager
def _naming_upload(path: str, name: str):
    """Re-raise InputErrors that mention the temp file `path` with `name` in its place."""
    try:
        yield
    except InputError as err:
        raise type(err)(str(err).replace(path, name)) from None


def serve(pipeline: Pipeline, index: Index | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = 20, batch_wait_ms: float = 5, max_decode_pixels: int | None = None) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    app = create_app(pipeline, index, max_upload_mb, batch_wait_ms, max_decode_pixels=max_decode_pixels)
    uvicorn.run(app, host=host, port=port)
