"""Packed vs padded texts through the trunk's unimodal layers.

`python tools/bench.py packing --json F [--batch 64 --max-len 77 --repeats 5 --threads 2]`

A batch of texts with lengths uniform in [4, max_len] runs through the layers of a ViT-S-sized trunk
(width 384, 6 heads, `--layers` blocks), fp32, torch.inference_mode: once padded to max_len with a
key-padding mask, once packed (`embed_texts_packed`: no padding, attention per sequence). Both sides are
timed in the same process, interleaved, after a warm-up; figures are medians. `speedup` = padded / packed
wall time; `speedup_cpu` the same from process CPU time (all threads), which concurrent load on a shared
machine disturbs far less than wall time; `max_abs_diff` compares the real tokens of both outputs.
"""

import os
import statistics
import time


def add_arguments(parser):
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=77)
    parser.add_argument("--layers", type=int, default=12, help="unimodal layers (ViT-S has 12)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def make_texts(batch: int, min_len: int, max_len: int, vocab: int, seed: int):
    """Random ids padded to max_len, and the keep-mask of the real tokens (lengths uniform in [min, max])."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)
    ids = torch.randint(0, vocab, (batch, max_len), generator=generator)
    mask = torch.arange(max_len)[None] < lengths[:, None]
    return ids, mask


def run(args) -> dict:
    import torch

    from mmfm.models.trunk import UnifiedTrunk

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    trunk = UnifiedTrunk(width=384, depth=args.layers, num_heads=6, fusion_layer=args.layers,
                         context_length=args.max_len, vocab_size=1000).eval()
    ids, mask = make_texts(args.batch, args.min_len, args.max_len, 1000, args.seed)
    sides = {
        "padded": lambda: trunk.unimodal(trunk.embed_text(ids, mask)).x[mask],
        "packed": lambda: trunk.unimodal(trunk.embed_texts_packed(ids, mask)).x,
    }
    load = os.getloadavg()[0]
    wall, cpu = {name: [] for name in sides}, {name: [] for name in sides}
    with torch.inference_mode():
        outputs = {name: side() for name, side in sides.items()}
        for _ in range(args.repeats):
            for name, side in sides.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                side()
                wall[name].append((time.perf_counter() - start) * 1000)
                cpu[name].append((time.process_time() - start_cpu) * 1000)
    ms = {name: statistics.median(values) for name, values in wall.items()}
    cpu_ms = {name: statistics.median(values) for name, values in cpu.items()}
    return {
        "batch": args.batch, "lengths": [args.min_len, args.max_len], "tokens_real": int(mask.sum()),
        "tokens_padded": mask.numel(), "distinct_lengths": len(set(mask.sum(1).tolist())),
        "layers": args.layers, "width": 384, "heads": 6, "threads": args.threads, "dtype": "float32",
        "ms_padded": round(ms["padded"], 1), "ms_packed": round(ms["packed"], 1),
        "speedup": round(ms["padded"] / ms["packed"], 3),
        "cpu_ms_padded": round(cpu_ms["padded"], 1), "cpu_ms_packed": round(cpu_ms["packed"], 1),
        "speedup_cpu": round(cpu_ms["padded"] / cpu_ms["packed"], 3),
        "max_abs_diff": (outputs["padded"] - outputs["packed"]).abs().max().item(),
        "load_avg_1m": round(load, 2),
    }
