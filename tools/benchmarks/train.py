"""Training throughput of the demo model vs the fp32 matmul peak measured in the same run.

`python tools/bench.py train --json F` -> samples_per_s, gflops, peak_gflops, peak_fraction.
FLOPs of one optimizer step are counted with torch's FlopCounterMode (matmuls and attention, forward
and backward, the momentum encoder included when the config has one); the batch is synthetic so data
loading is not timed, and carries caption negatives and questions when the config's data block asks
for them.
"""

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmfm.config import load_config
from mmfm.engine.trainer import make_optimizer
from mmfm.models.model import MMFM
from mmfm.tasks.objective import TaskObjective


def add_arguments(parser):
    parser.add_argument("--config", default="configs/demo_shapes.yaml")
    parser.add_argument("--stream", default="image_text", choices=["image_text", "video_text", "vqa"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def _batch(model, cfg, stream: str):
    batch_size = cfg.train.batch_size
    texts = ["a large red circle left of a small blue star and a green square"] * batch_size
    ids, mask = model.tokenizer(texts)
    pixels = torch.randn(batch_size, 3, cfg.data.image_size, cfg.data.image_size)
    if stream == "video_text":
        batch_size = cfg.train.video_batch_size or batch_size
        pixels = torch.randn(batch_size, cfg.data.num_frames, 3, cfg.data.image_size, cfg.data.image_size)
        return {"video": pixels, "text_ids": ids[:batch_size], "text_mask": mask[:batch_size],
                "video_id": torch.arange(batch_size)}
    questions = {"question_ids": ids, "question_mask": mask,
                 "target": torch.rand(batch_size, len(model.answers["vqa"]))}
    if stream == "vqa":
        return {"image": pixels, **questions}
    batch = {"image": pixels, "text_ids": ids, "text_mask": mask, "image_id": torch.arange(batch_size)}
    if cfg.data.negative_words:  # the config's caption negatives: one re-bound twin per caption
        batch.update(negative_text_ids=ids, negative_text_mask=mask,
                     has_negative=torch.ones(batch_size, dtype=torch.bool))
    if cfg.data.qa_with_captions:
        batch.update(questions, has_question=torch.ones(batch_size, dtype=torch.bool))
    return batch


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    model = MMFM(cfg.model, answers={"vqa": [str(i) for i in range(32)]})
    objective = TaskObjective(model, cfg.objective, [args.stream], 100)
    optimizer = make_optimizer(objective, cfg.train, torch.device("cpu"))
    batch = _batch(model, cfg, args.stream)

    def step():
        losses = objective(args.stream, batch)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    peak_before = matmul_peak_gflops()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    peak = max(peak_before, matmul_peak_gflops())
    samples = len(batch["text_ids"] if "text_ids" in batch else batch["question_ids"])
    gflops = flops / seconds / 1e9
    return {"stream": args.stream, "batch": samples, "threads": args.threads, "step_seconds": round(seconds, 4),
            "samples_per_s": round(samples / seconds, 1), "gflop_per_step": round(flops / 1e9, 2),
            "gflops": round(gflops, 1), "peak_gflops": round(peak, 1), "peak_fraction": round(gflops / peak, 3)}
