"""The `mmfm` console script. Each area registers its own subcommands; user errors become one line, exit 2."""

import argparse
import importlib
import sys

from mmfm.errors import MmfmError

COMMAND_MODULES = ("mmfm.run", "mmfm.data.cli", "mmfm.zoo.cli", "mmfm.inference.cli", "mmfm.inference.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfm", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MmfmError as err:
        print(f"mmfm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmfm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
