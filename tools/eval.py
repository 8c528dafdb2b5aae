"""Evaluate a trained model: the shell of `mmfm eval` (same arguments).

    python tools/eval.py --checkpoint RUN_DIR --config CFG --output DIR [overrides]

Writes DIR/metrics.json with the same keys as training's final evaluation.
"""

import sys

from mmfm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", *sys.argv[1:]]))
