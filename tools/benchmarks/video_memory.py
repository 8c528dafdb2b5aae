"""Peak CPU memory of long-video inference through the trunk: SDPA (default) vs the explicit math backend.

`python tools/bench.py video_memory --json F [--frames 4 8 16 32 --size 224 --threads 2]`

A ViT-S-sized trunk (width 384, depth 12, 6 heads, patch 16; 196 patches per 224 px frame, so a 32-frame
clip is 6,273 tokens with CLS) embeds one clip (batch 1, fp32, torch.inference_mode, temporal rolling on)
and runs all its layers. Each (backend, frames) point runs in a fresh subprocess; the figure is the peak
resident set of the forward minus the resident set right after building the model and the input
(peak = `ru_maxrss`, baseline = VmRSS of /proc/self/status), with glibc's MALLOC_MMAP_THRESHOLD_ fixed at
128 KiB so freed blocks return to the OS (as in biformer_memory). `ratio_32_16` = peak(32) / peak(16) for
SDPA (target <= 2.3: linear in tokens, no (L x L) score matrix); the math backend shows the quadratic
contrast.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MMAP_THRESHOLD = 128 * 1024


def add_arguments(parser):
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["sdpa", "math"])


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def _worker(backend: str, frames: int, size: int, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from mmfm.models.trunk import UnifiedTrunk

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    trunk = UnifiedTrunk(width=384, depth=12, num_heads=6, img_size=size, patch_size=16,
                         max_frames=max(frames, 32), attention_backend=backend).eval()
    clip = torch.randn(1, frames, 3, size, size)
    baseline = _rss_mib()
    start = time.perf_counter()
    with torch.inference_mode():
        out = trunk.norm(trunk.run_layers(trunk.embed_video(clip), 0, trunk.depth).x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"tokens": out.shape[1], "mib": round(peak - baseline, 1), "seconds": round(seconds, 2),
            "finite": bool(torch.isfinite(out).all())}


def _measure(backend: str, frames: int, args) -> dict:
    cmd = [sys.executable, __file__, backend, str(frames), str(args.size), str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"video_memory: {backend} {frames} frames failed (rc {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    load = os.getloadavg()[0]
    runs = {b: [_measure(b, n, args) for n in args.frames] for b in args.backends}
    result = {"frames": args.frames, "tokens": [r["tokens"] for r in runs[args.backends[0]]],
              "size": args.size, "threads": args.threads, "dims": "ViT-S (384 wide, 12 deep, 6 heads, patch 16)"}
    for backend, points in runs.items():
        suffix = "" if backend == "sdpa" else f"_{backend}"
        result[f"peak_mib{suffix}"] = [p["mib"] for p in points]
        result[f"seconds{suffix}"] = [p["seconds"] for p in points]
        assert all(p["finite"] for p in points), f"{backend}: non-finite output"
    if "sdpa" in runs and {16, 32} <= set(args.frames):
        peaks = dict(zip(args.frames, result["peak_mib"]))
        result["ratio_32_16"] = round(peaks[32] / peaks[16], 3)
    result["load_avg_1m"] = round(load, 2)
    result["malloc_mmap_threshold"] = MMAP_THRESHOLD
    return result


if __name__ == "__main__":
    name, count, side, threads = sys.argv[1:]
    print(json.dumps(_worker(name, int(count), int(side), int(threads))))
