"""`mmfm zoo ...`: list, inspect, download, verify, clear and publish model-zoo checkpoints."""

from __future__ import annotations

import argparse
import json

import yaml

from mmfm import zoo
from mmfm.zoo.manifest import find_entry, load_manifest
from mmfm.zoo.publish import MAX_SIZE_MB


def register(subparsers) -> None:
    """Add the `zoo` command and its subcommands; each sets `args.func(args) -> exit code`."""
    parser = subparsers.add_parser("zoo", help="model zoo: list, download, verify, publish checkpoints")
    commands = parser.add_subparsers(dest="zoo_command", required=True)

    commands.add_parser("list", help="names, tasks, sizes, cache state").set_defaults(func=cmd_list)

    info = commands.add_parser("info", help="the manifest entry of one model")
    info.add_argument("name")
    info.set_defaults(func=cmd_info)

    download = commands.add_parser("download", help="download and verify one model's weights")
    download.add_argument("name")
    download.add_argument("--tag", help="pick the entry of NAME carrying this tag")
    download.add_argument("--timeout", type=float, help="seconds to wait for a server (default 30)")
    download.set_defaults(func=cmd_download)

    verify = commands.add_parser("verify", help="re-hash cached files: OK / CORRUPT / missing")
    verify.add_argument("name", nargs="?", help="one model (default: every model)")
    verify.set_defaults(func=cmd_verify)

    clear = commands.add_parser("clear", help="delete cached files of one model (default: all)")
    clear.add_argument("name", nargs="?")
    clear.set_defaults(func=cmd_clear)

    publish = commands.add_parser("publish", help="add a trained run directory to the zoo")
    publish.add_argument("run_dir")
    publish.add_argument("--name", required=True)
    publish.add_argument("--zoo-dir", help="folder of models.yaml and the weights (default: the manifest's)")
    publish.add_argument("--base-url", help="URL folder the weights will be served from (listed first)")
    publish.add_argument(
        "--hf-repo", metavar="ORG/REPO", help="Hugging Face Hub mirror, listed after the file: copy"
    )
    publish.add_argument("--half", action="store_true", help="store floating-point tensors as float16")
    publish.add_argument(
        "--max-size-mb",
        type=float,
        default=MAX_SIZE_MB,
        help=f"refuse a weights file over this many MB, 10^6 bytes (default {MAX_SIZE_MB:g})",
    )
    publish.add_argument(
        "--train-command", help="how it was trained (default: tools/train.py --config RUN_DIR/config.yaml)"
    )
    publish.add_argument("--budget", help="training budget, e.g. '3000 steps, 20 min'")
    publish.add_argument("--hardware", help="what it trained on, e.g. '2 CPU cores'")
    publish.add_argument("--description", default="")
    publish.add_argument("--license", default="apache-2.0")
    publish.add_argument(
        "--task", action="append", dest="tasks", metavar="TASK", help="repeatable (default: train.tasks)"
    )
    publish.add_argument("--tag", action="append", default=[], dest="tags", help="repeatable")
    publish.add_argument("--overwrite", action="store_true", help="replace an entry of the same name")
    publish.set_defaults(func=cmd_publish)


def cmd_list(args: argparse.Namespace) -> int:
    """One line per entry: name, tasks (comma-joined), size, whether it is cached."""
    for entry in load_manifest():
        cached = "cached" if zoo.cache_path(entry).exists() else "-"
        tasks = ",".join(entry.tasks)
        print(f"{entry.name:<32} {tasks:<24} {_human_size(entry.weights.size):>9}  {cached}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """The entry as YAML."""
    print(yaml.safe_dump(zoo.info(args.name), sort_keys=False).rstrip())
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Download (or find in the cache) and print the local path."""
    print(zoo.resolve(args.name, args.tag, quiet=getattr(args, "quiet", False), timeout=args.timeout))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash cached files; exit 1 when one is corrupt."""
    entries = [find_entry(args.name)] if args.name else load_manifest()
    corrupt = False
    for entry in entries:
        for role, path, status in zoo.verify_entry(entry):
            print(f"{status:<8} {entry.name} {role} {path}")
            corrupt |= status == "CORRUPT"
    if corrupt:
        print("re-fetch corrupt files with `mmfm zoo download NAME`")
    return 1 if corrupt else 0


def cmd_clear(args: argparse.Namespace) -> int:
    """Delete cached files and say what went."""
    if args.name:
        find_entry(args.name)
    removed = zoo.clear_cache(args.name)
    for folder in removed:
        print(f"removed {folder}")
    if not removed:
        print(f"nothing cached under {zoo.mmfm_home() / 'hub'}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish a run directory and print the new entry."""
    entry = zoo.publish(
        args.run_dir,
        args.name,
        args.zoo_dir,
        description=args.description,
        license=args.license,
        tasks=args.tasks,
        tags=args.tags,
        base_url=args.base_url,
        hf_repo=args.hf_repo,
        half=args.half,
        max_size_mb=args.max_size_mb,
        train_command=args.train_command,
        budget=args.budget,
        hardware=args.hardware,
        overwrite=args.overwrite,
    )
    print(json.dumps(entry, indent=2))
    print("regenerate the zoo table with `python tools/make_zoo_readme.py`")
    return 0


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
