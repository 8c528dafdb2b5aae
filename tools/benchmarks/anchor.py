"""The issue's reference point: open_clip's own CLIP trained on ShapesWorld for N minutes, on these cores.

`python tools/bench.py anchor --json F [--model openclip|mmfm] [--minutes 3] [--data data/shapes]
[--batch 128] [--lr 5e-4] [--warmup 200] [--wd 0.2]`

The reference configuration the project must beat (`--model openclip`, the defaults):

* model: `open_clip.model.CLIP`, embed dim 128; vision tower `CLIPVisionCfg` ViT, 64-px images, patch 8,
  width 192, 6 layers, head width 64 (3 heads); text tower `CLIPTextCfg`, context length 32, width 192,
  4 layers, 3 heads (open_clip's width / 64), causal, argmax (EOT) pooling; open_clip's BPE tokenizer;
* loss: `open_clip.loss.ClipLoss` on the L2-normalised features, `logit_scale` clamped to ln 100 after
  each step (open_clip_train's habit);
* optimisation: batch 128, AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on all but gains,
  biases and `logit_scale` (open_clip_train's ViT defaults), gradient norm clipped at 1; linear warm-up over
  200 steps, then cosine to zero over what is left of the wall-time budget (open_clip_train's `cosine_lr`
  with the wall clock standing in for the step count);
* data: the pretrain images decoded once and held in memory as uint8, one random caption of each sampled
  image per step, no augmentation (ImageNet mean / std normalisation only).

Evaluation is the project's protocol: the test images of `retrieval_test.json` (1k images x 5 captions
on the full corpus; whatever it holds on a small one), ITC similarity only, `recall_metrics` (ALBEF's
itm_eval) -> `img_r1` (text->image) and `txt_r1` (image->text); `binding_acc` on `binding_test.json` (the
true caption's similarity above its colour-swapped twin's).

`--model mmfm` trains mmfm's unified trunk as a dual encoder (`fusion_layer = depth`, shared weights for
text and images; width 192, 6 layers, 3 heads, its own tokenizer at context length 40, logit scale
1 / its learned temperature, no decay on its `no_weight_decay()` set) in the same loop, with the same loss,
optimiser, schedule and evaluation. The gap between the two isolates the model from the training engine;
`tools/train.py` with `model.fusion_layer=depth` gives the engine's figure. The JSON names the exact model config used.
"""

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZE = 64
EMBED_DIM = 128
CONTEXT_LENGTH = 32
VISION = {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 192, "layers": 6, "head_width": 64}
TEXT = {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4}
BETAS, EPS, CLIP_GRAD = (0.9, 0.98), 1e-6, 1.0


def add_arguments(parser):
    parser.add_argument("--model", choices=("openclip", "mmfm"), default="openclip")
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-time training budget")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps before the cosine")
    parser.add_argument("--wd", type=float, default=0.2, help="AdamW weight decay (not on gains / biases)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def _images(root: Path, paths: list[str]):
    import numpy as np
    import torch
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(root / p).convert("RGB")) for p in paths])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def _normalise(images):
    import torch

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _openclip_encoders():
    """open_clip's CLIP of the reference configuration, its encoders, its logit scale and its config."""
    import torch.nn.functional as F
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import SimpleTokenizer

    vision_cfg, text_cfg = CLIPVisionCfg(**VISION), CLIPTextCfg(**TEXT)
    model = CLIP(embed_dim=EMBED_DIM, vision_cfg=vision_cfg, text_cfg=text_cfg)
    tokenizer = SimpleTokenizer(context_length=CONTEXT_LENGTH)

    def no_decay(name, param):  # open_clip_train/main.py's `exclude`
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    config = {"class": "open_clip.model.CLIP", "embed_dim": EMBED_DIM, "quick_gelu": False,
              "vision_cfg": asdict(vision_cfg), "text_cfg": asdict(text_cfg),
              "tokenizer": f"open_clip.tokenizer.SimpleTokenizer(context_length={CONTEXT_LENGTH})"}
    return (model, lambda x: F.normalize(model.encode_image(x), dim=-1),
            lambda texts: F.normalize(model.encode_text(tokenizer(texts)), dim=-1),
            model.logit_scale.exp, no_decay, config)


def _mmfm_encoders():
    """mmfm's unified trunk as a dual encoder, in the same loop."""
    from mmfm.config import ModelConfig
    from mmfm.models.model import MMFM

    cfg = ModelConfig(width=192, depth=6, heads=3, fusion_layer=6)
    model = MMFM(cfg)
    skip = model.no_weight_decay()
    config = {"class": "mmfm.models.model.MMFM", **asdict(cfg), "shared": "one trunk for text and images"}
    return (model, lambda x: model.encode_vision(x).feat,
            lambda texts: model.encode_text(*model.tokenizer(texts)).feat,
            lambda: 1 / model.temp.clamp(0.001, 0.5), lambda name, param: param.ndim < 2 or name in skip, config)


