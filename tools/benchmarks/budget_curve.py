"""Demo figures against the training budget: `python tools/bench.py budget_curve --runs DIR... [--png F]`.

Each run directory written by tools/train.py is one point: its training time (`train_seconds`) in minutes
against its test-split metrics, one line per model kind (fused, or contrastive-only when
`model.fusion_layer` equals `model.depth`). The PNG draws the demo targets of issue #4 as dashed lines.
"""

import json
from pathlib import Path

from mmfm.config import model_config

TARGETS = {"img_r1": 85, "binding_acc": 97, "vqa_acc": 90, "videoqa_acc": 85, "vid_r1": 70}


def add_arguments(parser):
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run directories of tools/train.py")
    parser.add_argument("--png", type=Path, help="also draw the curves here")


def _read(run: Path, name: str):
    import yaml

    path = run / name
    if not path.exists():
        raise SystemExit(f"budget_curve: {path} does not exist; pass run directories written by tools/train.py")
    return yaml.safe_load(path.read_text()) if name.endswith(".yaml") else json.loads(path.read_text())


def budget_points(runs: list[Path]) -> dict[str, list[dict]]:
    """{model kind: [{run, minutes, metric: value, ...}] sorted by minutes}."""
    series: dict[str, list[dict]] = {}
    for run in runs:
        model, metrics = _read(run, "config.yaml")["model"], _read(run, "metrics.json")
        kind = "fused" if model_config(model, presets=False).fuses else "contrastive-only"
        point = {"run": str(run), "minutes": round(metrics["train_seconds"] / 60, 1)}
        point.update({name: metrics[name] for name in TARGETS if name in metrics})
        series.setdefault(kind, []).append(point)
    for points in series.values():
        points.sort(key=lambda p: p["minutes"])
    return series


def plot(series: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(3.2 * len(TARGETS), 3.2))
    for ax, (name, target) in zip(axes, TARGETS.items()):
        for kind, points in series.items():
            points = [p for p in points if name in p]
            if points:
                ax.plot([p["minutes"] for p in points], [p[name] for p in points], "o-", label=kind)
        ax.axhline(target, color="gray", linestyle="--", label="target")
        ax.set_title(name)
        ax.set_xlabel("training minutes")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args) -> dict:
    series = budget_points(args.runs)
    if args.png:
        plot(series, args.png)
    return series
