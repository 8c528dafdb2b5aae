"""Benchmarks with JSON output: `python tools/bench.py NAME --json FILE [options]`.

Each benchmark lives in `tools/benchmarks/NAME.py` and exposes `add_arguments(parser)` and
`run(args) -> dict`. The dict is printed and, with --json, written to FILE.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def load(name: str):
    path = BENCH_DIR / f"{name}.py"
    if not path.exists():
        raise SystemExit(f"bench.py: unknown benchmark {name!r}; available: {', '.join(available())}")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\nbenchmarks: " + ", ".join(available()))
        return 0
    module = load(argv[0])
    parser = argparse.ArgumentParser(prog=f"bench.py {argv[0]}")
    parser.add_argument("--json", type=Path, help="write the result here")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    result = module.run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
