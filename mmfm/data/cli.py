"""`mmfm data convert` and `mmfm data inspect`: turn a dataset into webdataset shards, and check them.

    mmfm data convert train.csv --to shards --out shards/ [--format csv --image-col C --caption-col C]
    mmfm data convert photos/ --to shards --out shards/ --holdout 100     # sidecar .txt captions
    mmfm data convert questions.json annotations.json --image-dir val2014/ --to shards --out vqa/
    mmfm data inspect shards/ --grid grid.png                             # exit 1 when a record is bad
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

from mmfm.data.convert import FORMATS, MANIFEST, convert
from mmfm.data.inspect import inspect, write_grid

SHOWN_BAD = 10


def register(subparsers) -> None:
    """Add the `data` command and its subcommands; each sets `args.func(args) -> exit code`."""
    parser = subparsers.add_parser("data", help="convert datasets to webdataset shards, inspect them")
    commands = parser.add_subparsers(dest="data_command", required=True)

    conv = commands.add_parser("convert", help="a CSV/TSV, folder or annotation JSON → shards or ALBEF JSON")
    conv.add_argument("sources", nargs="+", metavar="SRC",
                      help="CSV/TSV, media folder, or annotation JSON(s); VQAv2: questions then annotations")
    conv.add_argument("--out", type=Path, required=True, help="output folder")
    conv.add_argument("--to", choices=("shards", "json"), default="shards",
                      help="webdataset shards (default) or OUT/annotations.json")
    conv.add_argument("--format", choices=FORMATS, help="source format (default: detected from SRC)")
    conv.add_argument("--image-col", default="image",
                      help="CSV/TSV media column (default: image, else filepath)")
    conv.add_argument("--caption-col", default="caption", help="CSV/TSV caption column (default: caption)")
    conv.add_argument("--root", "--image-dir", "--video-dir", dest="root", type=Path,
                      help="where relative media paths start (default: the folder of the SRC file)")
    conv.add_argument("--split", help="karpathy JSON: keep these splits, comma-separated (train,restval)")
    conv.add_argument("--holdout", type=int, default=0, metavar="N",
                      help="write N media (seeded choice) to OUT/holdout.json (and their questions to "
                           "OUT/holdout_vqa.json) instead, for evaluation")
    conv.add_argument("--seed", type=int, default=0, help="seed of the --holdout choice (default 0)")
    conv.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    conv.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="processes reading, checking and writing (default: all cores)")
    # SUPPRESS: an absent flag must not reset `mmfm --quiet data convert ...`
    conv.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    conv.set_defaults(func=cmd_convert)

    insp = commands.add_parser("inspect", help="counts, examples and bad records of shards or an ALBEF JSON")
    insp.add_argument("path", help="shard folder, .tar, brace pattern DIR/{00000..00003}.tar, or ALBEF JSON")
    insp.add_argument("--examples", type=int, default=3, help="samples to print (default 3)")
    insp.add_argument("--grid", type=Path, metavar="FILE.png", help="also draw 12 samples with captions")
    insp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    insp.set_defaults(func=cmd_inspect)


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert, then say what was written, skipped, held out and found bad."""
    summary = convert(args.sources, args.out, to=args.to, fmt=args.format, holdout=args.holdout,
                      seed=args.seed, shard_size=args.shard_size, workers=args.workers,
                      quiet=getattr(args, "quiet", False), root=args.root, image_col=args.image_col,
                      caption_col=args.caption_col, split=args.split)
    if args.to == "shards":
        skipped = f" (skipped {summary['skipped']} finished shards)" if summary["skipped"] else ""
        print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {args.out}{skipped}")
    else:
        print(f"wrote {summary['samples']} entries to {args.out / 'annotations.json'}")
    if summary["held_out"]:
        files = [str(args.out / name) for name in ("holdout.json", "holdout_vqa.json") if (args.out / name).exists()]
        print(f"held out {summary['held_out']} media in {' and '.join(files)}")
    if summary["answers"]:
        print(f"wrote the {summary['answers']} most frequent answers to {args.out / 'answer_list.json'}")
    listed = f" (all listed in {args.out / MANIFEST})" if args.to == "shards" else ""
    _print_bad(summary["bad"], listed)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the report; exit 1 when something is bad."""
    report = inspect(args.path, args.examples, getattr(args, "quiet", False), grid=12 if args.grid else 0)
    media = ", ".join(f"{ext} {n}" for ext, n in sorted(report["media"].items())) or "no media"
    shards = f"{report['shards']} shards, " if report["shards"] else ""
    print(f"{args.path}: {shards}{report['samples']} samples ({media}), "
          f"{report['with_questions']} with questions")
    if report["manifest"]:
        manifest = report["manifest"]
        print(f"manifest: {manifest.get('samples')} samples in {len(manifest.get('shards', []))} shards, "
              f"{len(manifest.get('bad', []))} bad records skipped at convert time")
    for sample in report["examples"]:
        print(f"  {sample['key']}  {_first(sample['captions'])}{_qa(sample['questions'])}")
    if args.grid:
        write_grid(report["grid"], args.grid)
        print(f"grid of {len(report['grid'])} samples written to {args.grid}")
    _print_bad(report["bad"])
    return 1 if report["bad"] else 0


def _print_bad(bad: list[dict], where: str = "") -> None:
    if not bad:
        return
    kinds = Counter(b["reason"].split(" (")[0].split(";")[0] for b in bad)
    counts = "; ".join(f"{n}x {reason}" for reason, n in kinds.most_common())
    print(f"{len(bad)} bad records{where}: {counts}")
    for record in bad[:SHOWN_BAD]:
        print(f"  {record['source']}: {record['reason']}")
    if len(bad) > SHOWN_BAD:
        print(f"  ... and {len(bad) - SHOWN_BAD} more")


def _first(captions: list[str]) -> str:
    return repr(captions[0]) if captions else "(no caption)"


def _qa(questions: list[dict]) -> str:
    if not questions:
        return ""
    first = questions[0]
    answer = first.get("answer") or [""]
    more = f" (+{len(questions) - 1} more)" if len(questions) > 1 else ""
    return f"  Q: {first.get('question')} A: {answer[0]}{more}"
