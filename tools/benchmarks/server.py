"""HTTP server benchmark: `mmfm serve` under 4 concurrent clients on loopback.

    python tools/bench.py server --json out.json [--seconds 60] [--clients 4] [--warmup 5]

Starts `python -m mmfm.cli serve` (untrained demo-size model, an index of ``--items`` random images) on
127.0.0.1 at a free port, warms it up, then runs ``--clients`` threads for ``--seconds`` (each stops by
itself): every client alternates a text search (JSON, k=10, rerank 16) and a VQA upload (64 px PNG).
Reports ``requests``, ``errors`` (non-200 or transport errors), ``rps``, ``p50_ms``/``p99_ms`` and the
server's RSS after warm-up and at the end (``mem_growth`` = relative growth), with the machine load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SEARCH = Path(__file__).resolve().parent / "search.py"


def _search_module():
    spec = importlib.util.spec_from_file_location("bench_search_helpers", SEARCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser) -> None:
    parser.add_argument("--seconds", type=float, default=60.0, help="timed load duration")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--items", type=int, default=256, help="index size")
    parser.add_argument("--rerank", type=int, default=16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(tmp: Path, items: int) -> tuple[Path, Path, str]:
    """Save the demo model and an index of random images; returns (checkpoint, index dir, a query image)."""
    from mmfm.inference.pipeline import Pipeline
    from mmfm.models.io import save_model

    helpers = _search_module()
    model = helpers.demo_model()
    checkpoint = tmp / "demo.safetensors"
    save_model(model, checkpoint)
    paths = helpers.random_images(tmp / "images", items)
    Pipeline(model, "cpu").index(images=paths, progress=False).save(tmp / "index")
    return checkpoint, tmp / "index", paths[0]


def wait_healthy(client, url: str, process, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            if client.get(f"{url}/health").status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def client_loop(url: str, image: bytes, stop_at: float, rerank: int, record) -> None:
    """Alternate text search and VQA upload until ``stop_at``; ``record(ok, ms)`` per request."""
    import httpx

    texts = _search_module().queries(64)
    with httpx.Client(timeout=30.0) as client:
        turn = 0
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                if turn % 2 == 0:
                    response = client.post(f"{url}/search", json={"text": texts[turn % 64], "k": 10, "rerank": rerank})
                else:
                    response = client.post(f"{url}/vqa", files={"image": ("q.png", image, "image/png")},
                                           data={"question": texts[turn % 64], "topk": "5"})
                ok = response.status_code == 200
            except Exception:  # noqa: BLE001 - counted as an error
                ok = False
            record(ok, (time.perf_counter() - start) * 1000)
            turn += 1


def load_phase(url: str, image: bytes, seconds: float, clients: int, rerank: int) -> tuple[list, int]:
    latencies, errors, lock = [], [0], threading.Lock()

    def record(ok: bool, ms: float) -> None:
        with lock:
            latencies.append(ms)
            errors[0] += not ok

    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(url, image, stop_at, rerank, record))
               for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def run(args) -> dict:
    import httpx

    helpers = _search_module()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, index, image_path = prepare(Path(tmp), args.items)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = subprocess.Popen([sys.executable, "-m", "mmfm.cli", "serve", "--model", str(checkpoint),
                                    "--index", str(index), "--port", str(port), "--device", "cpu"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            with httpx.Client() as client:
                wait_healthy(client, url, process)
            image = Path(image_path).read_bytes()
            load_phase(url, image, args.warmup, args.clients, args.rerank)
            rss_start = rss_mb(process.pid)
            latencies, errors = load_phase(url, image, args.seconds, args.clients, args.rerank)
            rss_end = rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
    latencies = np.array(latencies)
    return {
        "requests": len(latencies), "errors": errors, "seconds": args.seconds, "clients": args.clients,
        "rps": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1), "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "rss_mb_after_warmup": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
        "mem_growth": round((rss_end - rss_start) / rss_start, 4), **helpers.machine_load(),
    }
