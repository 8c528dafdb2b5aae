"""tools/bench.py vision_probe: object -> patch-token assignment, pooled features, probes and the JSON."""

import argparse
import json

import torch
from bench_modules import load_bench


def test_an_object_lands_in_the_patch_cell_of_its_centre():
    probe = load_bench("vision_probe")
    obj = {"center": [20.0, 36.0], "bbox": [14.0, 30.0, 26.0, 42.0]}
    # x = 20 -> col 20 // 8 = 2, y = 36 -> row 36 // 8 = 4; [CLS] is token 0, patches row-major after it
    assert probe.object_tokens(obj, 64, 64, (8, 8)) == [1 + 4 * 8 + 2]
    # the same scene shown to a 128-px model: coordinates scale with the image, the cell does not move
    assert probe.object_tokens(obj, 64, 128, (16, 16)) == [1 + 9 * 16 + 5]
    # bbox pooling: rows 3..5 and cols 1..3 overlap [14, 26] x [30, 42]
    assert probe.object_tokens(obj, 64, 64, (8, 8), pool="bbox") == [1 + r * 8 + c for r in (3, 4, 5) for c in (1, 2, 3)]
    corner = {"center": [63.9, 0.0], "bbox": [60.0, -1.0, 70.0, 4.0]}
    assert probe.object_tokens(corner, 64, 64, (8, 8)) == [1 + 7]
    assert probe.object_tokens(corner, 64, 64, (8, 8), pool="bbox") == [1 + 7]


def test_vision_probe_runs_on_a_tiny_corpus_and_an_untrained_model(tiny_shapes, tmp_path):
    import mmfm
    from mmfm.models.io import save_model

    probe = load_bench("vision_probe")
    torch.manual_seed(0)
    model = mmfm.create_model("mmfm-demo").eval()
    save_model(model, tmp_path / "model.safetensors")

    # the pooled object feature is the normed residual token of its centre's cell
    scenes = json.loads((tiny_shapes / "annotations/scenes_test.json").read_text())[:2]
    from mmfm.data.transforms import eval_transform

    pre = model.preprocess
    pixels = probe.load_pixels(tiny_shapes, scenes, eval_transform(pre["image_size"], mean=pre["mean"], std=pre["std"]))
    cls, objects = probe.encode_features(model, pixels, scenes)
    assert cls.shape == (2, model.cfg.width) and len(objects) == sum(len(s["objects"]) for s in scenes)
    with torch.no_grad():
        tokens = model.trunk.norm(model.encode_vision(pixels[:1]).tokens.x)[0]
    first = scenes[0]["objects"][0]
    index = probe.object_tokens(first, scenes[0]["size"], pre["image_size"], probe.vision_grid(model))
    assert torch.allclose(objects[0], tokens[index[0]], atol=1e-5)
    assert torch.allclose(cls[0], tokens[0], atol=1e-5)

    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    args = parser.parse_args(["--run", str(tmp_path), "--data", str(tiny_shapes), "--probe-steps", "15",
                              "--reference-minutes", "0.01", "--threads", "2", "--device", "cpu"])
    result = probe.run(args)
    json.dumps(result)  # what bench.py writes
    assert {"cls", "objects", "reference", "run", "seconds"} <= set(result)
    assert set(result["cls"]) == {"shapes", "colors", "pairs"}
    for group in result["cls"].values():
        assert set(group) == {"label_acc", "label_acc_baseline", "exact_set", "exact_set_given_count"}
        assert all(0 <= value <= 100 for value in group.values())
    assert {"shape_acc", "color_acc", "size_acc", "all_three_acc"} <= set(result["objects"])
    assert all(0 <= value <= 100 for value in result["objects"].values())
    reference = result["reference"]
    assert reference["steps"] >= 1 and reference["model"]["depth"] == model.trunk.vision_depth
    assert reference["model"]["embed_dim"] == model.cfg.width and reference["model"]["num_classes"] == 62
    for key in ("pairs_exact_set", "shapes_exact_set", "colors_exact_set"):
        assert 0 <= reference[key] <= 100
    assert result["test_objects"] == sum(len(s["objects"]) for s in
                                         json.loads((tiny_shapes / "annotations/scenes_test.json").read_text()))

