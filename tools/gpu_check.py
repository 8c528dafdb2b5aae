"""One prepared check of mmfm on a CUDA machine; writes everything it measured to one JSON file.

    python tools/gpu_check.py --json OUT.json            # on the GPU machine (tools/gpu_check.sh calls it)
    python tools/gpu_check.py --cpu-dry-run --json F     # same code paths, tiny sizes, CUDA-only parts skipped

Sections (each one recorded as {"ok": bool, ...} so that one failure never hides the others, and the JSON
is rewritten after every section so a timeout still leaves what was done):
  env          torch / CUDA / GPU / xformers versions
  equality     xformers vs SDPA vs math: padded, key-padding masked, causal, packed (max abs diff)
  train_step   a bf16 training step of the demo-size MMFM through TaskObjective on every stream
               (finite loss, finite non-zero grads), once per available backend
  video_memory torch.cuda.max_memory_allocated of ViT-S trunk inference on 224 px clips of 8/16/32/64
               frames for each backend (minus the allocation before the forward)
  throughput   trunk image forward (ViT-S/16, 224 px) vs timm, fp32 and bf16, images/s; packed vs padded texts
"""

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from mmfm.layers.attention import PackedSeqs, attention, packed_attention, xformers_available

REPO = Path(__file__).resolve().parents[1]

FULL = {"device": "cuda", "frames": [8, 16, 32, 64], "size": 224, "vit": "vit_small_patch16_224", "batch": 128,
        "demo_batch": 64, "texts": 256, "timed": 20}
