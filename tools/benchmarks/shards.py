"""Sharded streaming benchmark: samples/s from local webdataset shards and the converter's images/s.

    python tools/bench.py shards --json out.json [--data-root data/shapes]

Reads ShapesWorld's shards (`python tools/make_data.py shapes --out DIR --shards` writes them) through
`ShardStream` exactly as training does (epoch mode, shuffle buffer 1000, 64 px train transform, batches
collated in the workers with the whitespace tokenizer of the `data` benchmark):

- `shard_image_sps`: image-text samples/s with 2 workers, batch 128, over >= 4,000 samples after warm-up;
- `shard_video_cps`: video-text clips/s, 8 frames, 2 workers, batch 16, over >= 400 clips;
- `convert_ips`: `mmfm data convert` of 2,000 64 px PNGs from a CSV to shards with 2 workers (the
  `convert` benchmark).

Each read figure comes with `*_cpu_us_per_item` (CPU time per sample in one process, robust to a busy
machine) and `*_idle_estimate` (workers / that time), and the machine load before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mmfm.data.collate import make_collate
from mmfm.data.shards import CaptionDecoder, MediaReader, ShardSource, ShardStream, expand_shards
from mmfm.data.transforms import train_transform

HERE = Path(__file__).resolve().parent


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser) -> None:
    parser.add_argument("--data-root", type=Path, default=Path("data/shapes"),
                        help="ShapesWorld folder with shards/ and video_shards/")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4000, help="image samples timed after warm-up")
    parser.add_argument("--video-batch-size", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--clips", type=int, default=400, help="clips timed after warm-up")
    parser.add_argument("--skip-convert", action="store_true", help="only the read figures")


def stream(folder: Path, modality: str, frames: int, size: int) -> ShardStream:
    urls = expand_shards(str(folder))
    decoder = CaptionDecoder(MediaReader(modality, frames), train_transform(size))
    return ShardStream([ShardSource(tuple(urls), 1.0, str(folder))], decoder, mode="epoch", shuffle_buffer=1000)


def items_per_second(dataset: ShardStream, batch_size: int, workers: int, min_items: int,
                     warmup_batches: int = 4) -> float:
    tokenizer = _sibling("data").whitespace_tokenizer
    dataset.configure(batch_size, make_collate(tokenizer), num_workers=workers)
    batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None))
    for _ in range(warmup_batches * max(1, workers)):
        next(batches)
    seen, started = 0, time.perf_counter()
    while seen < min_items:
        seen += len(next(batches)["text"])
    return seen / (time.perf_counter() - started)


def cpu_seconds_per_item(dataset: ShardStream, items: int = 512) -> float:
    """CPU time to read, shuffle, decode and transform one sample in this process (after the buffer fills)."""
    torch.set_num_threads(1)
    samples = dataset.slot_samples(0, 1, None)
    for _ in range(64):
        next(samples)
    started = time.process_time()
    for _ in range(items):
        next(samples)
    return (time.process_time() - started) / items


def measure(name: str, dataset: ShardStream, batch_size: int, workers: int, min_items: int) -> dict:
    cpu = cpu_seconds_per_item(dataset, min(512, min_items))
    return {name: round(items_per_second(dataset, batch_size, workers, min_items), 1),
            f"{name}_cpu_us_per_item": round(cpu * 1e6, 1),
            f"{name}_idle_estimate": round(max(workers, 1) / cpu, 1)}


def run(args) -> dict:
    result: dict = {"cpu_count": os.cpu_count(), "load_avg_start": [round(x, 2) for x in os.getloadavg()],
                    "workers": args.workers}
    images = stream(args.data_root / "shards", "image", args.frames, args.size)
    result.update(measure("shard_image_sps", images, args.batch_size, args.workers, args.samples))
    videos = stream(args.data_root / "video_shards", "video", args.frames, args.size)
    result.update(measure("shard_video_cps", videos, args.video_batch_size, args.workers, args.clips))
    if not args.skip_convert:
        convert = _sibling("convert")
        parser = argparse.ArgumentParser()
        convert.add_arguments(parser)
        result.update({k: v for k, v in convert.run(parser.parse_args([])).items() if k.startswith("convert")})
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = {"shard_image_sps": 1500, "shard_video_cps": 150, "convert_ips": 1000}
    return result
