"""Generate datasets: `python tools/make_data.py shapes --out DIR [options]`.

`shapes` writes the ShapesWorld corpus (see docs/data.md). With `--if-missing` it returns at once when
DIR already holds a corpus made with the same parameters; with `--preview-dir` it also draws the
sample sheets used by the docs (shapes_grid.png, shapes_video.png). With `--shards` it also writes the
train split as webdataset shards, DIR/shards/*.tar (images) and DIR/video_shards/*.tar (videos), reusing
a corpus already there with the same parameters (and shards finished by an earlier run).
"""

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

from mmfm.data import shapes
from mmfm.errors import DataError


def _existing_params(out: Path) -> dict | None:
    try:
        return json.loads((out / "annotations" / "summary.json").read_text())["params"]
    except (OSError, ValueError, KeyError):
        return None


def _print_summary(summary: dict, seconds: float, workers: int) -> None:
    print(f"{'split':<11} {'images':>7} {'videos':>7} {'img QA':>7} {'vid QA':>7}")
    for split, c in summary["counts"].items():
        print(
            f"{split:<11} {c['images']:>7} {c['videos']:>7} {c['image_questions']:>7} {c['video_questions']:>7}"
        )
    print(f"binding probes: {summary['binding_probes']}; {seconds:.2f} s on {workers} workers")


def write_grid_preview(data_dir: Path, path: Path, count: int = 12) -> None:
    """A grid of test images, each with one caption and one question/answer below it."""
    import matplotlib.pyplot as plt
    from PIL import Image

    annotations = data_dir / "annotations"
    entries = json.loads((annotations / "retrieval_test.json").read_text())[:count]
    questions = json.loads((annotations / "vqa_test.json").read_text())
    types = ("count", "color", "relation", "exists", "shape")
    columns = 4
    fig, axes = plt.subplots(
        (len(entries) + columns - 1) // columns, columns, figsize=(10, 3.5 * len(entries) / columns)
    )
    for k, (ax, entry) in enumerate(zip(axes.flat, entries)):
        own = [q for q in questions if q["image"] == entry["image"]]
        wanted = [q for q in own if q["question_type"] == types[k % len(types)]] or own
        qa = wanted[0]
        ax.imshow(Image.open(data_dir / entry["image"]), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(
            _wrap(entry["caption"][0], 38) + f"\nQ: {qa['question']}\nA: {qa['answer'][0]}",
            fontsize=7,
            y=-0.03,
            va="top",
        )
    for ax in list(axes.flat)[len(entries) :]:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_video_preview(data_dir: Path, path: Path, count: int = 2, frame_step: int = 3) -> None:
    """Frame strips of the first test videos that show motion or an event, with a caption and a QA."""
    import decord
    import matplotlib.pyplot as plt

    annotations = data_dir / "annotations"
    scenes = json.loads((annotations / "video_scenes_test.json").read_text())
    captions = {v["video"]: v["caption"] for v in json.loads((annotations / "video_test.json").read_text())}
    questions = json.loads((annotations / "videoqa_test.json").read_text())
    lively = [s for s in scenes if any(o["event"] for o in s["objects"])][:1]
    lively += [s for s in scenes if s not in lively and any(o["motion"] != "none" for o in s["objects"])]
    chosen = lively[:count]
    steps = list(range(0, chosen[0]["frames"], frame_step))
    fig, axes = plt.subplots(
        len(chosen), len(steps), figsize=(1.25 * len(steps), 2.0 * len(chosen)), squeeze=False
    )
    for row, scene in zip(axes, chosen):
        frames = decord.VideoReader(str(data_dir / scene["video"])).get_batch(steps).asnumpy()
        for ax, frame, step in zip(row, frames, steps):
            ax.imshow(frame, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"t={step}", fontsize=7)
        own = [q for q in questions if q["video"] == scene["video"]]
        preferred = ("appear", "disappear", "color_change", "direction", "count_moving", "event")
        qa = min(own, key=lambda q: preferred.index(q["question_type"]))
        row[0].text(
            0,
            scene["size"] * 1.12,
            f"{captions[scene['video']][0]}\nQ: {qa['question']}  A: {qa['answer'][0]}",
            fontsize=8,
            va="top",
        )
    fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.12, hspace=0.7, wspace=0.08)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _wrap(text: str, width: int) -> str:
    return textwrap.fill(text, width, break_long_words=False)


def _write_shards(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    try:
        manifests = shapes.write_shards(args.out, workers, args.shard_size, quiet=not sys.stderr.isatty())
    except DataError as err:
        raise SystemExit(f"make_data.py shapes: {err}") from None
    for folder, manifest in manifests.items():
        shards = len(manifest["shards"])
        print(f"{args.out / folder}: {manifest['samples']} {manifest['kind']}s in {shards} shards")
    print(f"shards written in {time.perf_counter() - started:.2f} s")


def shapes_command(args: argparse.Namespace) -> int:
    params = {
        "images": args.images,
        "videos": args.videos,
        "size": args.size,
        "frames": args.frames,
        "seed": args.seed,
    }
    if (args.if_missing or args.shards) and _existing_params(args.out) == params:
        then = "only writing its shards" if args.shards else "nothing to do"
        print(f"ShapesWorld already in {args.out} (same parameters); {then}")
    else:
        workers = (os.cpu_count() or 1) if args.workers is None else args.workers
        started = time.perf_counter()
        try:
            summary = shapes.generate(args.out, workers=workers, **params)
        except DataError as err:
            raise SystemExit(f"make_data.py shapes: {err}") from None
        _print_summary(summary, time.perf_counter() - started, workers)
    if args.shards:
        _write_shards(args)
    if args.preview_dir:
        args.preview_dir.mkdir(parents=True, exist_ok=True)
        write_grid_preview(args.out, args.preview_dir / "shapes_grid.png")
        write_video_preview(args.out, args.preview_dir / "shapes_video.png")
        print(f"previews written to {args.preview_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_data.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    p = sub.add_parser("shapes", help="the procedurally generated ShapesWorld corpus")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--images", type=int, default=shapes.DEFAULT_IMAGES, help="number of train images")
    p.add_argument("--videos", type=int, default=shapes.DEFAULT_VIDEOS, help="number of train videos")
    p.add_argument("--size", type=int, default=64, help="image/video side in pixels, 32..512")
    p.add_argument("--frames", type=int, default=16, help="frames per video, >= 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--if-missing", action="store_true", help="do nothing if DIR holds the same corpus")
    p.add_argument("--preview-dir", type=Path, help="also write the docs sample sheets here")
    p.add_argument("--shards", action="store_true", help="also write the train split as webdataset shards")
    p.add_argument("--shard-size", type=int, help="samples per shard (default: >= 8 shards, <= 1000 each)")
    p.set_defaults(run=shapes_command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