def _optimizer(model, no_decay, lr: float, wd: float):
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not no_decay(n, p)]
    rest = [p for n, p in named if no_decay(n, p)]
    return torch.optim.AdamW([{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}],
                             lr=lr, betas=BETAS, eps=EPS)


def learning_rate(base: float, step: int, warmup: int, elapsed: float, budget: float,
                  warmup_end: float | None) -> float:
    """open_clip_train's ``cosine_lr`` on the wall clock: linear warm-up over ``warmup`` steps, then a cosine
    from ``base`` to 0 between the moment warm-up ended (``warmup_end`` seconds) and the end of the budget."""
    if step < warmup or warmup_end is None:
        return base * (step + 1) / warmup
    progress = min(1.0, (elapsed - warmup_end) / max(budget - warmup_end, 1e-9))
    return 0.5 * (1 + math.cos(math.pi * progress)) * base


def _train(model, encode_image, encode_text, logit_scale, no_decay, images, captions, args) -> tuple[int, float]:
    import numpy as np
    import torch
    from open_clip.loss import ClipLoss

    optimizer, rng, loss_fn = _optimizer(model, no_decay, args.lr, args.wd), np.random.default_rng(args.seed), ClipLoss()
    budget, steps, warmup_end, start = args.minutes * 60, 0, None, time.perf_counter()
    batch = min(args.batch, len(images))
    model.train()
    while (elapsed := time.perf_counter() - start) < budget:
        if steps == args.warmup:
            warmup_end = elapsed
        lr = learning_rate(args.lr, steps, args.warmup, elapsed, budget, warmup_end)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = rng.choice(len(images), batch, replace=False)
        texts = [captions[i][rng.integers(len(captions[i]))] for i in rows]
        loss = loss_fn(encode_image(_normalise(images[rows])), encode_text(texts), logit_scale())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
        optimizer.step()
        if hasattr(model, "logit_scale"):
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        steps += 1
    return steps, time.perf_counter() - start


def _evaluate(encode_image, encode_text, root: Path) -> dict:
    import torch

    from mmfm.evaluation.retrieval import recall_metrics

    test = json.loads((root / "annotations/retrieval_test.json").read_text())
    images = torch.cat([encode_image(_normalise(_images(root, [e["image"] for e in test[i:i + 250]])))
                        for i in range(0, len(test), 250)])
    texts = [c for e in test for c in e["caption"]]
    txt2img = [i for i, e in enumerate(test) for _ in e["caption"]]
    img2txt, row = [], 0
    for entry in test:
        img2txt.append(list(range(row, row + len(entry["caption"]))))
        row += len(entry["caption"])
    text_feats = torch.cat([encode_text(texts[i:i + 500]) for i in range(0, len(texts), 500)])
    sim = (images @ text_feats.t()).numpy()
    recall = recall_metrics(sim, sim.T, txt2img, img2txt)
    probes = json.loads((root / "annotations/binding_test.json").read_text())
    probe_images = torch.cat([encode_image(_normalise(_images(root, [p["image"] for p in probes[i:i + 250]])))
                              for i in range(0, len(probes), 250)])
    true = (probe_images * encode_text([p["caption"] for p in probes])).sum(1)
    swapped = (probe_images * encode_text([p["swapped"] for p in probes])).sum(1)
    return {"img_r1": recall["img_r1"], "txt_r1": recall["txt_r1"], "r_mean": recall["r_mean"],
            "binding_acc": round(100 * true.gt(swapped).float().mean().item(), 2),
            "test_images": len(test), "test_captions": len(texts), "binding_pairs": len(probes)}


def run(args) -> dict:
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    entries = json.loads((args.data / "annotations/pretrain.json").read_text())
    paths = sorted({e["image"] for e in entries})
    slot = {p: i for i, p in enumerate(paths)}
    captions = [[] for _ in paths]
    for entry in entries:
        captions[slot[entry["image"]]].append(entry["caption"])
    images = _images(args.data, paths)
    model, encode_image, encode_text, logit_scale, no_decay, config = (
        _openclip_encoders if args.model == "openclip" else _mmfm_encoders)()
    steps, seconds = _train(model, encode_image, encode_text, logit_scale, no_decay, images, captions, args)
    model.eval()
    with torch.no_grad():
        metrics = _evaluate(encode_image, encode_text, args.data)
    return {"model": args.model, "minutes": args.minutes, "steps": steps, "train_seconds": round(seconds, 1),
            "samples_per_s": round(steps * min(args.batch, len(images)) / seconds, 1), **metrics,
            "parameters": sum(p.numel() for p in model.parameters()), "train_images": len(images),
            "config": {"model": config, "batch": args.batch, "loss": "open_clip.loss.ClipLoss",
                       "optimizer": {"name": "AdamW", "lr": args.lr, "betas": list(BETAS), "eps": EPS,
                                     "weight_decay": args.wd, "clip_grad_norm": CLIP_GRAD},
                       "schedule": {"warmup_steps": args.warmup, "cosine": "to 0 over the wall-time budget"},
                       "data": {"images": "in memory, uint8", "captions": "one random caption per image per step",
                                "augmentation": None, "seed": args.seed}}}
