"""Train an mmfm model from a YAML config: the shell of `mmfm train` (same arguments).

    python tools/train.py --config configs/demo_shapes.yaml --output runs/demo [key.sub=value ...]

Runs the same under `accelerate launch` and `torchrun` (see docs/training.md for multi-process recipes).
Writes OUTPUT/config.yaml (resolved), checkpoints/, model.safetensors, metrics.json, history.jsonl,
curves.png and TensorBoard logs. `--resume latest` continues a killed run exactly where it stopped.
"""

import sys

from mmfm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
