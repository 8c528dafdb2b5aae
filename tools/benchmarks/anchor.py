"""The issue's reference point: a plain open_clip CLIP trained on ShapesWorld for N minutes, on these cores.

`python tools/bench.py anchor --json F [--model openclip|mmfm] [--minutes 3] [--data data/shapes]`

Both models train in the same minimal loop (in-memory uint8 images, one random caption per image, symmetric
InfoNCE, AdamW, warm-up + cosine over the wall-time budget, batch 128) and are evaluated the same way:
text->image R@1 over the 1k test images x 5 captions (`img_r1`, ITC similarity only) and binding
(true caption's similarity > colour-swapped caption's). `openclip` is open_clip's CLIP (separate causal
text tower, width 128, 4 layers); `mmfm` is the unified trunk used as a dual encoder
(`fusion_layer = depth`, shared weights for text and images). The gap between the two isolates the model
from the training engine; `tools/train.py` with `model.fusion_layer=depth` gives the engine's figure.
"""

import json
import math
import time
from pathlib import Path

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def add_arguments(parser):
    parser.add_argument("--model", choices=("openclip", "mmfm"), default="openclip")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
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
    import open_clip
    import torch.nn.functional as F
    from open_clip.model import CLIP

    vision = {"image_size": 64, "layers": 6, "width": 192, "patch_size": 8, "head_width": 64}
    text = {"context_length": 40, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4}
    model = CLIP(embed_dim=128, vision_cfg=vision, text_cfg=text)
    tokenizer = open_clip.get_tokenizer("RN50")
    return (model, lambda x: F.normalize(model.encode_image(x), dim=-1),
            lambda texts: F.normalize(model.encode_text(tokenizer(texts, context_length=40)), dim=-1),
            lambda: model.logit_scale.exp().clamp(max=100))


def _mmfm_encoders():
    from mmfm.config import ModelConfig
    from mmfm.models.model import MMFM

    model = MMFM(ModelConfig(width=192, depth=6, heads=3, fusion_layer=6))
    return (model, lambda x: model.encode_vision(x).feat,
            lambda texts: model.encode_text(*model.tokenizer(texts)).feat,
            lambda: 1 / model.temp.clamp(0.001, 0.5))


def _optimizer(model, lr: float):
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "token" not in n]
    rest = [p for p in model.parameters() if all(p is not d for d in decay)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _train(model, encode_image, encode_text, logit_scale, images, captions, args) -> tuple[int, float]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    optimizer, rng = _optimizer(model, args.lr), np.random.default_rng(args.seed)
    budget, steps, start = args.minutes * 60, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (steps + 1) / 50) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        rows = rng.choice(len(images), args.batch, replace=False)
        texts = [captions[i][rng.integers(len(captions[i]))] for i in rows]
        logits = logit_scale() * encode_image(_normalise(images[rows])) @ encode_text(texts).t()
        labels = torch.arange(len(rows))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
    return steps, time.perf_counter() - start


def _evaluate(encode_image, encode_text, root: Path) -> dict:
    import torch

    test = json.loads((root / "annotations/retrieval_test.json").read_text())
    images = torch.cat([encode_image(_normalise(_images(root, [e["image"] for e in test[i:i + 250]])))
                        for i in range(0, len(test), 250)])
    texts = [c for e in test for c in e["caption"]]
    owner = torch.tensor([i for i, e in enumerate(test) for _ in e["caption"]])
    text_feats = torch.cat([encode_text(texts[i:i + 500]) for i in range(0, len(texts), 500)])
    img_r1 = (text_feats @ images.t()).argmax(1).eq(owner).float().mean().item()
    probes = json.loads((root / "annotations/binding_test.json").read_text())
    probe_images = encode_image(_normalise(_images(root, [p["image"] for p in probes])))
    true = (probe_images * encode_text([p["caption"] for p in probes])).sum(1)
    swapped = (probe_images * encode_text([p["swapped"] for p in probes])).sum(1)
    return {"img_r1": round(100 * img_r1, 2), "binding_acc": round(100 * true.gt(swapped).float().mean().item(), 2)}


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
    model, encode_image, encode_text, logit_scale = (_openclip_encoders if args.model == "openclip"
                                                     else _mmfm_encoders)()
    steps, seconds = _train(model, encode_image, encode_text, logit_scale, images, captions, args)
    model.eval()
    with torch.no_grad():
        metrics = _evaluate(encode_image, encode_text, args.data)
    return {"model": args.model, "minutes": args.minutes, "steps": steps,
            "samples_per_s": round(steps * args.batch / seconds, 1), **metrics,
            "parameters": sum(p.numel() for p in model.parameters())}
