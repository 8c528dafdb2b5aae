"""tools/bench.py retrieval_ceiling and retrieval_errors: the oracle's recall and the error taxonomy."""

import importlib.util
import random
from pathlib import Path

from mmfm.data import shapes

BENCH = Path(__file__).resolve().parent.parent / "tools" / "benchmarks"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _obj(color, shape, size, row, col):
    return {"color": color, "shape": shape, "size": size, "row": row, "col": col}


def test_enumeration_covers_every_sampled_caption():
    ceiling = _bench_module("retrieval_ceiling")
    objects = [_obj("red", "circle", "small", 0, 0), _obj("blue", "square", "large", 1, 2),
               _obj("gray", "star", "small", 2, 1)]
    possible = ceiling.possible_captions(objects)
    sampled = {c for seed in range(300) for c in shapes.image_captions(objects, random.Random(seed))}
    assert sampled <= possible
    assert "a red circle in the top left, a blue square on the right and a gray star at the bottom" in possible
    assert not any("green" in caption for caption in possible)


def test_a_caption_true_of_two_images_halves_the_oracle():
    ceiling = _bench_module("retrieval_ceiling")
    scenes = [{"image": "a.png", "objects": [_obj("red", "circle", "large", 0, 0)]},
              {"image": "b.png", "objects": [_obj("red", "circle", "small", 2, 2)]}]
    test = [{"image": "a.png", "caption": ["a single object, a red circle"]},
            {"image": "b.png", "caption": ["a small red circle in the bottom right"]}]
    result = ceiling.ceilings(scenes, test)
    assert result["img_r1"] == 75.0, "the shared caption is a coin flip, the specific one is certain"
    assert result["max_consistent_images"] == 2 and result["captions_with_one_image"] == 50.0
    assert result["txt_r1"] == 100.0, "each image's most specific consistent caption is its own"


def test_error_kinds_name_what_differs_between_the_true_and_the_retrieved_scene():
    kind = _bench_module("retrieval_errors")._error_kind
    red_circle, blue_square = _obj("red", "circle", "small", 0, 0), _obj("blue", "square", "large", 1, 1)
    true = {"objects": [red_circle, blue_square]}
    assert kind(true, {"objects": [red_circle]}) == "object count"
    assert kind(true, {"objects": [red_circle, _obj("blue", "star", "large", 1, 1)]}) == "colour-shape set"
    rebound = [_obj("red", "square", "small", 0, 0), _obj("blue", "circle", "large", 1, 1)]
    assert kind(true, {"objects": rebound}) == "pairs re-bound"
    assert kind(true, {"objects": [red_circle, _obj("blue", "square", "small", 1, 1)]}) == "size"
    assert kind(true, {"objects": [red_circle, _obj("blue", "square", "large", 2, 2)]}) == "position"
