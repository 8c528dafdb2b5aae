"""What a trained model's vision tokens know about ShapesWorld objects: linear probes on frozen features.

`python tools/bench.py vision_probe --run RUN_DIR --json F [--data data/shapes] [--probe-steps 300]
[--reference-minutes 0] [--train-scenes 4000] [--pool center|bbox]`

A diagnostic, not a product feature: it says whether a training change taught the image encoder what the
objects are, apart from whether retrieval rose. The run's model (``load_model``) encodes the first
``--train-scenes`` scenes of ``scenes_train.json`` and every scene of ``scenes_test.json``, preprocessed as
evaluation does (``eval_transform`` with the model's stored preprocessing), through its unimodal vision
layers; the residual stream is normed by ``model.trunk.norm`` and frozen. Linear probes (AdamW, batch 256,
``--probe-steps`` steps, features standardised with the train mean / std) are trained on the train
features and scored on the test ones:

* ``cls``: from the normed [CLS], multi-label "which shapes are in the scene" (6), "which colours" (8),
  "which colour-shape pairs" (48), binary cross-entropy. Per group: ``label_acc`` (every label's yes/no,
  logit > 0, over all labels and scenes: mostly negatives, so the all-"no" ``label_acc_baseline`` is given
  beside it), ``exact_set`` (the predicted set, logit > 0, is exactly the true one) and
  ``exact_set_given_count`` (the top-k labels, k = the true number, are the true set; for pairs this is
  `retrieval_errors`' ``probe_exact_set``);
* ``objects``: per object, from the normed patch tokens. ``--pool center`` (default) takes the token of
  the patch cell that contains the object's centre (row = cy // cell, col = cx // cell, token
  1 + row * grid_w + col; cell = image size / grid, the model's patch size for the ``patch`` tokenizer);
  ``--pool bbox`` averages the tokens of every cell the object's bounding box overlaps. Coordinates are
  scaled from the scene's size to the model's image size. Three linear heads (shape 6-way, colour 8-way,
  size small/large, cross-entropy) report accuracy and ``all_three`` (all three right), with
  ``*_majority`` the accuracy of always answering the train split's most common value.

With ``--reference-minutes M > 0`` it also trains, for M minutes of wall time on the same train images in
memory (no augmentation), a supervised reference of the SAME vision size from scratch: timm
``VisionTransformer(img_size, patch_size, embed_dim=width, depth=vision layers, num_heads=heads)`` with the
run's ``model.cfg`` width / heads / patch / MLP ratio and ``model.trunk.vision_depth`` layers, its class
token classified into 62 outputs (the 48 pairs + 6 shapes + 8 colours; one multi-label BCE over all of
them), batch 64, AdamW lr 1e-3 (100 warm-up steps, then a cosine to 0 over the budget), and scores its
test exact-set accuracies the same way: the number a vision-language objective should approach.

JSON: ``{"cls": {...}, "objects": {...}, "reference": {...} (with --reference-minutes > 0), "run", "data",
"train_scenes", "test_scenes", "test_objects", "pool", "grid", "seconds"}``.
"""

import json
import math
import time
from pathlib import Path

PROBE_BATCH = 256
REFERENCE_BATCH, REFERENCE_LR, REFERENCE_WARMUP = 64, 1e-3, 100
ENCODE_BATCH = 128


def add_arguments(parser):
    parser.add_argument("--run", type=Path, required=True, help="a run directory written by tools/train.py "
                        "(or a model.safetensors file)")
    parser.add_argument("--data", type=Path, help="the ShapesWorld root (default: the run's data.root, "
                        "else data/shapes)")
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--probe-lr", type=float, default=1e-2)
    parser.add_argument("--train-scenes", type=int, default=4000, help="the first N of scenes_train.json")
    parser.add_argument("--pool", choices=("center", "bbox"), default="center",
                        help="per-object tokens: the centre's patch cell, or every cell the bbox overlaps")
    parser.add_argument("--reference-minutes", type=float, default=0.0,
                        help="also train a supervised ViT of the same vision size for M minutes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0)


# ---- labels -------------------------------------------------------------------------------------------

def scene_labels(scenes: list[dict]) -> dict:
    """{"shapes": (N, 6), "colors": (N, 8), "pairs": (N, 48)} multi-hot float tensors."""
    import torch

    from mmfm.data.shapes import ALL_PAIRS, COLORS, SHAPES

    vocab = {"shapes": list(SHAPES), "colors": list(COLORS), "pairs": list(ALL_PAIRS)}
    out = {name: torch.zeros(len(scenes), len(names)) for name, names in vocab.items()}
    for row, scene in enumerate(scenes):
        for obj in scene["objects"]:
            out["shapes"][row, vocab["shapes"].index(obj["shape"])] = 1
            out["colors"][row, vocab["colors"].index(obj["color"])] = 1
            out["pairs"][row, vocab["pairs"].index((obj["color"], obj["shape"]))] = 1
    return out


def object_labels(scenes: list[dict]) -> dict:
    """{"shape", "color", "size"}: (M,) class ids of every object, scenes in order, objects in order."""
    import torch

    from mmfm.data.shapes import COLORS, SHAPES, SIZES

    names = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}
    return {key: torch.tensor([names[key].index(o[key]) for s in scenes for o in s["objects"]], dtype=torch.long)
            for key in names}


