"""Data-layer benchmark: ShapesWorld generation time and image / video loader throughput.

    python tools/bench.py data --json out.json [--data-root DIR] [--skip-gen]

Reports `gen_seconds_default` (generating the default corpus on `gen_workers` processes; the corpus
itself records no timings, so one seed always gives the same files), `image_loader_sps`
(ImageTextDataset on pretrain.json, 64 px train transform, batch 128, 2 workers, whitespace tokenizer;
samples/s over >= 2,000 samples after warm-up) and `video_loader_cps` (VideoTextDataset, 8 frames,
64 px, 2 workers; clips/s), with the machine load at the time (other processes share the cores).
Each figure comes with `*_cpu_us_per_item` (CPU time to load + collate one item in one process) and
`*_idle_estimate` (workers / that time: the throughput the same workers would reach on otherwise idle
cores).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mmfm.data import EpochSampler, ImageTextDataset, VideoTextDataset, make_collate, train_transform


def add_arguments(parser) -> None:
    parser.add_argument("--data-root", type=Path, help="existing or target ShapesWorld folder (default: temp dir)")
    parser.add_argument("--skip-gen", action="store_true", help="reuse the corpus in --data-root")
    parser.add_argument("--images", type=int, default=None, help="images to generate (default: shapes default)")
    parser.add_argument("--videos", type=int, default=None, help="videos to generate (default: shapes default)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2000, help="image samples timed after warm-up")
    parser.add_argument("--video-batch-size", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--clips", type=int, default=400, help="clips timed after warm-up")


def whitespace_tokenizer(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stub text tokenizer: word ids = hash of the word, padded to the longest text."""
    words = [t.split() for t in texts]
    length = max(len(w) for w in words)
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for row, sentence in enumerate(words):
        ids[row, :len(sentence)] = torch.tensor([hash(w) % 30000 for w in sentence])
        mask[row, :len(sentence)] = True
    return ids, mask


def items_per_second(dataset, batch_size: int, workers: int, min_items: int, warmup_batches: int = 4) -> float:
    """Throughput of a DataLoader over `dataset` (skipping the first batches: worker start-up)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, sampler=EpochSampler(len(dataset)),
                        collate_fn=make_collate(whitespace_tokenizer), persistent_workers=False,
                        prefetch_factor=4 if workers else None)
    batches = iter(loader)
    for _ in range(warmup_batches):
        next(batches)
    seen, started = 0, time.perf_counter()
    while seen < min_items:
        seen += len(next(batches)["text"])
    return seen / (time.perf_counter() - started)


def cpu_seconds_per_item(dataset, batch_size: int, batches: int = 4) -> float:
    """CPU time (not wall time) to load and collate one item in this process: robust to a busy machine."""
    collate_fn = make_collate(whitespace_tokenizer)
    torch.set_num_threads(1)  # as in a DataLoader worker
    order = iter(EpochSampler(len(dataset), seed=1))
    collate_fn([dataset[next(order)] for _ in range(batch_size)])  # warm-up
    started = time.process_time()
    for _ in range(batches):
        collate_fn([dataset[next(order)] for _ in range(batch_size)])
    return (time.process_time() - started) / (batches * batch_size)


def measure(name: str, dataset, batch_size: int, workers: int, min_items: int) -> dict:
    """Wall-clock throughput with `workers`, plus the CPU-bound estimate for `workers` idle cores."""
    cpu = cpu_seconds_per_item(dataset, batch_size)
    return {name: round(items_per_second(dataset, batch_size, workers, min_items), 1),
            f"{name}_cpu_us_per_item": round(cpu * 1e6, 1),
            f"{name}_idle_estimate": round(max(workers, 1) / cpu, 1)}


def generate_corpus(args, root: Path) -> dict:
    from mmfm.data import shapes

    images = args.images or shapes.DEFAULT_IMAGES
    videos = args.videos or shapes.DEFAULT_VIDEOS
    default = images == shapes.DEFAULT_IMAGES and videos == shapes.DEFAULT_VIDEOS
    workers = os.cpu_count() or 1
    started = time.perf_counter()
    shapes.generate(root, images=images, videos=videos, seed=0, workers=workers)
    key = "gen_seconds_default" if default else "gen_seconds"
    return {key: round(time.perf_counter() - started, 2), "gen_workers": workers, "gen_images": images,
            "gen_videos": videos}


def run(args) -> dict:
    temp = None if args.data_root else tempfile.TemporaryDirectory(prefix="mmfm_bench_data_")
    root = args.data_root or Path(temp.name)
    result: dict = {"cpu_count": os.cpu_count(), "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    if not args.skip_gen:
        result.update(generate_corpus(args, root))
    annotations = root / "annotations"
    transform = train_transform(args.size)
    images = ImageTextDataset(annotations / "pretrain.json", root, transform)
    result.update(measure("image_loader_sps", images, args.batch_size, args.workers, args.samples))
    videos = VideoTextDataset(annotations / "video_train.json", root, args.frames, transform)
    result.update(measure("video_loader_cps", videos, args.video_batch_size, args.workers, args.clips))
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = {"image_loader_sps": 1500, "video_loader_cps": 150}
    if temp is not None:
        temp.cleanup()
    return result
