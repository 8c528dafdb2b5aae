"""HTTP server (FastAPI + uvicorn) for retrieval and VQA, with micro-batching of concurrent requests.

    app = create_app(pipeline, index=None, max_upload_mb=20, batch_wait_ms=5)
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or: mmfm serve --model M --index DIR

Endpoints:
- ``GET /health`` -> {"status": "ok", "model", "device", "index": {"modality", "size"} | null}
- ``POST /search`` JSON ``{"text": str, "k": 10, "rerank": null|int}``, or multipart with a file under
  ``image`` / ``video`` / ``file`` (+ optional ``k`` / ``rerank`` fields) -> {"hits": [{"id", "score", ...}]}
- ``POST /vqa`` multipart: file under ``image`` / ``video`` / ``file`` + ``question`` (+ ``topk``)
  -> {"answers": [{"answer", "probability"}]}

Bad input is a JSON error ``{"error": {"type", "message"}}`` with a 4xx status: 400 for unreadable
files, empty questions, malformed fields; 413 for a body over ``max_upload_mb``. Never a 500.

Micro-batching: handlers decode uploads in the thread pool, then submit the pixels/texts to a
`MicroBatcher`. Its loop takes the first queued request, waits ``batch_wait_ms`` for more, groups them
by what they ask (same endpoint, modality, k, rerank / topk) and runs ONE batched model call per group
in a single model thread. ``batcher.batch_sizes`` counts the batch sizes it ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from mmfm.errors import InputError, MmfmError
from mmfm.inference.index import Index
from mmfm.inference.pipeline import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Pipeline

MEDIA_FIELDS = ("image", "video", "file")


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
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, UploadTooLarge(self._message(int(declared))))
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise UploadTooLarge(self._message(received))
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return (f"request body of {size} bytes exceeds the server limit of {self.max_bytes} bytes; "
                "upload a smaller file or start the server with a larger --max-upload-mb")


def error_response(status: int, err: Exception) -> JSONResponse:
    return JSONResponse({"error": {"type": type(err).__name__, "message": str(err)}}, status_code=status)


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
        pixels = torch.stack([pixels for pixels, _ in items])
        return pipeline.answer_pixels(key[1], pixels, [question for _, question in items], topk=key[2])

    return run_group


# ---- the app ------------------------------------------------------------------------------------

def create_app(pipeline: Pipeline, index: Index | None = None, max_upload_mb: float = 20,
               batch_wait_ms: float = 5, max_batch: int = 32) -> FastAPI:
    """The FastAPI app serving ``pipeline`` (and ``index`` for /search)."""
    if index is not None and index.pipeline is not pipeline:
        index.bind(pipeline)
    batcher = MicroBatcher(batched_runner(pipeline, index), batch_wait_ms / 1000.0, max_batch)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="mmfm", lifespan=lifespan)
    app.state.pipeline, app.state.index, app.state.batcher = pipeline, index, batcher
    app.add_middleware(BodySizeLimit, max_bytes=int(max_upload_mb * 1024 * 1024))
    app.add_exception_handler(UploadTooLarge, lambda _request, err: error_response(413, err))
    app.add_exception_handler(MmfmError, lambda _request, err: error_response(400, err))

    @app.get("/health")
    async def health():
        about_index = None if index is None else {"modality": index.modality, "size": len(index)}
        return {"status": "ok", "model": pipeline.name, "device": str(pipeline.device), "index": about_index}

    @app.post("/search")
    async def search(request: Request):
        if index is None:
            raise InputError("this server has no index: start it with `mmfm serve --index DIR` to search")
        if _is_form(request):
            form = await request.form()
            try:
                kind, pixels = await _decoded_upload(pipeline, form)
                k, rerank = _int_field(form, "k", 10), _int_field(form, "rerank", None)
            finally:
                await form.close()
            hits = await batcher.submit(("search_pixels", kind, k, rerank), pixels)
        else:
            body = await _json_body(request)
            text, k, rerank = _text_field(body, "text"), _int_field(body, "k", 10), _int_field(body, "rerank", None)
            hits = await batcher.submit(("search_text", k, rerank), text)
        return {"hits": [hit.to_dict() for hit in hits]}

    @app.post("/vqa")
    async def vqa(request: Request):
        if not _is_form(request):
            raise InputError("/vqa takes multipart/form-data: a file under 'image' or 'video' and a 'question'")
        form = await request.form()
        try:
            question, topk = _text_field(form, "question"), _int_field(form, "topk", 5)
            kind, pixels = await _decoded_upload(pipeline, form)
        finally:
            await form.close()
        answers = await batcher.submit(("vqa", kind, topk), (pixels, question))
        return {"answers": [{"answer": a, "probability": p} for a, p in answers]}

    return app


# ---- request parsing ----------------------------------------------------------------------------

def _is_form(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("request body is not valid JSON; send {\"text\": \"...\", \"k\": 10} or a "
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
    value = fields.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, (bool, float)) or not str(value).strip().lstrip("-").isdigit():
        raise InputError(f"field {name!r}={value!r}: must be an integer")
    number = int(value)
    if number < (0 if name == "rerank" else 1) or number > 10_000:
        raise InputError(f"field {name!r}={number}: out of range")
    return number


async def _decoded_upload(pipeline: Pipeline, form) -> tuple[str, torch.Tensor]:
    """Decode the uploaded image/video of a form in the thread pool -> (kind, pixels)."""
    present = [name for name in MEDIA_FIELDS if name in form]
    if len(present) != 1 or isinstance(form[present[0]], str):
        raise InputError(f"upload exactly one file, under one of the form fields {', '.join(MEDIA_FIELDS)}")
    upload = form[present[0]]
    return await run_in_threadpool(_decode_upload, pipeline, present[0], upload)


def _decode_upload(pipeline: Pipeline, field: str, upload) -> tuple[str, torch.Tensor]:
    """Spill the upload to a temp file (decord reads paths) and decode it; errors name the upload."""
    suffix = Path(upload.filename or "").suffix.lower()
    suffix = suffix if suffix in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS else ""
    upload.file.seek(0)
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as tmp:
        while chunk := upload.file.read(1 << 20):
            tmp.write(chunk)
    try:
        if field == "image":
            return "image", pipeline.read_image(tmp.name)
        if field == "video":
            return "video", pipeline.read_video(tmp.name)
        return pipeline.read_media(tmp.name)
    except InputError as err:
        raise InputError(str(err).replace(tmp.name, f"upload {upload.filename or field!r}")) from None
    finally:
        os.unlink(tmp.name)


def serve(pipeline: Pipeline, index: Index | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = 20, batch_wait_ms: float = 5) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(pipeline, index, max_upload_mb, batch_wait_ms), host=host, port=port)
