"""Zero-shot classification: the prompt-ensemble math, `Pipeline.classify` with the zoo model on drawn
ShapesWorld objects, `mmfm classify`, ``POST /classify`` and the ``zeroshot`` evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

import mmfm
from mmfm.cli import main
from mmfm.config import ModelConfig, load_config
from mmfm.data.shapes import COLORS, SHAPES, SIZES, render_image, render_video, write_mp4
from mmfm.errors import InputError
from mmfm.inference.encode import zeroshot_classifier
from mmfm.inference.pipeline import MAX_LABELS, Pipeline, parse_labels, parse_templates, top_labels
from mmfm.inference.server import create_app
from mmfm.models.model import MMFM
from mmfm.tasks import get_task

MODEL = "mmfm-shapes-s"
SIDE = 64
# One large object in the middle cell; mmfm-shapes-s names each one's shape and colour with the defaults.
OBJECTS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"),
           ("white", "cross"), ("purple", "diamond")]


def _scene(color: str, shape: str, cell: int = 4) -> dict:
    row, col = divmod(cell, 3)
    obj = {"shape": shape, "color": color, "size": "large", "row": row, "col": col,
           "center": [(col + 0.5) * SIDE / 3, (row + 0.5) * SIDE / 3], "radius": SIZES["large"] * SIDE / 2}
    return {"size": SIDE, "objects": [obj]}


def _draw(path, color: str, shape: str, seed: int, cell: int = 4):
    render_image(_scene(color, shape, cell), np.random.default_rng(seed))[0].save(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def zoo_home(tmp_path_factory):
    """The zoo model is fetched from model_zoo/weights/ into a fresh cache, for the API and the CLI alike."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMFM_HOME", str(tmp_path_factory.mktemp("mmfm_home")))
        patch.setenv("MMFM_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def pipe():
    return mmfm.load(MODEL, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("objects")
    return [str(_draw(root / f"{color}_{shape}.png", color, shape, seed))
            for seed, (color, shape) in enumerate(OBJECTS)]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    """A green triangle moving right over 8 frames."""
    obj = {"shape": "triangle", "color": "green", "size": "large", "radius": SIZES["large"] * SIDE / 2,
           "motion": "right", "start": [20, 32], "end": [44, 32], "event": None}
    path = tmp_path_factory.mktemp("video") / "green_triangle.mp4"
    write_mp4(path, render_video({"size": SIDE, "frames": 8, "objects": [obj]}, np.random.default_rng(0)))
    return str(path)


def test_prompt_ensemble_and_probabilities_equal_a_hand_computation():
    torch.manual_seed(0)
    model = MMFM(ModelConfig(width=32, depth=2, heads=2, fusion_layer=1, embed_dim=16, img_size=32, patch_size=8),
                 {}, {"image_size": 32})
    pipe = Pipeline(model, "cpu")
    labels, templates = ["cat", "dog", "red fox"], ["a photo of a {}.", "{}", "a {} in the grass"]
    by_hand = []
    for label in labels:
        feats = [model.encode_text(*model.tokenizer([t.replace("{}", label)])).feat[0] for t in templates]
        by_hand.append(F.normalize(torch.stack([F.normalize(f, dim=0) for f in feats]).mean(0), dim=0))
    classes = zeroshot_classifier(model, labels, templates)
    assert torch.allclose(classes, torch.stack(by_hand), atol=1e-5)
    pixels = torch.rand(2, 3, 32, 32)
    expected = (model.encode_vision(pixels).feat @ classes.t() / model.temp).softmax(-1)
    assert torch.allclose(pipe.classify_pixels(pixels, labels, templates), expected.detach(), atol=1e-5)


def test_classify_names_shape_and_colour(pipe, images):
    for labels, truth in ((list(SHAPES), [s for _, s in OBJECTS]), (list(COLORS), [c for c, _ in OBJECTS])):
        probabilities = pipe.classify(images, labels)
        assert probabilities.shape == (len(images), len(labels))
        assert torch.allclose(probabilities.sum(1), torch.ones(len(images)), atol=1e-5)
        assert [labels[j] for j in probabilities.argmax(1)] == truth
    ranked = top_labels(pipe.classify(images[0], ["square", "circle", "star"]), ["square", "circle", "star"], 2)
    assert len(ranked) == 1 and ranked[0][0][0] == "circle" and ranked[0][0][1] > ranked[0][1][1]


def test_classify_images_and_videos_together(pipe, images, video):
    probabilities = pipe.classify([images[0], video, images[1]], ["red", "green", "blue"])
    assert probabilities.argmax(1).tolist() == [0, 1, 2]


@pytest.mark.parametrize("labels,templates,match", [
    ([], None, "non-empty list"),
    (["a", "b", "a"], None, "more than once"),
    ([f"class {i}" for i in range(MAX_LABELS + 1)], None, f"limit of {MAX_LABELS}"),
    (["a", " "], None, "label is empty"),
    (["a", "b"], ["a photo"], "no '{}'"),
    (["a", "b"], [], "templates"),
])
def test_bad_labels_and_templates_are_input_errors(pipe, images, labels, templates, match):
    with pytest.raises(InputError, match=match):
        pipe.classify(images[:1], labels, templates)


def test_labels_parse_from_commas_or_json():
    assert parse_labels(" cat, dog ,red fox") == ["cat", "dog", "red fox"]
    assert parse_labels('["a, b", "c"]') == ["a, b", "c"]
    with pytest.raises(InputError, match="JSON"):
        parse_labels('["a", ')
    assert parse_templates(["a {}", '["the {}.", "{}, a shape"]']) == ["a {}", "the {}.", "{}, a shape"]
    assert parse_templates([]) is None


def test_cli_prints_the_top_labels_and_json(pipe, images, capsys):
    assert main(["--quiet", "classify", "--model", MODEL, "--image", images[0], "--labels", "square,circle,star",
                 "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[1] == "circle" and float(lines[0].split()[0]) > 0.5
    assert main(["classify", "--model", MODEL, "--image", images[0], "--image", images[1], "--labels",
                 "red,blue,green", "--templates", "a {} object", "a {}", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [a["image"] for a in answer] == images[:2]
    assert [a["labels"][0]["label"] for a in answer] == ["red", "blue"] and len(answer[0]["labels"]) == 3
    assert main(["classify", "--model", MODEL, "--image", images[0], "--labels", "red,red"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, max_upload_mb=0.05)) as client:
        yield client


def test_post_classify_ranks_the_labels(client, images):
    with open(images[1], "rb") as file:
        response = client.post("/classify", files={"image": ("blue_square.png", file)},
                               data={"labels": '["red", "blue", "green"]', "topk": "2",
                                     "templates": ['["a {} shape", "a {} object"]', "a {}"]})
    assert response.status_code == 200, response.text
    ranked = response.json()["labels"]
    assert ranked[0]["label"] == "blue" and len(ranked) == 2
    assert ranked[0]["probability"] >= ranked[1]["probability"] and sum(r["probability"] for r in ranked) <= 1
    assert "/classify" in client.get("/openapi.json").json()["paths"]


def test_post_classify_a_video(client, video):
    with open(video, "rb") as file:
        response = client.post("/classify", files={"video": ("clip.mp4", file)}, data={"labels": "circle,triangle"})
    assert response.status_code == 200, response.text
    assert response.json()["labels"][0]["label"] == "triangle"


@pytest.mark.parametrize("fields,with_file,match", [
    ({}, True, "'labels' is missing"),
    ({"labels": ",".join(f"c{i}" for i in range(MAX_LABELS + 1))}, True, f"limit of {MAX_LABELS}"),
    ({"labels": "circle,square"}, False, "upload exactly one file"),
    ({"labels": "circle,circle"}, True, "more than once"),
    ({"labels": "circle,square", "topk": "0"}, True, "'topk'"),
])
def test_post_classify_bad_input_is_a_400_error_body(client, images, fields, with_file, match):
    files = {"image": ("x.png", Path(images[0]).read_bytes())} if with_file else None
    response = client.post("/classify", files=files, data=fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "InputError" and match in response.json()["error"]["message"]


def test_zeroshot_evaluation_on_an_image_folder(pipe, tmp_path):
    for seed, (color, shape) in enumerate(OBJECTS[:3] * 2):
        (tmp_path / "folder" / shape).mkdir(parents=True, exist_ok=True)
        _draw(tmp_path / "folder" / shape / f"{seed}.png", color, shape, seed, cell=seed % 9)
    cfg = load_config(None, [f"data.root={tmp_path}", "eval.zeroshot=folder", "eval.zeroshot_scenes=",
                             "data.num_workers=0", "eval.metrics=[zeroshot]"])
    metrics = get_task("image_text").evaluate(pipe.model, cfg, {"zeroshot"})
    assert set(metrics) == {"zeroshot_folder_top1", "zeroshot_folder_top5", "zeroshot_top1", "zeroshot_top5"}
    assert metrics["zeroshot_top5"] == 100.0 >= metrics["zeroshot_top1"] >= 50.0
    assert metrics["zeroshot_top1"] == metrics["zeroshot_folder_top1"]


def test_zeroshot_evaluation_on_shapes_scenes(pipe, tmp_path):
    scenes = []
    for index, (color, shape) in enumerate(OBJECTS):
        (tmp_path / "images").mkdir(exist_ok=True)
        _draw(tmp_path / "images" / f"{index}.png", color, shape, index)
        scenes.append({"image": f"images/{index}.png", **_scene(color, shape)})
    scenes.append({"image": "images/0.png", "objects": scenes[0]["objects"] * 2})  # two objects: left out
    (tmp_path / "scenes.json").write_text(json.dumps(scenes))
    cfg = load_config(None, [f"data.root={tmp_path}", "eval.zeroshot_scenes=scenes.json", "data.num_workers=0"])
    metrics = get_task("image_text").evaluate(pipe.model, cfg, {"zeroshot"})
    assert metrics["zeroshot_shape_top1"] == metrics["zeroshot_color_top1"] == 100.0
    assert metrics["zeroshot_top1"] == 100.0 and metrics["zeroshot_shape_top5"] == 100.0
