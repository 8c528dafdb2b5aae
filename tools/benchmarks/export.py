"""Export benchmark: onnxruntime vs eager PyTorch latency of each exported part, and their parity.

    python tools/bench.py export --json out.json [--model mmfm-shapes-s] [--data data/shapes] [--runs 20]
                                 [--threads 2] [--attention math|sdpa]

Every part of ``--model`` is exported to ONNX (`mmfm.inference.export`, attention backend ``--attention``)
and run at batch 1 and 32 on real ShapesWorld inputs: images of ``--data`` preprocessed as the pipeline
does, their captions, and for fusion the eager text and vision tokens of those pairs. Eager is the same
computation on the model as `mmfm.load` gives it (its own attention backend). ``ort_ms`` / ``eager_ms``:
median of ``--runs`` runs after two warm-up runs, torch and onnxruntime pinned to ``--threads`` intra-op
threads. ``max_abs_diff``: the largest difference of the part's features / logits over both batches
(``max_abs_diff_tokens``: of the unimodal tokens); ``nodes``: ONNX graph size.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

BATCHES = (1, 32)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="mmfm-shapes-s", help="zoo name, run directory or .safetensors file")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"),
                        help="a ShapesWorld corpus (python tools/make_data.py shapes --out data/shapes)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="math", help="attention backend the parts are exported with")


def run(args) -> dict:
    import onnx
    import onnxruntime as ort

    from mmfm.inference.export import build_towers, export_model
    from mmfm.inference.pipeline import load

    torch.set_num_threads(args.threads)
    pipe = load(args.model, device="cpu")
    eager = build_towers(pipe.model, attention_backend="auto")   # as mmfm.load builds it: SDPA on CPU
    inputs = _inputs(pipe, args.data, max(BATCHES))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    result = {"config": {"model": args.model, "attention": args.attention, "threads": args.threads,
                         "runs": args.runs, "batches": list(BATCHES), "torch": torch.__version__,
                         "onnxruntime": ort.__version__}}
    with tempfile.TemporaryDirectory() as out:
        for part, tower in eager.items():
            start = time.perf_counter()
            path, = export_model(pipe.model, part, out, "onnx", attention_backend=args.attention)
            export_s = time.perf_counter() - start
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            stats = _compare(tower, session, inputs[part], args.runs)
            stats.update(export_s=round(export_s, 2), nodes=len(onnx.load(str(path)).graph.node))
            result[part] = stats
    one, five, _ = os.getloadavg()
    result["machine"] = {"load_1m": round(one, 2), "load_5m": round(five, 2), "cpus": os.cpu_count()}
    return result


@torch.inference_mode()
def _inputs(pipe, root: Path, count: int) -> dict[str, tuple]:
    """Per part: the input tensors of ``count`` real (image, caption) pairs of the corpus at ``root``."""
    annotations = root / "annotations" / "pretrain.json"
    if not annotations.exists():
        raise SystemExit(f"bench.py export: {annotations} not found; generate the corpus with "
                         f"`python tools/make_data.py shapes --out {root}` or pass --data")
    pairs = {}
    for entry in json.loads(annotations.read_text()):
        pairs.setdefault(entry["image"], entry["caption"])
        if len(pairs) == count:
            break
    pixels = torch.stack([pipe.read_image(root / image) for image in pairs])
    ids, mask = pipe.model.tokenizer(list(pairs.values()))
    text, vision = pipe.model.encode_text(ids, mask).tokens.x, pipe.model.encode_vision(pixels).tokens.x
    return {"vision": (pixels,), "text": (ids, mask.long()), "fusion": (text, mask.long(), vision)}


def _compare(tower, session, inputs: tuple, runs: int) -> dict:
    names = [i.name for i in session.get_inputs()]
    stats = {"max_abs_diff": 0.0, "ort_ms": {}, "eager_ms": {}}
    for batch in BATCHES:
        rows = tuple(x[:batch] for x in inputs)
        feeds = dict(zip(names, (x.numpy() for x in rows)))
        with torch.inference_mode():
            expected = tower(*rows)
            stats["eager_ms"][str(batch)] = _median_ms(runs, tower, *rows)
        got = session.run(None, feeds)
        stats["ort_ms"][str(batch)] = _median_ms(runs, session.run, None, feeds)
        for name, out, want in zip(tower.output_names, got, expected, strict=True):
            key = "max_abs_diff_tokens" if name == "tokens" else "max_abs_diff"
            stats[key] = max(stats.get(key, 0.0), float((torch.from_numpy(out) - want).abs().max()))
    return stats


def _median_ms(runs: int, call, *args) -> float:
    for _ in range(2):
        call(*args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)