DRY = {"device": "cpu", "frames": [2, 3], "size": 32, "vit": "vit_tiny_patch16_224", "batch": 2, "demo_batch": 4,
       "texts": 8, "timed": 2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU, CUDA-only parts skipped")
    return parser.parse_args(argv)


def backends(device: str) -> list[str]:
    names = ["sdpa", "math"]
    return names + ["xformers"] if device == "cuda" and xformers_available() else names


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- sections ----------------------------------------------------------------------------------------


def check_env(sizes) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "xformers": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import xformers

        info["xformers"] = xformers.__version__
        info["xformers_usable"] = xformers_available()
    except Exception as err:  # noqa: BLE001  (not installed, or built for another torch)
        info["xformers_error"] = f"{type(err).__name__}: {err}"[:300]
    info["backends_checked"] = backends(sizes["device"])
    return info


def _diff(a, b, rows=None) -> float:
    if rows is not None:
        a, b = a.transpose(1, 2)[rows], b.transpose(1, 2)[rows]
    return (a.float() - b.float()).abs().max().item()


def check_equality(sizes) -> dict:
    """Every backend against SDPA on the same inputs (fp32 and bf16 on CUDA)."""
    device = sizes["device"]
    generator = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    lengths = torch.randint(4, 78, (64,), generator=generator).tolist()
    result = {}
    for dtype in dtypes:
        q, k, v = (torch.randn(4, 6, 77, 64, generator=generator).to(device, dtype) for _ in range(3))
        keep = (torch.arange(77)[None] < torch.tensor([77, 50, 9, 1])[:, None]).to(device)
        pq, pk, pv = (torch.randn(sum(lengths), 6, 64, generator=generator).to(device, dtype) for _ in range(3))
        layout = PackedSeqs(lengths, torch.device(device))
        for name in backends(device):
            if name == "sdpa":
                continue
            tag = f"{name}_vs_sdpa_{str(dtype).split('.')[-1]}"
            result[f"{tag}_padded"] = _diff(attention(q, k, v, backend=name), attention(q, k, v, backend="sdpa"))
            result[f"{tag}_masked"] = _diff(attention(q, k, v, mask=keep, backend=name),
                                            attention(q, k, v, mask=keep, backend="sdpa"), keep)
            result[f"{tag}_causal_masked"] = _diff(attention(q, k, v, mask=keep, causal=True, backend=name),
                                                   attention(q, k, v, mask=keep, causal=True, backend="sdpa"), keep)
            result[f"{tag}_packed"] = _diff(packed_attention(pq, pk, pv, layout, backend=name),
                                            packed_attention(pq, pk, pv, layout, backend="sdpa"))
            result[f"{tag}_packed_causal"] = _diff(packed_attention(pq, pk, pv, layout, causal=True, backend=name),
                                                   packed_attention(pq, pk, pv, layout, causal=True, backend="sdpa"))
    fp32 = [v for key, v in result.items() if "float32" in key]
    bf16 = [v for key, v in result.items() if "bfloat16" in key]
    result["ok"] = all(v <= 1e-4 for v in fp32) and all(v <= 3e-2 for v in bf16)
    return result


ANSWERS = {"vqa": [f"answer {i}" for i in range(20)], "video_qa": [f"event {i}" for i in range(10)]}


def _demo_config(sizes):
    from mmfm.config import load_config

    cfg = load_config(REPO / "configs" / "demo_shapes.yaml", ["objective.momentum=0.995", "objective.queue_size=16"])
    if sizes["device"] == "cpu":
        cfg.model.width, cfg.model.depth, cfg.model.heads, cfg.model.fusion_layer = 32, 2, 2, 1
    return cfg


def _demo_batches(model, batch_size, device):
    generator = torch.Generator().manual_seed(0)
    size, frames = model.cfg.img_size, 8 if device == "cuda" else 2
    captions = [f"a {c} circle left of a {d} square" for c, d in zip(["red", "blue", "green", "pink"] * 64,
                                                                      ["big", "small"] * 128)][:batch_size]
    ids, mask = model.tokenizer(captions)
    ids, mask = ids.to(device), mask.to(device)
    image = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    video = torch.randn(batch_size, frames, 3, size, size, generator=generator).to(device)
    pair_ids = list(range(batch_size))

    def target(count):
        return torch.rand(batch_size, count, generator=generator).round().to(device)

    return {
        "image_text": {"image": image, "text_ids": ids, "text_mask": mask, "image_id": pair_ids},
        "video_text": {"video": video, "text_ids": ids, "text_mask": mask, "video_id": pair_ids},
        "vqa": {"image": image, "question_ids": ids, "question_mask": mask,
                "target": target(len(model.answers["vqa"]))},
        "video_qa": {"video": video, "question_ids": ids, "question_mask": mask,
                     "target": target(len(model.answers["video_qa"]))},
    }


def _train_step(backend, sizes) -> dict:
    from mmfm.models.model import MMFM
    from mmfm.tasks.objective import TaskObjective

    device = sizes["device"]
    torch.manual_seed(0)
    run_cfg = _demo_config(sizes)
    cfg = run_cfg.model
    model = MMFM(cfg, ANSWERS, attention_backend=backend).to(device).train()
    batches = _demo_batches(model, sizes["demo_batch"], device)
    objective = TaskObjective(model, run_cfg.objective, list(batches), alpha_warmup_steps=1).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = {}
    synchronize(device)
    start = time.perf_counter()
    for stream, batch in batches.items():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = objective(stream, batch)
        out["loss"].backward()
        losses[stream] = {k: round(v.item(), 4) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.norm(torch.stack([g.float().norm() for g in grads])).item()
    optimizer.step()
    synchronize(device)
    finite = all(torch.isfinite(torch.tensor(v["loss"])) for v in losses.values())
    return {"ok": finite and 0 < grad_norm < float("inf"), "losses": losses, "grad_norm": grad_norm,
            "params_with_grad": len(grads), "seconds": round(time.perf_counter() - start, 2),
            "batch": sizes["demo_batch"], "width": cfg.width, "depth": cfg.depth}


def check_train_step(sizes) -> dict:
    runs = {name: _train_step(name, sizes) for name in backends(sizes["device"]) if name != "math"}
    return {"ok": all(r["ok"] for r in runs.values()), **runs}


def _vit_s_trunk(sizes, max_frames, backend):
    from mmfm.models.trunk import UnifiedTrunk

    torch.manual_seed(0)
    small = sizes["device"] == "cpu"
    return UnifiedTrunk(width=64 if small else 384, depth=2 if small else 12, num_heads=2 if small else 6,
                        img_size=sizes["size"], patch_size=16, max_frames=max_frames,
                        attention_backend=backend).to(sizes["device"]).eval()


def check_video_memory(sizes) -> dict:
    """Peak CUDA memory of one clip's forward (fp32), per backend and frame count; CPU dry run: runs only."""
    device, frames = sizes["device"], sizes["frames"]
    result = {"frames": frames, "size": sizes["size"], "dtype": "float32"}
    for name in backends(device):
        peaks, seconds = [], []
        trunk = _vit_s_trunk(sizes, max(frames), name)
        for count in frames:
            clip = torch.randn(1, count, 3, sizes["size"], sizes["size"], device=device)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if device == "cuda" else 0
            synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = trunk.run_layers(trunk.embed_video(clip), 0, trunk.depth).x
            synchronize(device)
            seconds.append(round(time.perf_counter() - start, 3))
            peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else 0
            peaks.append(round(peak / 2**20, 1))
            if not torch.isfinite(out).all():
                raise FloatingPointError(f"{name}: non-finite output at {count} frames")
            del out, clip
        result[f"peak_mib_{name}"], result[f"seconds_{name}"] = peaks, seconds
        del trunk
    result["tokens"] = [1 + n * (sizes["size"] // 16) ** 2 for n in frames]
    result["ok"] = True
    return result


def _per_second(forward, x, repeats, device) -> float:
    with torch.inference_mode():
        for _ in range(2):
            forward(x)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            forward(x)
        synchronize(device)
    return round(repeats * len(x) / (time.perf_counter() - start), 1)


def check_throughput(sizes) -> dict:
    """Images/s of the trunk vs timm (same weights), fp32 and bf16; tokens/s of packed vs padded texts."""
    import timm

    from mmfm.models.trunk import UnifiedTrunk

    device, repeats = sizes["device"], sizes["timed"]
    torch.manual_seed(0)
    vit = timm.create_model(sizes["vit"], pretrained=False, img_size=sizes["size"]).to(device).eval()
    trunks = {name: UnifiedTrunk.from_timm(vit, context_length=77, attention_backend=name).to(device).eval()
              for name in backends(device)}
    x = torch.randn(sizes["batch"], 3, sizes["size"], sizes["size"], device=device)
    result = {"model": sizes["vit"], "batch": sizes["batch"]}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for label, dtype in dtypes.items():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            result[f"timm_img_s_{label}"] = _per_second(vit.forward_features, x, repeats, device)
            for name, trunk in trunks.items():
                result[f"mmfm_{name}_img_s_{label}"] = _per_second(trunk.forward_image, x, repeats, device)
    result.update(_text_packing_throughput(trunks, sizes))
    result["ok"] = True
    return result


def _text_packing_throughput(trunks, sizes) -> dict:
    device, count = sizes["device"], sizes["texts"]
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 78, (count,), generator=generator)
    ids = torch.randint(0, 1000, (count, 77), generator=generator).to(device)
    mask = (torch.arange(77)[None] < lengths[:, None]).to(device)
    out = {}
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for name, trunk in trunks.items():
            runs = {"padded": lambda _, trunk=trunk: trunk.unimodal(trunk.embed_text(ids, mask)).x,
                    "packed": lambda _, trunk=trunk: trunk.unimodal(trunk.embed_texts_packed(ids, mask)).x}
            for layout, forward in runs.items():
                out[f"texts_s_{layout}_{name}"] = _per_second(forward, ids, sizes["timed"], device)
    return out


SECTIONS = {"equality": check_equality, "train_step": check_train_step, "video_memory": check_video_memory,
            "throughput": check_throughput}


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = DRY if args.cpu_dry_run else FULL
    if sizes["device"] == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; use --cpu-dry-run", file=sys.stderr)
        return 2
    report = {"mode": "cpu-dry-run" if args.cpu_dry_run else "cuda", "env": check_env(sizes)}
    print(json.dumps(report["env"]), flush=True)
    for name, section in SECTIONS.items():
        start = time.perf_counter()
        try:
            report[name] = section(sizes)
        except Exception as err:  # noqa: BLE001  (record it, run the other sections)
            report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()[-3000:]}
        report[name]["section_seconds"] = round(time.perf_counter() - start, 1)
        print(f"gpu_check: {name}: ok={report[name]['ok']} ({report[name]['section_seconds']} s)", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    report["ok"] = all(report[name]["ok"] for name in SECTIONS)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: all ok={report['ok']}; wrote {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