# ---- object -> patch tokens ---------------------------------------------------------------------------

def object_tokens(obj: dict, scene_size: float, image_size: int, grid: tuple[int, int],
                  pool: str = "center") -> list[int]:
    """Indices, in the (1 + N)-token vision sequence ([CLS] first, patches row-major), of the patch tokens
    that stand for ``obj``: the cell holding its centre (``center``) or every cell its bbox overlaps (``bbox``).

    ``scene_size`` is the side the scene's coordinates are in, ``image_size`` the side the model sees.
    """
    rows, cols = grid
    scale = image_size / scene_size
    cell_h, cell_w = image_size / rows, image_size / cols
    if pool == "center":
        cx, cy = (v * scale for v in obj["center"])
        row = min(rows - 1, max(0, int(cy // cell_h)))
        col = min(cols - 1, max(0, int(cx // cell_w)))
        return [1 + row * cols + col]
    if pool != "bbox":
        raise ValueError(f"pool={pool!r}: use center or bbox")
    x0, y0, x1, y1 = (v * scale for v in obj["bbox"])
    row0, row1 = max(0, int(y0 // cell_h)), min(rows - 1, math.ceil(y1 / cell_h) - 1)
    col0, col1 = max(0, int(x0 // cell_w)), min(cols - 1, math.ceil(x1 / cell_w) - 1)
    return [1 + r * cols + c for r in range(row0, row1 + 1) for c in range(col0, col1 + 1)]


# ---- frozen features ----------------------------------------------------------------------------------

def load_pixels(root: Path, scenes: list[dict], transform):
    """(N, 3, H, W) float images of ``scenes``, preprocessed by ``transform`` (an eval ImageTransform)."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)  # eval transforms draw nothing; the generator only saves a default per call
    return torch.stack([transform(Image.open(root / s["image"]).convert("RGB"), rng) for s in scenes])


def vision_grid(model) -> tuple[int, int]:
    return tuple(model.trunk.vision_tokenizer.grid_for(model.preprocess["image_size"]))


def encode_features(model, pixels, scenes: list[dict], pool: str = "center", device: str = "cpu"):
    """Normed [CLS] (N, D) and per-object pooled normed patch tokens (M, D), objects in scene order."""
    import torch

    image_size, grid = model.preprocess["image_size"], vision_grid(model)
    cls, objects = [], []
    with torch.no_grad():
        for start in range(0, len(scenes), ENCODE_BATCH):
            tokens = model.encode_vision(pixels[start:start + ENCODE_BATCH].to(device)).tokens.x
            if tokens.shape[1] != 1 + grid[0] * grid[1]:
                raise ValueError(f"vision tokens {tuple(tokens.shape)} do not match [CLS] + a {grid} grid")
            tokens = model.trunk.norm(tokens).float().cpu()
            cls.append(tokens[:, 0])
            for row, scene in enumerate(scenes[start:start + ENCODE_BATCH]):
                for obj in scene["objects"]:
                    index = object_tokens(obj, scene.get("size", image_size), image_size, grid, pool)
                    objects.append(tokens[row, index].mean(0))
    width = cls[0].shape[1] if cls else 0
    return torch.cat(cls), torch.stack(objects) if objects else torch.zeros(0, width)


# ---- probes -------------------------------------------------------------------------------------------

def train_linear(train_x, loss_fn, out_features: int, steps: int, lr: float, seed: int = 0):
    """A linear layer on standardised ``train_x`` trained by AdamW for ``steps`` batches of 256 rows;
    ``loss_fn(logits, rows)`` scores a batch. Returns a function features -> logits."""
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(train_x.shape[1], out_features)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr)
    x = (train_x - mean) / std
    for _ in range(steps):
        rows = torch.randint(len(x), (min(PROBE_BATCH, len(x)),), generator=generator)
        loss = loss_fn(layer(x[rows]), rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    layer.eval()

    def predict(features):
        with torch.no_grad():
            return layer((features - mean) / std)

    return predict


def multilabel_scores(logits, labels) -> dict:
    """label_acc, its all-"no" baseline, exact_set (logit > 0) and exact_set_given_count (top-k), in %."""
    import torch

    predicted = logits > 0
    truth = labels > 0.5
    counts = truth.sum(1)
    ranked = logits.argsort(1, descending=True)
    top_k = torch.zeros_like(truth)
    for i, k in enumerate(counts.tolist()):
        top_k[i, ranked[i, :k]] = True
    return {
        "label_acc": round(100 * predicted.eq(truth).float().mean().item(), 2),
        "label_acc_baseline": round(100 * (~truth).float().mean().item(), 2),
        "exact_set": round(100 * predicted.eq(truth).all(1).float().mean().item(), 2),
        "exact_set_given_count": round(100 * top_k.eq(truth).all(1).float().mean().item(), 2),
    }


def cls_probe(train_cls, train_scenes, test_cls, test_scenes, steps: int, lr: float, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    train_y, test_y = scene_labels(train_scenes), scene_labels(test_scenes)
    groups = list(train_y)
    target = torch.cat([train_y[g] for g in groups], 1)
    predict = train_linear(train_cls, lambda logits, rows: F.binary_cross_entropy_with_logits(logits, target[rows]),
                           target.shape[1], steps, lr, seed)
    logits = predict(test_cls).split([train_y[g].shape[1] for g in groups], 1)
    return {group: multilabel_scores(part, test_y[group]) for group, part in zip(groups, logits)}


def object_probe(train_objects, train_scenes, test_objects, test_scenes, steps: int, lr: float, seed: int = 0) -> dict:
    """Three linear heads (shape, colour, size) trained together: the heads share no parameters, so this is
    three independent probes that see the same batches."""
    import torch
    import torch.nn.functional as F

    from mmfm.data.shapes import COLORS, SHAPES, SIZES

    train_y, test_y = object_labels(train_scenes), object_labels(test_scenes)
    keys, sizes = ["shape", "color", "size"], [len(SHAPES), len(COLORS), len(SIZES)]

    def loss_fn(logits, rows):
        return sum(F.cross_entropy(part, train_y[k][rows]) for k, part in zip(keys, logits.split(sizes, 1)))

    predict = train_linear(train_objects, loss_fn, sum(sizes), steps, lr, seed)
    correct = {k: part.argmax(1).eq(test_y[k]) for k, part in zip(keys, predict(test_objects).split(sizes, 1))}
    out = {f"{k}_acc": round(100 * correct[k].float().mean().item(), 2) for k in keys}
    out["all_three_acc"] = round(100 * torch.stack(list(correct.values())).all(0).float().mean().item(), 2)
    for k, n in zip(keys, sizes):
        majority = torch.bincount(train_y[k], minlength=n).argmax()
        out[f"{k}_majority"] = round(100 * test_y[k].eq(majority).float().mean().item(), 2)
    return out


def probe(model, train_pixels, train_scenes, test_pixels, test_scenes, steps: int = 300, lr: float = 1e-2,
          pool: str = "center", device: str = "cpu", seed: int = 0) -> dict:
    """{"cls": ..., "objects": ...}: the frozen-feature probes of ``model`` (an MMFM in eval mode)."""
    train_cls, train_objects = encode_features(model, train_pixels, train_scenes, pool, device)
    test_cls, test_objects = encode_features(model, test_pixels, test_scenes, pool, device)
    return {"cls": cls_probe(train_cls, train_scenes, test_cls, test_scenes, steps, lr, seed),
            "objects": object_probe(train_objects, train_scenes, test_objects, test_scenes, steps, lr, seed)}


# ---- supervised reference -----------------------------------------------------------------------------

def reference_vit(model):
    """A from-scratch timm ViT of ``model``'s vision size with a 62-way multi-label head."""
    from timm.models.vision_transformer import VisionTransformer

    from mmfm.data.shapes import ALL_PAIRS, COLORS, SHAPES

    cfg = model.cfg
    return VisionTransformer(img_size=model.preprocess["image_size"], patch_size=cfg.patch_size,
                             embed_dim=cfg.width, depth=model.trunk.vision_depth, num_heads=cfg.heads,
                             mlp_ratio=cfg.mlp_ratio, num_classes=len(ALL_PAIRS) + len(SHAPES) + len(COLORS))


def train_reference(vit, train_pixels, train_scenes, test_pixels, test_scenes, minutes: float,
                    device: str = "cpu", seed: int = 0) -> dict:
    """Train ``vit`` for ``minutes`` of wall time on multi-label BCE, then score the test exact sets."""
    import torch
    import torch.nn.functional as F

    train_y, test_y = scene_labels(train_scenes), scene_labels(test_scenes)
    groups = ["pairs", "shapes", "colors"]
    target = torch.cat([train_y[g] for g in groups], 1)
    vit = vit.to(device).train()
    optimizer = torch.optim.AdamW(vit.parameters(), lr=REFERENCE_LR)
    generator = torch.Generator().manual_seed(seed)
    budget, steps, warmup_end, start = minutes * 60, 0, None, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        if steps == REFERENCE_WARMUP:
            warmup_end = elapsed
        if warmup_end is None:
            lr = REFERENCE_LR * (steps + 1) / REFERENCE_WARMUP
        else:
            lr = 0.5 * (1 + math.cos(math.pi * min(1.0, (elapsed - warmup_end) / max(budget - warmup_end, 1e-9))))
            lr *= REFERENCE_LR
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.randint(len(train_pixels), (min(REFERENCE_BATCH, len(train_pixels)),), generator=generator)
        loss = F.binary_cross_entropy_with_logits(vit(train_pixels[rows].to(device)), target[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    seconds = time.perf_counter() - start
    vit.eval()
    with torch.no_grad():
        logits = torch.cat([vit(test_pixels[i:i + ENCODE_BATCH].to(device)).float().cpu()
                            for i in range(0, len(test_pixels), ENCODE_BATCH)])
    parts = logits.split([train_y[g].shape[1] for g in groups], 1)
    scores = {g: multilabel_scores(part, test_y[g]) for g, part in zip(groups, parts)}
    return {**{f"{g}_exact_set": scores[g]["exact_set"] for g in groups},
            **{f"{g}_exact_set_given_count": scores[g]["exact_set_given_count"] for g in groups},
            "steps": steps, "train_seconds": round(seconds, 1), "minutes": minutes,
            "samples_per_s": round(steps * min(REFERENCE_BATCH, len(train_pixels)) / max(seconds, 1e-9), 1),
            "parameters": sum(p.numel() for p in vit.parameters()),
            "model": {"class": "timm VisionTransformer", "img_size": vit.patch_embed.img_size[0],
                      "patch_size": vit.patch_embed.patch_size[0], "embed_dim": vit.embed_dim,
                      "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads,
                      "num_classes": vit.num_classes},
            "optimizer": {"name": "AdamW", "lr": REFERENCE_LR, "batch": REFERENCE_BATCH,
                          "warmup_steps": REFERENCE_WARMUP, "cosine": "to 0 over the wall-time budget"}}


# ---- entry point --------------------------------------------------------------------------------------

def _data_root(args) -> Path:
    if args.data is not None:
        return args.data
    config = args.run / "config.yaml" if args.run.is_dir() else None
    if config is not None and config.is_file():
        from mmfm.config import load_config

        return Path(load_config(config).data.root)
    return Path("data/shapes")


def run(args) -> dict:
    import torch

    from mmfm.data.transforms import eval_transform
    from mmfm.errors import ModelError
    from mmfm.models.io import load_model

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.run)
    if not hasattr(model, "encode_vision"):
        raise ModelError(f"{args.run}: vision_probe needs an mmfm vision-language model, not {type(model).__name__}")
    model = model.to(device).eval()
    root = _data_root(args)
    annotations = root / "annotations"
    train_scenes = json.loads((annotations / "scenes_train.json").read_text())[:args.train_scenes]
    test_scenes = json.loads((annotations / "scenes_test.json").read_text())
    pre = model.preprocess
    transform = eval_transform(pre["image_size"], mean=pre["mean"], std=pre["std"])
    train_pixels, test_pixels = load_pixels(root, train_scenes, transform), load_pixels(root, test_scenes, transform)
    result = {"run": str(args.run), "data": str(root),
              **probe(model, train_pixels, train_scenes, test_pixels, test_scenes, args.probe_steps, args.probe_lr,
                      args.pool, device, args.seed)}
    if args.reference_minutes > 0:
        result["reference"] = train_reference(reference_vit(model), train_pixels, train_scenes, test_pixels,
                                              test_scenes, args.reference_minutes, device, args.seed)
    result.update({"train_scenes": len(train_scenes), "test_scenes": len(test_scenes),
                   "test_objects": sum(len(s["objects"]) for s in test_scenes), "pool": args.pool,
                   "grid": list(vision_grid(model)), "probe_steps": args.probe_steps,
                   "seconds": round(time.perf_counter() - start, 1)})
    return result
