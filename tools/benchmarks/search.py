"""Retrieval benchmark: index build throughput and text-query latency over a 10k-image index.

    python tools/bench.py search --json out.json [--items 10000] [--build-images 512] [--queries 200]
    python tools/bench.py search --faiss --items 200000 --json out.json [--dim 128] [--kind pq|ivf|hnsw]

Model: an untrained model of configs/demo_shapes.yaml (64 px; latency does not
depend on the weights). ``index_build_ips``: `pipe.index(images=...)` over ``--build-images`` random-pixel
PNGs (decode + transform + unimodal layers). The ``--items`` index is that index tiled with small noise
on the features (same tensor sizes as a real 10k index). Reports per-query latency of ITC-only search
(``p50_ms``, ``p99_ms``) and of ITM re-ranking the top ``--rerank`` (``p50_rerank_ms``, ``p99_rerank_ms``),
each query a distinct text, plus the machine load (other processes share the cores).

``--faiss``: features only, no model. ``--items`` random unit vectors of ``--dim`` searched through the
approximate path of `Index` (`ApproxSearch`, switch point at its floor so the faiss structure is used):
``build_s`` (training + adding), ``recall_at_K`` of the top ``--k`` against exact search, per-query
latency of single queries ``p50_ms`` / ``p99_ms`` (and ``exact_p50_ms`` of the exact matmul), with torch
and faiss pinned to ``--threads`` (default 1). Random vectors are the hard case for approximate search.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

def demo_model(untrained_answers: int = 32):
    """An untrained model of configs/demo_shapes.yaml (64 px) with VQA heads."""
    import torch

    from mmfm.config import load_config
    from mmfm.models.model import MMFM

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "demo_shapes.yaml").model
    answers = {"vqa": [f"answer {i}" for i in range(untrained_answers)], "video_qa": ["left", "right", "up", "down"]}
    preprocess = {"image_size": cfg.img_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "num_frames": 8}
    return MMFM(cfg, answers, preprocess).eval()


def random_images(directory: Path, count: int, size: int = 64, seed: int = 0) -> list[str]:
    """``count`` random-pixel PNGs of ``size`` px."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = directory / f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def machine_load() -> dict:
    one, five, _ = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "cpus": os.cpu_count()}


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "gray", "white"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]


def add_arguments(parser) -> None:
    parser.add_argument("--items", type=int, default=10_000, help="index size searched")
    parser.add_argument("--build-images", type=int, default=512, help="PNG files encoded for index_build_ips")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rerank", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; with --faiss, torch and faiss threads, default 1)")
    parser.add_argument("--faiss", action="store_true", help="approximate vs exact search of random features")
    parser.add_argument("--dim", type=int, default=128, help="--faiss: feature dimension")
    parser.add_argument("--kind", default=None, help="--faiss: pq, ivf or hnsw (default: ApproxSearch's)")
    parser.add_argument("--k-factor", type=int, default=None, help="--faiss, pq: candidates re-scored per hit")
    parser.add_argument("--nprobe", type=int, default=None, help="--faiss, ivf: lists scanned")
    parser.add_argument("--hnsw-m", type=int, default=None, help="--faiss, hnsw: graph degree")
    parser.add_argument("--ef-search", type=int, default=None, help="--faiss, hnsw: search breadth")


def queries(count: int) -> list[str]:
    """Distinct captions (no tokenizer-cache hits between timed queries)."""
    return [f"a {COLOURS[i % 8]} {SHAPES[(i // 8) % 6]} left of {i} {SHAPES[i % 6]}s" for i in range(count)]


