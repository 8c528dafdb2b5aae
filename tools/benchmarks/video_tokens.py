"""Long video through the trunk: C-ViViT tokens vs per-frame patches, one training step's memory and time.

`python tools/bench.py video_tokens --json F [--frames 64 --fit-frames 65 129 257 513 --repeats 3 --threads 2]`

The trunk is the demo's (`mmfm-demo`: width 96, depth 5, vision through all 5 layers, temporal rolling on) at
64 px, batch 1, fp32. Per-frame patches: the `patch` tokenizer, 8 x 8 px, 64 tokens per frame. C-ViViT: the
`cvivit` tokenizer with the architecture of configs/tokenizer_cvivit.yaml, frozen, `use: latents`, untrained
(memory and time do not depend on the weights): 1 + 4k frames give 1 + k token-frames of 64 tokens, so at
64 frames it takes 65 (1 + 4*16, one frame more than the patch side). One step = encode_vision, a loss on the
ITC feature, backward, gradients dropped (`set_to_none`, as the Trainer does); the optimizer update is left out
(its state does not grow with the clip). Every point runs in a fresh subprocess: a warm-up step (it pays the
one-off costs, thread pools and oneDNN kernels, ~20 MiB that a cold baseline would count as step memory),
then the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`) and `--steps` timed steps run; memory =
that peak (VmHWM) minus the resident set before them, time = their median. glibc's MALLOC_MMAP_THRESHOLD_
is 128 KiB so freed blocks go back to the OS (as video_memory).

`mem_ratio_64f` / `time_ratio_64f`: C-ViViT over patches at `--frames`, medians of `--repeats` interleaved
pairs (targets <= 0.35). `max_frames_fit`: the longest clip of `--fit-frames` whose C-ViViT step completes
with a peak resident set under `--budget-gib` (target: 256 frames; 257 = 1 + 4*64 is the clip tried).
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MMAP_THRESHOLD = 128 * 1024
TUBELET = 4


def add_arguments(parser):
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--fit-frames", type=int, nargs="+", default=[65, 129, 257, 513])
    parser.add_argument("--budget-gib", type=float, default=8.0, help="peak resident set a step may use")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "configs" / "tokenizer_cvivit.yaml"),
                        help="the C-ViViT architecture: this config's model block")


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not found in /proc/self/status (Linux only)")


def _step(model, clip) -> tuple[float, object]:
    start = time.perf_counter()
    encoded = model.encode_vision(clip)
    encoded.feat.pow(2).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, encoded


def _worker(tokenizer: str, frames: int, threads: int, steps: int, config: str) -> dict:
    """One measurement in this (fresh) process."""
    import dataclasses

    import torch

    import mmfm
    from mmfm.config import load_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kwargs = {}
    if tokenizer == "cvivit":
        kwargs = {"arch": dataclasses.asdict(load_config(config).model), "frozen": True, "use": "latents"}
    token_frames = 1 + (frames - 1) // TUBELET if tokenizer == "cvivit" else frames
    model = mmfm.create_model("mmfm-demo", vision_tokenizer=tokenizer, vision_tokenizer_kwargs=kwargs,
                              max_frames=token_frames, attention_backend="sdpa").train()
    clip = torch.randn(1, frames, 3, 64, 64)
    _step(model, clip)
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set (VmHWM) restarts from here
    baseline = _status_mib("VmRSS")
    seconds, encoded = zip(*(_step(model, clip) for _ in range(steps)))
    peak = _status_mib("VmHWM")
    return {"tokens": encoded[0].tokens.x.shape[1], "mib": round(peak - baseline, 1), "peak_mib": round(peak, 1),
            "seconds": round(statistics.median(seconds), 3), "finite": bool(torch.isfinite(encoded[0].feat).all())}


def _measure(tokenizer: str, frames: int, args) -> dict | None:
    """The worker's result, or None when the step did not complete (killed, out of memory)."""
    cmd = [sys.executable, __file__, tokenizer, str(frames), str(args.threads), str(args.steps), args.config]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    if proc.returncode:
        print(f"video_tokens: {tokenizer} {frames} frames failed (rc {proc.returncode}): {proc.stderr[-800:]}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _required(result: dict | None, what: str) -> dict:
    if result is None:
        raise RuntimeError(f"video_tokens: the {what} step failed; see the error above")
    assert result["finite"], f"{what}: non-finite output"
    return result


def run(args) -> dict:
    load = os.getloadavg()[0]
    cvivit_frames = 1 + TUBELET * math.ceil((args.frames - 1) / TUBELET)  # 64 -> 65
    pairs = [(_required(_measure("patch", args.frames, args), "patch"),
              _required(_measure("cvivit", cvivit_frames, args), "cvivit")) for _ in range(args.repeats)]
    patch, cvivit = ({key: statistics.median(p[side][key] for p in pairs) for key in ("mib", "seconds")}
                     for side in (0, 1))
    fits = {}
    for frames in sorted(args.fit_frames):
        result = _measure("cvivit", frames, args)
        fits[frames] = result if result and result["peak_mib"] <= args.budget_gib * 1024 else None
    fitting = [frames for frames, result in fits.items() if result is not None]
    tag = f"{args.frames}f"
    return {
        "frames": args.frames, "cvivit_frames": cvivit_frames, "size": 64, "threads": args.threads,
        "tokens": {"patch": pairs[0][0]["tokens"], "cvivit": pairs[0][1]["tokens"]},
        f"patch_mib_{tag}": patch["mib"], f"cvivit_mib_{tag}": cvivit["mib"],
        f"patch_seconds_{tag}": patch["seconds"], f"cvivit_seconds_{tag}": cvivit["seconds"],
        f"mem_ratio_{tag}": round(cvivit["mib"] / patch["mib"], 3),
        f"time_ratio_{tag}": round(cvivit["seconds"] / patch["seconds"], 3),
        "max_frames_fit": max(fitting, default=0),
        "fit": {str(f): r and {k: r[k] for k in ("tokens", "mib", "peak_mib", "seconds")} for f, r in fits.items()},
        "budget_gib": args.budget_gib, "repeats": args.repeats, "steps": args.steps,
        "dims": "trunk mmfm-demo (96 wide, 5 deep); per-frame patches 8x8; C-ViViT of --config, frozen, latents",
        "load_avg_1m": round(load, 2), "malloc_mmap_threshold": MMAP_THRESHOLD,
    }


if __name__ == "__main__":
    kind, count, threads, steps, config = sys.argv[1:]
    print(json.dumps(_worker(kind, int(count), int(threads), int(steps), config)))
