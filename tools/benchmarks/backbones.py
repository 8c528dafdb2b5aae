"""Vision backbones: parameters and inference speed, optionally ShapesWorld retrieval after a short pretraining.

    python tools/bench.py backbones --json runs/bench/backbones.json
    python tools/bench.py backbones --pretrain-seconds 300 --data-root data/shapes --json F

Per backbone at its default resolution (timm ``pretrained_cfg['input_size']``; ``--size`` overrides):
``params`` (the whole timm model, head included), ``images_per_s`` (eval-mode forward, batch 8, fp32,
``--threads`` threads, median of ``--repeats`` timed batches after one warm-up). With
``--pretrain-seconds S``: ``img_r1`` (text->image R@1 of the ITC similarity, no ITM re-ranking, on the ShapesWorld
retrieval test split) after
``tools/train.py --config configs/backbones/<name>.yaml train.max_minutes=S/60``, and the same budget
for the plain patch-embedding trunk (``patch``: the P2AT config with ``model.vision_tokenizer: patch``).
The machine's load average is recorded: concurrent load slows every figure.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import yaml

import mmfm.backbones  # noqa: F401  (registers biformer / hornet / p2at with timm)

REPO = Path(__file__).resolve().parents[2]
BACKBONES = ("crossvit_tiny_240", "tnt_s_patch16_224", "biformer_tiny", "hornet_tiny_7x7", "p2at_small")
BASELINE = "patch"


def add_arguments(parser):
    parser.add_argument("--models", nargs="+", default=list(BACKBONES), help="timm model names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches (median reported)")
    parser.add_argument("--size", type=int, default=0, help="input side for every model (0 = its default)")
    parser.add_argument("--pretrain-seconds", type=float, default=0.0,
                        help="also pretrain each backbone on ShapesWorld this long and report img_r1")
    parser.add_argument("--data-root", default="data/shapes", help="ShapesWorld root for --pretrain-seconds")
    parser.add_argument("--output", default=None, help="run directories for --pretrain-seconds (default: temp)")


def default_size(model: torch.nn.Module) -> tuple[int, int]:
    return tuple(model.pretrained_cfg["input_size"][-2:])


@torch.no_grad()
def images_per_second(model: torch.nn.Module, size: tuple[int, int], batch: int, repeats: int) -> float:
    """Eval-mode forward throughput: one warm-up batch, then the median of ``repeats`` timed batches."""
    model.eval()
    pixels = torch.randn(batch, 3, *size)
    model(pixels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(pixels)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def speed(name: str, args) -> dict:
    model = timm.create_model(name)
    size = (args.size, args.size) if args.size else default_size(model)
    return {"params": sum(p.numel() for p in model.parameters()), "input_size": list(size),
            "images_per_s": round(images_per_second(model, size, args.batch, args.repeats), 2)}


def baseline_config(output: Path) -> Path:
    """The last backbone's config with the plain ``patch`` tokenizer instead: same trunk, data and budget."""
    data = yaml.safe_load((REPO / "configs" / "backbones" / f"{BACKBONES[-1]}.yaml").read_text())
    data["model"] = {"arch": "mmfm-small", "vision_tokenizer": BASELINE}
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{BASELINE}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pretrain_r1(name: str, args, output: Path) -> dict:
    """``tools/train.py`` on ``configs/backbones/<name>.yaml`` for the budget; img_r1 and steps done."""
    config = baseline_config(output) if name == BASELINE else REPO / "configs" / "backbones" / f"{name}.yaml"
    overrides = [f"data.root={args.data_root}", f"train.max_minutes={args.pretrain_seconds / 60}",
                 f"train.threads={args.threads}", "eval.k_test=0"]
    run_dir = output / name
    subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--config", str(config), "--output",
                    str(run_dir), "--quiet", *overrides], check=True, cwd=REPO)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"img_r1": metrics.get("img_r1"), "pretrain_steps": metrics.get("steps")}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    results = {"batch": args.batch, "threads": args.threads, "dtype": "float32",
               "load_avg_start": [round(x, 2) for x in os.getloadavg()], "models": {}}
    for name in args.models:
        results["models"][name] = speed(name, args)
    if args.pretrain_seconds > 0:
        output = Path(args.output or tempfile.mkdtemp(prefix="bench_backbones_"))
        results["pretrain_seconds"] = args.pretrain_seconds
        for name in [BASELINE, *args.models]:
            results["models"].setdefault(name, {}).update(pretrain_r1(name, args, output))
    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return results
