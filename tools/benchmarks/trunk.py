"""Trunk image-only forward vs timm's VisionTransformer of identical dims and weights.

`python tools/bench.py trunk --json F [--model vit_small_patch16_224 --batch 32 --repeats 7 --threads 2]`

Both models hold the same random weights (`UnifiedTrunk.from_timm`), run fp32 under torch.inference_mode
on the same input, in the same process, interleaved (timm, mmfm, timm, mmfm, ...) after one warm-up each,
so machine load affects both sides alike. Figures: median wall time per forward; `ratio_vs_timm` =
ms_mmfm / ms_timm (target <= 1.05); `ratio_cpu` the same from process CPU time (all threads), which
concurrent load on a shared machine disturbs far less; `max_abs_diff` between the two outputs;
`load_avg_1m` at the start.
"""

import os
import statistics
import time


def add_arguments(parser):
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name (random init)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per side")
    parser.add_argument("--threads", type=int, default=2)


def _timed(forward, x) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    forward(x)
    return (time.perf_counter() - start) * 1000, (time.process_time() - start_cpu) * 1000


def run(args) -> dict:
    import timm
    import torch

    from mmfm.models.trunk import UnifiedTrunk

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vit = timm.create_model(args.model, pretrained=False, img_size=args.size).eval()
    trunk = UnifiedTrunk.from_timm(vit).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    load = os.getloadavg()[0]
    times, cpu = {"timm": [], "mmfm": []}, {"timm": [], "mmfm": []}
    sides = {"timm": vit.forward_features, "mmfm": trunk.forward_image}
    with torch.inference_mode():
        outputs = {name: forward(x) for name, forward in sides.items()}  # warm-up
        for _ in range(args.repeats):
            for name, forward in sides.items():
                wall_ms, cpu_ms = _timed(forward, x)
                times[name].append(wall_ms)
                cpu[name].append(cpu_ms)
    ms = {name: statistics.median(values) for name, values in times.items()}
    cpu_ms = {name: statistics.median(values) for name, values in cpu.items()}
    return {
        "model": args.model, "batch": args.batch, "size": args.size, "threads": args.threads, "dtype": "float32",
        "repeats": args.repeats, "ms_timm": round(ms["timm"], 1), "ms_mmfm": round(ms["mmfm"], 1),
        "ratio_vs_timm": round(ms["mmfm"] / ms["timm"], 3),
        "ratio_cpu": round(cpu_ms["mmfm"] / cpu_ms["timm"], 3),
        "max_abs_diff": (outputs["mmfm"] - outputs["timm"]).abs().max().item(),
        "ms_timm_all": [round(t, 1) for t in times["timm"]], "ms_mmfm_all": [round(t, 1) for t in times["mmfm"]],
        "load_avg_1m": round(load, 2),
    }
