"""A fault-injecting HTTP file server on 127.0.0.1 for the model-zoo tests.

    with ZooServer() as server:
        server.add("/a.safetensors", data, drop_after=1000)   # first GET closes the connection after 1000 bytes
        url = server.url("/a.safetensors")
        ...
        server.requests_for("/a.safetensors")                  # [(method, range_header_or_None), ...]

Faults per path: `drop_after` (once), `wrong_bytes` (same length, other content), `status` (e.g. 404),
`delay` (sleep before answering: beyond a client timeout), `throttle` (seconds between 64 KiB chunks),
`ignore_range` (answer 200 + the whole file to Range requests), `endless` (no Content-Length, the file sent
over and over until the client hangs up; `sent[path]` counts the bytes). Range requests get 206 +
Content-Range.
It also answers `/{repo}/resolve/{revision}/{file}` HEAD/GET the way the Hugging Face Hub does (ETag,
X-Repo-Commit), so `huggingface_hub.hf_hub_download` can be pointed at it with HF_ENDPOINT.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 64 * 1024
ENDLESS_LIMIT = 1 << 30  # an `endless` answer still ends here, so a client that never stops cannot hang a test
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    """A file and the faults to inject when serving it."""

    data: bytes
    status: int = 200
    drop_after: int | None = None
    wrong_bytes: bool = False
    delay: float = 0.0
    throttle: float = 0.0
    ignore_range: bool = False
    endless: bool = False


class ZooServer:
    """Serve in-memory files on an ephemeral 127.0.0.1 port from a background thread."""

    def __init__(self):
        self.files: dict[str, Served] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add(self, path: str, data: bytes, **faults) -> str:
        """Serve `data` at `path` with the given faults; returns the full URL."""
        self.files[path] = Served(data, **faults)
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def record(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, range_header))

    def requests_for(self, path: str, method: str | None = None) -> list[tuple[str, str | None]]:
        """(method, Range header) of each request made for `path`."""
        with self._lock:
            return [(m, r) for m, p, r in self.requests if p == path and method in (None, m)]


def _make_handler(server: ZooServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            path = _hf_path(self.path)
            server.record(self.command, path, self.headers.get("Range"))
            served = server.files.get(path)
            if served is None or served.status == 404:
                self._send_status(404)
                return
            time.sleep(served.delay)
            if served.endless:
                self._send_endless(path, served.data)
                return
            if served.status != 200:
                self._send_status(served.status)
                return
            data = bytes(reversed(served.data)) if served.wrong_bytes else served.data
            start = _range_start(self.headers.get("Range"))
            partial = start is not None and not served.ignore_range
            if partial and start >= len(data):
                self._send_status(416)
                return
            body = data[start:] if partial else data
            self.send_response(206 if partial else 200)
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{hashlib.sha256(served.data).hexdigest()}"')
            self.send_header("X-Repo-Commit", FAKE_COMMIT)
            self.end_headers()
            if send_body:
                self._send_body(served, body)

        def _send_body(self, served: Served, body: bytes) -> None:
            limit = len(body)
            if served.drop_after is not None:
                limit, served.drop_after = min(limit, served.drop_after), None  # drop once
            try:
                for offset in range(0, limit, CHUNK):
                    self.wfile.write(body[offset : min(offset + CHUNK, limit)])
                    time.sleep(served.throttle)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client stopped reading (a download capped at the manifest's size)
            if limit < len(body):
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

        def _send_endless(self, path: str, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Connection", "close")  # no Content-Length: the body ends when the server hangs up
            self.end_headers()
            self.close_connection = True
            server.sent[path] = 0
            try:
                while server.sent[path] < ENDLESS_LIMIT:
                    self.wfile.write(data)
                    server.sent[path] += len(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading: what the test wants

        def _send_status(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def _range_start(header: str | None) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else None


def _hf_path(path: str) -> str:
    """Map `/{org}/{repo}/resolve/{revision}/{file}` to `/{org}/{repo}/{file}`; other paths unchanged."""
    match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path.split("?", 1)[0])
    return f"/{match.group(1)}/{match.group(2)}" if match else path.split("?", 1)[0]


def manifest_entry(name: str, data: bytes, sources: list[str], **overrides) -> dict:
    """A valid manifest entry for a weights file holding `data`."""
    entry = {
        "name": name,
        "description": f"test entry {name}",
        "tasks": ["image_text"],
        "architecture": {"arch": "tiny", "family": "mmfm", "depth": 2},
        "files": {
            "weights": {"sources": sources, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        },
        "license": "apache-2.0",
        "metrics": {"txt_r1": 12.5},
        "preprocessing": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "num_frames": 4},
    }
    entry.update(overrides)
    return entry


def isolate_zoo(tmp_path, monkeypatch, entries: list[dict] | None = None):
    """Point MMFM_HOME and MMFM_ZOO_MANIFEST into tmp_path, online mode, fresh hash memo; returns the manifest path."""
    import yaml

    from mmfm.zoo import download

    manifest = tmp_path / "zoo" / "models.yaml"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(yaml.safe_dump(entries or []))
    monkeypatch.setenv("MMFM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MMFM_ZOO_MANIFEST", str(manifest))
    for var in ("MMFM_OFFLINE", "HF_HUB_OFFLINE", "MMFM_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(download, "_verified", {})
    return manifest
