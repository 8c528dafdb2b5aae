"""Where a trained model's ShapesWorld text->image retrieval fails, and which side is the bottleneck.

`python tools/bench.py retrieval_errors --run DIR --json F [--probe-images 12000]`

* `r1_by_objects`: ITC img_r1 by the number of objects in the true scene;
* `errors`: each wrong top-1 image compared with the true scene: another number of objects, another set of
  colour-shape pairs, the same pairs re-bound, or the same pairs at another size / position;
* `probe_exact_set`: linear probes (48 colour-shape pairs, trained on frozen ITC features of train images,
  scored on the test split) that must name a scene's exact pair set, given its number of objects, from the
  image feature and from a caption's feature. The weaker side is the one retrieval waits for;
* `rerank_img_r1` (fused models): img_r1 when each caption's ITC top-`eval.k_test` images are re-ranked by
  ITC alone, by ITM alone and by their sum (the evaluation's score), with the share of captions whose true
  image is among the candidates: what the fusion layers add over the unimodal features.

With `--grid PNG` it also draws the ITC top-5 images of 8 test captions (the first images' captions, one
template each, not chosen by outcome), the true image framed in green, the others in red.
"""

import collections
import json
import tempfile
from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--run", type=Path, required=True, help="a run directory written by tools/train.py")
    parser.add_argument("--probe-images", type=int, default=12000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", type=Path, help="also write a PNG of the top-5 images of 8 test captions")


GRID_CELL, GRID_BORDER, GRID_TEXT = 96, 4, 18


def retrieval_grid(entries: list[dict], root: Path, scores, caption_rows: list[int], path: Path, k: int = 5):
    """Rows of (caption, its top-k images by ``scores`` (captions x images)); the true image framed green."""
    from PIL import Image, ImageDraw

    owner = [i for i, e in enumerate(entries) for _ in e["caption"]]
    texts = [c for e in entries for c in e["caption"]]
    row_height = GRID_TEXT + GRID_CELL
    grid = Image.new("RGB", (k * GRID_CELL, len(caption_rows) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    for row, caption in enumerate(caption_rows):
        top = row * row_height
        draw.text((2, top + 3), texts[caption], fill="black")
        for rank, image in enumerate(scores[caption].topk(k).indices.tolist()):
            cell = Image.open(root / entries[image]["image"]).convert("RGB")
            inner = GRID_CELL - 2 * GRID_BORDER
            framed = Image.new("RGB", (GRID_CELL, GRID_CELL), (0, 170, 0) if image == owner[caption] else (200, 0, 0))
            framed.paste(cell.resize((inner, inner), Image.NEAREST), (GRID_BORDER, GRID_BORDER))
            grid.paste(framed, (rank * GRID_CELL, top + GRID_TEXT))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def rerank_r1(candidates, itc, itm, truth) -> dict:
    """img_r1 (%) when each caption's candidate images (captions x k indices) are ordered by ``itc``, by
    ``itm`` and by their sum, and the share of captions whose true image (``truth``) is a candidate."""
    out = {}
    for name, score in (("itc", itc), ("itm", itm), ("itm_plus_itc", itm + itc)):
        best = candidates.gather(1, score.argmax(1, keepdim=True)).squeeze(1)
        out[name] = round(100 * (best == truth).float().mean().item(), 2)
    out["true_in_candidates"] = round(100 * (candidates == truth[:, None]).any(1).float().mean().item(), 2)
    return out


def _rerank(model, image_tokens, text_tokens, scores, owner: list[int], k: int) -> dict:
    import torch

    from mmfm.inference.encode import itm_scores

    top_sim, candidates = scores.topk(k, dim=1)
    rows = torch.arange(len(scores)).repeat_interleave(k)
    itm = itm_scores(model, text_tokens, model.fusion_context(image_tokens), rows, candidates.reshape(-1))
    return rerank_r1(candidates, top_sim, itm.view(-1, k), torch.tensor(owner))


def _features(model, cfg, entries: list[dict]):
    """(image tokens, image features, text tokens, text features) of entries, images in entry order."""
    from mmfm.data import RetrievalEvalDataset
    from mmfm.inference.encode import encode_media, encode_texts
    from mmfm.tasks.base import dataset_kwargs, eval_loader, transform

    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(entries, handle)
        handle.flush()
        dataset = RetrievalEvalDataset(handle.name, transform=transform(cfg, False), **dataset_kwargs(cfg))
        image_tokens, image_feats, order = encode_media(model, eval_loader(dataset, cfg), "image")
    in_entry_order = sorted(range(len(order)), key=order.__getitem__)
    text_tokens, text_feats = encode_texts(model, [c for e in entries for c in e["caption"]])
    return image_tokens.select(in_entry_order), image_feats[in_entry_order], text_tokens, text_feats


def _pairs(scene: dict) -> frozenset:
    return frozenset((o["color"], o["shape"]) for o in scene["objects"])


def _error_kind(true: dict, got: dict) -> str:
    if len(true["objects"]) != len(got["objects"]):
        return "object count"
    if _pairs(true) != _pairs(got):
        same_words = (sorted(c for c, _ in _pairs(true)) == sorted(c for c, _ in _pairs(got))
                      and sorted(s for _, s in _pairs(true)) == sorted(s for _, s in _pairs(got)))
        return "pairs re-bound" if same_words else "colour-shape set"
    sized = {(o["color"], o["shape"], o["size"]) for o in true["objects"]}
    return "size" if sized != {(o["color"], o["shape"], o["size"]) for o in got["objects"]} else "position"


def _probe(train_x, train_y, test_x, test_y, steps: int = 500) -> float:
    """Exact-set accuracy (%) of a linear multi-label probe that names the top-k pairs, k = object count."""
    import torch
    import torch.nn.functional as F

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(train_x.shape[1], train_y.shape[1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.01)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(probe(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        ranked = probe(test_x).argsort(1, descending=True)
    counts = test_y.sum(1).long()
    hits = [set(ranked[i, :counts[i]].tolist()) == set(test_y[i].nonzero().flatten().tolist())
            for i in range(len(test_y))]
    return round(100 * sum(hits) / len(hits), 1)


def _labels(scenes: list[dict]):
    import torch

    from mmfm.data.shapes import ALL_PAIRS

    labels = torch.zeros(len(scenes), len(ALL_PAIRS))
    for row, scene in enumerate(scenes):
        for pair in _pairs(scene):
            labels[row, ALL_PAIRS.index(pair)] = 1
    return labels


def _train_entries(annotations: Path, count: int) -> list[dict]:
    grouped: dict[str, dict] = {}
    for entry in json.loads((annotations / "retrieval_train.json").read_text()):
        item = grouped.setdefault(entry["image"], {"image": entry["image"], "image_id": entry["image_id"],
                                                   "caption": []})
        item["caption"].append(entry["caption"])
    return list(grouped.values())[:count]


def run(args) -> dict:
    import torch

    from mmfm.config import load_config
    from mmfm.models.io import load_model

    torch.set_num_threads(args.threads)
    cfg = load_config(args.run / "config.yaml")
    model = load_model(args.run)
    annotations = Path(cfg.data.root) / "annotations"
    scene_of = {s["image"]: s for split in ("train", "test")
                for s in json.loads((annotations / f"scenes_{split}.json").read_text())}
    test = json.loads((annotations / "retrieval_test.json").read_text())
    train = _train_entries(annotations, args.probe_images)
    with torch.no_grad():
        test_image_tokens, test_images, test_text_tokens, test_texts = _features(model, cfg, test)
        _, train_images, _, train_texts = _features(model, cfg, train)
    owner = [i for i, e in enumerate(test) for _ in e["caption"]]
    scores = test_texts @ test_images.t()
    top = scores.argmax(1).tolist()
    if args.grid:
        per_image = len(test[0]["caption"])
        retrieval_grid(test, Path(cfg.data.root), scores, [i * per_image + i % per_image for i in range(8)], args.grid)
    errors, by_objects, totals = collections.Counter(), collections.Counter(), collections.Counter()
    for i, j in zip(owner, top):
        true = scene_of[test[i]["image"]]
        totals[len(true["objects"])] += 1
        if i != j:
            by_objects[len(true["objects"])] += 1
            errors[_error_kind(true, scene_of[test[j]["image"]])] += 1
    train_y = _labels([scene_of[e["image"]] for e in train])
    test_y = _labels([scene_of[e["image"]] for e in test])
    per_caption = len(test[0]["caption"])
    rerank = {}
    if model.fuses:
        with torch.no_grad():
            rerank = {"rerank_img_r1": _rerank(model, test_image_tokens, test_text_tokens, scores, owner,
                                               cfg.eval.k_test)}
    return {
        "run": str(args.run), "itc_img_r1": round(100 * (1 - sum(errors.values()) / len(owner)), 2),
        "r1_by_objects": {n: round(100 * (1 - by_objects[n] / totals[n]), 1) for n in sorted(totals)},
        "errors": dict(errors.most_common()),
        "probe_exact_set": {
            "image": _probe(train_images, train_y, test_images, test_y),
            "text": _probe(train_texts, train_y.repeat_interleave(per_caption, 0), test_texts,
                           test_y.repeat_interleave(per_caption, 0)),
        },
        **rerank,
    }
