"""tools/bench.py retrieval_ceiling, retrieval_errors, budget_curve: oracle, error taxonomy, budget plot."""

import random
from pathlib import Path

from bench_modules import load_bench

from mmfm.data import shapes


def _obj(color, shape, size, row, col):
    return {"color": color, "shape": shape, "size": size, "row": row, "col": col}


def test_enumeration_covers_every_sampled_caption():
    ceiling = load_bench("retrieval_ceiling")
    objects = [_obj("red", "circle", "small", 0, 0), _obj("blue", "square", "large", 1, 2),
               _obj("gray", "star", "small", 2, 1)]
    possible = ceiling.possible_captions(objects)
    sampled = {c for seed in range(300) for c in shapes.image_captions(objects, random.Random(seed))}
    assert sampled <= possible
    assert "a red circle in the top left, a blue square on the right and a gray star at the bottom" in possible
    assert not any("green" in caption for caption in possible)


def test_a_caption_true_of_two_images_halves_the_oracle():
    ceiling = load_bench("retrieval_ceiling")
    scenes = [{"image": "a.png", "objects": [_obj("red", "circle", "large", 0, 0)]},
              {"image": "b.png", "objects": [_obj("red", "circle", "small", 2, 2)]}]
    test = [{"image": "a.png", "caption": ["a single object, a red circle"]},
            {"image": "b.png", "caption": ["a small red circle in the bottom right"]}]
    result = ceiling.ceilings(scenes, test)
    assert result["img_r1"] == 75.0, "the shared caption is a coin flip, the specific one is certain"
    assert result["max_consistent_images"] == 2 and result["captions_with_one_image"] == 50.0
    assert result["txt_r1"] == 100.0, "each image's most specific consistent caption is its own"


def test_error_kinds_name_what_differs_between_the_true_and_the_retrieved_scene():
    kind = load_bench("retrieval_errors")._error_kind
    red_circle, blue_square = _obj("red", "circle", "small", 0, 0), _obj("blue", "square", "large", 1, 1)
    true = {"objects": [red_circle, blue_square]}
    assert kind(true, {"objects": [red_circle]}) == "object count"
    assert kind(true, {"objects": [red_circle, _obj("blue", "star", "large", 1, 1)]}) == "colour-shape set"
    rebound = [_obj("red", "square", "small", 0, 0), _obj("blue", "circle", "large", 1, 1)]
    assert kind(true, {"objects": rebound}) == "pairs re-bound"
    assert kind(true, {"objects": [red_circle, _obj("blue", "square", "small", 1, 1)]}) == "size"
    assert kind(true, {"objects": [red_circle, _obj("blue", "square", "large", 2, 2)]}) == "position"


def test_retrieval_grid_frames_the_true_image_green_and_the_others_red(tmp_path):
    import torch
    from PIL import Image

    errors = load_bench("retrieval_errors")
    entries = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (255, 255, 0)]):
        Image.new("RGB", (64, 64), color).save(tmp_path / f"{i}.png")
        entries.append({"image": f"{i}.png", "caption": [f"caption {i}"]})
    scores = torch.tensor([[0.9, 0.1, 0.0],    # caption 0: its own image first
                           [0.9, 0.2, 0.1],    # caption 1: image 0 first, its own second
                           [0.0, 0.1, 0.9]])
    out = tmp_path / "grid" / "top.png"
    errors.retrieval_grid(entries, tmp_path, scores, [0, 1], out, k=2)
    grid = Image.open(out).convert("RGB")
    cell, text = errors.GRID_CELL, errors.GRID_TEXT
    assert grid.size == (2 * cell, 2 * (text + cell))
    green, red = (0, 170, 0), (200, 0, 0)
    assert grid.getpixel((1, text + 1)) == green and grid.getpixel((cell + 1, text + 1)) == red
    second = 2 * text + cell
    assert grid.getpixel((1, second + 1)) == red and grid.getpixel((cell + 1, second + 1)) == green
    assert grid.getpixel((cell // 2, second + cell // 2)) == (255, 0, 0), "image 0 ranked first for caption 1"


def test_rerank_r1_orders_the_candidates_by_each_score():
    import torch

    rerank_r1 = load_bench("retrieval_errors").rerank_r1
    candidates = torch.tensor([[4, 7], [2, 5], [9, 1]])  # each caption's top-2 images by ITC
    itc = torch.tensor([[0.9, 0.8], [0.7, 0.6], [0.5, 0.4]])
    itm = torch.tensor([[-1.0, 2.0], [-2.0, 1.0], [0.0, 0.0]])
    truth = torch.tensor([7, 2, 3])  # caption 2's true image is not a candidate
    result = rerank_r1(candidates, itc, itm, truth)
    assert result == {"itc": 33.33, "itm": 33.33, "itm_plus_itc": 33.33, "true_in_candidates": 66.67}
    result = rerank_r1(candidates, itc, torch.tensor([[0.0, 0.2], [0.0, 0.05], [0.0, 0.0]]), truth)
    assert result["itm"] == 33.33
    assert result["itm_plus_itc"] == 66.67, "the sum keeps ITC's hit on caption 1 and adds ITM's on caption 0"


def _fake_run(root: Path, name: str, fusion_layer: int, seconds: float, img_r1: float) -> Path:
    import json

    import yaml

    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"depth": 5, "fusion_layer": fusion_layer}}))
    (run / "metrics.json").write_text(json.dumps({"train_seconds": seconds, "img_r1": img_r1, "txt_r1": 1.0}))
    return run


def test_budget_curve_groups_runs_by_model_kind_in_minute_order(tmp_path):
    import pytest

    curve = load_bench("budget_curve")
    runs = [_fake_run(tmp_path, "fused20", 3, 1200.2, 46.1), _fake_run(tmp_path, "fused5", 3, 300.3, 32.1),
            _fake_run(tmp_path, "dual10", 5, 601.0, 41.2)]
    series = curve.budget_points(runs)
    assert [p["minutes"] for p in series["fused"]] == [5.0, 20.0]
    assert [p["img_r1"] for p in series["fused"]] == [32.1, 46.1]
    assert series["contrastive-only"] == [{"run": str(runs[2]), "minutes": 10.0, "img_r1": 41.2}]
    curve.plot(series, tmp_path / "plots" / "budget.png")
    assert (tmp_path / "plots" / "budget.png").stat().st_size > 1000
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("model: {depth: 5, fusion_layer: 3}\n")
    with pytest.raises(SystemExit, match="empty/metrics.json does not exist"):
        curve.budget_points([tmp_path / "empty"])
