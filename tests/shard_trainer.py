"""Train a do-nothing objective on a shard stream through mmfm's Trainer and record every batch's keys.

    python tests/shard_trainer.py SHARDS OUTPUT --steps N --workers W [--mode epoch] [--resume latest]
    (or under `torch.distributed.run --nproc_per_node 2`)

OUTPUT/keys_rank{R}.jsonl gets one line per optimizer step: {"step", "keys"}. A resumed run first drops the
lines after its checkpoint's step, so the file reads like the one of an uninterrupted run.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from mmfm.config import TrainConfig
from mmfm.data.collate import make_collate
from mmfm.data.shards import CaptionDecoder, MediaReader, ShardSource, ShardStream, expand_shards
from mmfm.data.transforms import train_transform
from mmfm.engine.checkpoint import read_train_state, resolve_resume
from mmfm.engine.trainer import Objective, Stream, Trainer, make_accelerator


class KeyRecorder(Objective):
    def __init__(self, path: Path, step: int, pause: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.path, self.step, self.pause = path, step, pause

    def forward(self, stream, batch):
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": self.step + 1, "keys": batch.get("key", []),
                                     "bad": batch["num_bad"]}) + "\n")
        return {"loss": (self.weight * batch["image"].mean()).sum()}

    def after_step(self):
        self.step += 1
        time.sleep(self.pause)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("output", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=5, help="per process")
    parser.add_argument("--mode", default="epoch")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--slow", action="store_true", help="0.1 s per step, so a test can kill the run mid-way")
    args = parser.parse_args()
    cfg = TrainConfig(max_steps=args.steps, save_every=args.save_every, keep_last=10, lr=0.0, warmup_steps=0,
                      threads=1)
    accelerator = make_accelerator(cfg)
    args.output.mkdir(parents=True, exist_ok=True)
    keys = args.output / f"keys_rank{accelerator.process_index}.jsonl"
    resume_from = resolve_resume(args.resume, args.output)
    step = read_train_state(resume_from)["step"] if resume_from else 0
    if not resume_from:
        keys.unlink(missing_ok=True)
    elif keys.exists():
        kept = [line for line in keys.read_text().splitlines() if json.loads(line)["step"] <= step]
        keys.write_text("".join(line + "\n" for line in kept))
    stream = ShardStream([ShardSource(tuple(expand_shards(args.shards)), 1.0, args.shards)],
                         CaptionDecoder(MediaReader("image"), train_transform(32)), mode=args.mode, seed=5,
                         shuffle_buffer=16)
    streams = {"image_text": Stream("image_text", stream, args.batch, make_collate(None))}
    metrics = Trainer(cfg, args.output, accelerator, quiet=True).fit(
        KeyRecorder(keys, step, 0.1 if args.slow else 0.0), streams, num_workers=args.workers, resume=args.resume)
    if accelerator.is_main_process:
        (args.output / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
