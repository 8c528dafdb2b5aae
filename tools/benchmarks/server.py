"""HTTP server benchmarks: throughput under concurrent clients, and a memory / error soak.

    python tools/bench.py server --json out.json [--seconds 60] [--clients 4] [--warmup 5]
    python tools/bench.py server --soak --json soak.json [--soak-queries 2000] [--soak-uploads 200]

Both start `python -m mmfm.cli serve` with ``--model`` (default the committed zoo model mmfm-shapes-s,
which loads offline) and an index of ``--items`` random 64 px images, on 127.0.0.1 at a free port.

Load (default): after ``--warmup`` seconds, ``--clients`` threads run for ``--seconds`` (each stops by
itself), every client alternating a text search (JSON, k=10, rerank ``--rerank``) and a VQA upload
(64 px PNG). Reports ``requests``, ``errors`` (non-200 or transport errors), ``rps``,
``p50_ms``/``p99_ms`` and the server's RSS after warm-up and at the end (``mem_growth`` = relative
growth), with the machine load.

Soak (``--soak``): after a short warm-up, ``--clients`` threads send ``--soak-queries`` distinct text
searches (random words; lengths spread evenly up to ``--max-text-kb``, in shuffled order) and
``--soak-uploads`` distinct generated PNGs (32-255 px, alternately /search and /vqa). Reports the
responses by class (``server_errors`` = 5xx, must be 0), the server's RSS after the warm-up and after
the soak (``mem_growth``, target <= 0.10), then a latency probe: while another client keeps sending
one-word queries of ``--long-word-kb`` random letters, ``--probe-requests`` short searches are timed
(``probe_p99_ms``, target <= 500; ``long_word_ms`` the long queries' own latencies). A probe request
that times out (``--timeout``) ends the probe and is counted in ``probe_timeouts``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import random
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

SEARCH = Path(__file__).resolve().parent / "search.py"
WORD_CHARS = string.ascii_lowercase + " "
WORD_WEIGHTS = [1] * 26 + [5]  # mean word length ~5 letters
SOAK_WARMUP = 8  # requests before the start RSS: model, threads and allocator pools are up by then


def _search_module():
    spec = importlib.util.spec_from_file_location("bench_search_helpers", SEARCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="mmfm-shapes-s", help="zoo name, run directory or checkpoint to serve")
    parser.add_argument("--seconds", type=float, default=60.0, help="timed load duration")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--items", type=int, default=256, help="index size")
    parser.add_argument("--rerank", type=int, default=16)
    soak = parser.add_argument_group("soak")
    soak.add_argument("--soak", action="store_true", help="run the memory / error soak instead of the load")
    soak.add_argument("--soak-queries", type=int, default=2000, help="distinct text queries")
    soak.add_argument("--soak-uploads", type=int, default=200, help="distinct generated PNG uploads")
    soak.add_argument("--max-text-kb", type=float, default=100, help="longest text query")
    soak.add_argument("--long-word-kb", type=float, default=60, help="the one-word query of the latency probe")
    soak.add_argument("--probe-requests", type=int, default=50, help="short searches timed beside the long word")
    soak.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, seconds")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(tmp: Path, model: str, items: int) -> tuple[Path, str]:
    """An index of ``items`` random images built with ``model``; returns (index dir, a query image)."""
    import mmfm

    paths = _search_module().random_images(tmp / "images", items)
    mmfm.load(model, device="cpu").index(images=paths, progress=False).save(tmp / "index")
    return tmp / "index", paths[0]


def wait_healthy(client, url: str, process, log: Path, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            if client.get(f"{url}/health").status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


@contextlib.contextmanager
def running_server(args, tmp: Path):
    """`mmfm serve` of ``args.model`` + a fresh index on a free port; yields (url, process, query image)."""
    import httpx

    index, image_path = prepare(tmp, args.model, args.items)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "mmfm.cli", "serve", "--model", args.model,
                                    "--index", str(index), "--port", str(port), "--device", "cpu"],
                                   stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        with httpx.Client() as client:
            wait_healthy(client, url, process, log)
        yield url, process, Path(image_path).read_bytes()
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # its model thread is still busy with a slow request
            process.kill()
            process.wait()


# ---- load --------------------------------------------------------------------------------------

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


def load(url: str, process, image: bytes, args) -> dict:
    load_phase(url, image, args.warmup, args.clients, args.rerank)
    rss_start = rss_mb(process.pid)
    latencies, errors = load_phase(url, image, args.seconds, args.clients, args.rerank)
    rss_end = rss_mb(process.pid)
    latencies = np.array(latencies)
    return {
        "requests": len(latencies), "errors": errors, "seconds": args.seconds, "clients": args.clients,
        "rps": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1), "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "rss_mb_after_warmup": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
        "mem_growth": round((rss_end - rss_start) / rss_start, 4),
    }


# ---- soak --------------------------------------------------------------------------------------

def random_text(length: int, seed: int) -> str:
    """``length`` characters of random lowercase words, distinct per ``seed``."""
    rng = random.Random(seed)
    return f"q{seed} " + "".join(rng.choices(WORD_CHARS, WORD_WEIGHTS, k=length))


def random_png(seed: int) -> bytes:
    """A distinct PNG of random pixels, 32-255 px a side."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = 32 + seed % 224
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def soak_jobs(queries: int, uploads: int, max_chars: int) -> list[tuple[str, int, int]]:
    """("text", length, seed) and ("upload", 0, seed) jobs, lengths spread evenly up to ``max_chars``, shuffled."""
    jobs = [("text", max(1, max_chars * (i + 1) // queries), i) for i in range(queries)]
    jobs += [("upload", 0, i) for i in range(uploads)]
    random.Random(0).shuffle(jobs)
    return jobs


def send(client, url: str, job: tuple[str, int, int], rerank: int) -> str:
    """Run one soak job; returns its outcome: "2xx", "4xx", "5xx" or "transport"."""
    import httpx

    kind, length, seed = job
    try:
        if kind == "text":
            response = client.post(f"{url}/search", json={"text": random_text(length, seed), "k": 10, "rerank": rerank})
        elif seed % 2 == 0:
            response = client.post(f"{url}/search", files={"image": ("q.png", random_png(seed), "image/png")},
                                   data={"k": "5"})
        else:
            response = client.post(f"{url}/vqa", files={"image": ("q.png", random_png(seed), "image/png")},
                                   data={"question": "what shape is it?", "topk": "3"})
    except httpx.TransportError:
        return "transport"
    return f"{response.status_code // 100}xx"


def run_jobs(url: str, jobs: list, clients: int, rerank: int, timeout: float) -> Counter:
    """Send ``jobs`` from ``clients`` threads; counts of their outcomes."""
    import httpx

    outcomes, pending, lock = Counter(), iter(jobs), threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=timeout) as client:
            while True:
                with lock:
                    job = next(pending, None)
                if job is None:
                    return
                outcome = send(client, url, job, rerank)
                with lock:
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def latency_probe(url: str, args) -> dict:
    """Short searches timed while another client keeps sending one-word queries of ``--long-word-kb``."""
    import httpx

    stop, long_ms = threading.Event(), []

    def long_words() -> None:
        with httpx.Client(timeout=args.timeout) as client:
            seed = 0
            while not stop.is_set():
                word = random_text(int(args.long_word_kb * 1024), seed).replace(" ", "")
                start = time.perf_counter()
                with contextlib.suppress(httpx.TransportError):  # a timeout shows in long_word_ms
                    client.post(f"{url}/search", json={"text": word, "k": 10})
                long_ms.append((time.perf_counter() - start) * 1000)
                seed += 1

    thread = threading.Thread(target=long_words)
    thread.start()
    time.sleep(0.5)  # the first long word is in flight
    latencies, failures, timeouts = [], 0, 0
    with httpx.Client(timeout=args.timeout) as client:
        for text in _search_module().queries(args.probe_requests):
            start = time.perf_counter()
            try:
                failures += client.post(f"{url}/search", json={"text": text, "k": 10}).status_code != 200
            except httpx.TimeoutException:
                timeouts += 1
                break  # stuck behind the long word: the target is missed, the rest would time out too
            latencies.append((time.perf_counter() - start) * 1000)
    stop.set()
    thread.join()
    return {"probe_requests": len(latencies), "probe_failures": failures, "probe_timeouts": timeouts,
            "probe_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
            "probe_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
            "long_word_ms": [round(ms, 1) for ms in long_ms]}


def soak(url: str, process, args) -> dict:
    jobs = soak_jobs(args.soak_queries, args.soak_uploads, int(args.max_text_kb * 1024))
    warmup = [("text", 64, -1 - i) if i % 2 else ("upload", 0, 10_000 + i) for i in range(SOAK_WARMUP)]
    run_jobs(url, warmup, args.clients, args.rerank, args.timeout)
    rss_start = rss_mb(process.pid)
    start = time.perf_counter()
    outcomes = run_jobs(url, jobs, args.clients, args.rerank, args.timeout)
    seconds = time.perf_counter() - start
    rss_end = rss_mb(process.pid)
    return {
        "queries": args.soak_queries, "uploads": args.soak_uploads, "max_text_kb": args.max_text_kb,
        "clients": args.clients, "seconds": round(seconds, 1),
        "ok": outcomes["2xx"], "client_errors": outcomes["4xx"], "server_errors": outcomes["5xx"],
        "transport_errors": outcomes["transport"],
        "rss_mb_after_warmup": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
        "mem_growth": round((rss_end - rss_start) / rss_start, 4), "long_word_kb": args.long_word_kb,
        **latency_probe(url, args),
    }


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp, running_server(args, Path(tmp)) as (url, process, image):
        result = soak(url, process, args) if args.soak else load(url, process, image, args)
    return {"model": args.model, **result, **_search_module().machine_load()}
