"""Evaluate a trained model: `python tools/eval.py --checkpoint RUN_DIR --config CFG --output DIR [overrides]`.

Writes DIR/metrics.json with the same keys as training's final evaluation.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmfm.config import load_config
from mmfm.errors import MmfmError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="run directory or model.safetensors")
    parser.add_argument("--config", required=True, help="YAML config whose data/eval blocks to use")
    parser.add_argument("--output", required=True, help="directory for metrics.json")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k_test=32")
    args = parser.parse_args(argv)
    try:
        from mmfm.factory import (
            evaluate,
            evaluate_segmentation,
            load_checkpoint_model,
            load_segmentation_model,
            write_metrics,
        )

        cfg = load_config(args.config, args.overrides)
        segmentation = cfg.task == "segmentation"
        model = (load_segmentation_model if segmentation else load_checkpoint_model)(args.checkpoint)
        start = time.perf_counter()
        metrics = (evaluate_segmentation if segmentation else evaluate)(model, cfg, quiet=args.quiet)
        metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        write_metrics(output / "metrics.json", metrics)
    except MmfmError as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 2
    print({k: v for k, v in metrics.items() if "/" not in k})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