def tiled_index(index, items: int):
    """An index of ``items`` rows: ``index`` repeated, features jittered and renormalised."""
    from mmfm.inference.index import Index
    from mmfm.models.trunk import TokenBatch

    reps = -(-items // len(index))
    features = index.features.repeat(reps, 1)[:items]
    features = torch.nn.functional.normalize(features + 0.05 * torch.randn_like(features), dim=-1)
    tokens = index.tokens.x.repeat(reps, 1, 1)[:items].contiguous()
    ids = [f"item{i}" for i in range(items)]
    return Index("image", ids, features, TokenBatch(tokens), index.fingerprint, pipeline=index.pipeline)


def latencies(search, texts: list[str]) -> np.ndarray:
    search(texts[0])
    out = []
    for text in texts:
        start = time.perf_counter()
        search(text)
        out.append((time.perf_counter() - start) * 1000)
    return np.array(out)


def run(args) -> dict:
    if args.faiss:
        return run_faiss(args)
    from mmfm.inference.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline(demo_model(), "cpu", name="demo_shapes (untrained)")
    with tempfile.TemporaryDirectory() as tmp:
        paths = random_images(Path(tmp), args.build_images)
        pipe.index(images=paths[:64], progress=False)  # warm-up
        start = time.perf_counter()
        built = pipe.index(images=paths, progress=False)
        build_s = time.perf_counter() - start
    index = tiled_index(built, args.items)
    texts = queries(args.queries)
    itc = latencies(lambda t: index.search(text=t, k=args.k), texts)
    rerank = latencies(lambda t: index.search(text=t, k=args.k, rerank=args.rerank), texts[: max(20, args.queries // 2)])
    return {
        "items": len(index), "index_build_ips": round(args.build_images / build_s, 1),
        "p50_ms": round(float(np.percentile(itc, 50)), 2), "p99_ms": round(float(np.percentile(itc, 99)), 2),
        "p50_rerank_ms": round(float(np.percentile(rerank, 50)), 2),
        "p99_rerank_ms": round(float(np.percentile(rerank, 99)), 2),
        "rerank": args.rerank, "torch_threads": torch.get_num_threads(),
        "index_mb": round(index.tokens.x.numel() * 4 / 2**20), **machine_load(),
    }


def unit_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=1)


def single_query_ms(index, queries: torch.Tensor, k: int) -> np.ndarray:
    index.search_features(queries[:1], k)
    out = []
    for row in range(len(queries)):
        start = time.perf_counter()
        index.search_features(queries[row:row + 1], k)
        out.append((time.perf_counter() - start) * 1000)
    return np.array(out)


def run_faiss(args) -> dict:
    import faiss

    from mmfm.inference.index import ApproxSearch, Index
    from mmfm.models.trunk import TokenBatch

    threads = args.threads or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    features, queries = unit_vectors(args.items, args.dim, seed=0), unit_vectors(args.queries, args.dim, seed=1)
    ids, tokens = [f"item{i}" for i in range(args.items)], TokenBatch(torch.zeros(args.items, 1, 1))
    settings = {name: value for name, value in (("kind", args.kind), ("k_factor", args.k_factor),
                                                ("nprobe", args.nprobe), ("hnsw_m", args.hnsw_m),
                                                ("ef_search", args.ef_search)) if value is not None}
    approx = ApproxSearch(min_items=ApproxSearch.MIN_ITEMS_FLOOR, **settings)
    index = Index("image", ids, features, tokens, approx=approx)
    exact = Index("image", ids, features, tokens, approx=ApproxSearch(min_items=args.items + 1))
    start = time.perf_counter()
    index.prepare()
    build_s = time.perf_counter() - start
    found, truth = index.search_features(queries, args.k), exact.search_features(queries, args.k)
    recall = np.mean([len({h.id for h in a} & {h.id for h in b}) / args.k for a, b in zip(found, truth)])
    approximate_ms, exact_ms = single_query_ms(index, queries, args.k), single_query_ms(exact, queries[:100], args.k)
    return {
        "mode": "faiss", "items": args.items, "dim": args.dim, **{f"approx_{k}": v for k, v in
                                                                   dataclasses.asdict(approx).items()},
        f"recall_at_{args.k}": round(float(recall), 4),
        "p50_ms": round(float(np.percentile(approximate_ms, 50)), 3),
        "p99_ms": round(float(np.percentile(approximate_ms, 99)), 3),
        "exact_p50_ms": round(float(np.percentile(exact_ms, 50)), 2), "build_s": round(build_s, 2),
        "queries": args.queries, "threads": threads, "faiss_version": faiss.__version__, **machine_load(),
    }

