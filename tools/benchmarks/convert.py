"""`mmfm data convert` throughput: a CSV of small PNGs → webdataset shards.

    python tools/bench.py convert --json out.json [--images 2000 --size 64 --workers 2]

Writes `--images` random-noise PNGs (size x size) and their CSV in a temp folder (not timed), then times
`mmfm.data.convert.convert(csv, --to shards)` in this process (imports done; the worker pool's start-up
is timed) and reports `convert_ips` (images per second), the best of `--repeats` runs into fresh
folders, with the worker count, the CPU time per image of the whole run (parent + workers) and the machine
load (other processes share the cores).
"""

from __future__ import annotations

import csv
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmfm.data.convert import convert


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)


def make_csv(folder: Path, count: int, size: int) -> Path:
    """`count` noise PNGs (incompressible, so the shards are realistic in size) and a CSV naming them."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        name = f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"image": name, "caption": f"image number {i}"})
    path = folder / "data.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(args) -> dict:
    result = {"cpu_count": os.cpu_count(), "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="mmfm_bench_convert_") as temp:
        source = make_csv(Path(temp), args.images, args.size)
        seconds, cpu = [], []
        for k in range(args.repeats):
            cpu_before, started = _cpu_seconds(), time.perf_counter()
            summary = convert([source], Path(temp) / f"out{k}", shard_size=args.shard_size,
                              workers=args.workers, quiet=True)
            seconds.append(time.perf_counter() - started)
            cpu.append(_cpu_seconds() - cpu_before)
            assert summary["samples"] == args.images, summary
        shard_bytes = sum(p.stat().st_size for p in (Path(temp) / "out0").glob("*.tar"))
    best = min(range(args.repeats), key=seconds.__getitem__)
    result.update(convert_ips=round(args.images / seconds[best], 1), workers=args.workers,
                  images=args.images, size=args.size, seconds=round(seconds[best], 3),
                  all_seconds=[round(s, 3) for s in seconds],
                  cpu_us_per_image=round(cpu[best] / args.images * 1e6, 1),
                  shard_mb=round(shard_bytes / 1e6, 2), load_avg_end=[round(x, 2) for x in os.getloadavg()],
                  targets={"convert_ips": 1000})
    return result
