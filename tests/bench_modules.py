"""Import a benchmark of tools/benchmarks/ (not a package) by name, for the tests of its functions."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "tools" / "benchmarks"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
