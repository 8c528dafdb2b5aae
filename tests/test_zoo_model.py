"""The committed zoo checkpoint ``mmfm-shapes-s``, fetched from model_zoo/weights/ (a ``file:`` source) into a
fresh cache and used as a user would: search a gallery of ShapesWorld test scenes, answer a colour question."""

import random

import numpy as np
import pytest

import mmfm
from mmfm.data.shapes import COLORS, SHAPES, render_image, sample_image_scenes

NAME = "mmfm-shapes-s"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    home = tmp_path_factory.mktemp("mmfm_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMFM_HOME", str(home))
        patch.setenv("MMFM_OFFLINE", "1")
        pipeline = mmfm.load(NAME, device="cpu")
    assert any(home.rglob("*.safetensors")), "the weights were not fetched into the fresh cache"
    return pipeline


def _pairs(scene: dict) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in scene["objects"]}


def _caption(scene: dict) -> str:
    names = [f"a {o['color']} {o['shape']}" for o in scene["objects"]]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def test_the_zoo_lists_it_with_its_tasks_and_metrics():
    from mmfm import zoo

    assert NAME in zoo.list_models()
    entry = zoo.info(NAME)
    assert set(entry["tasks"]) >= {"image_text", "video_text"}
    assert entry["files"]["weights"]["size"] <= 25_000_000
    assert {"img_r1", "txt_r1", "binding_acc", "vqa_acc", "videoqa_acc", "vid_r1"} <= set(entry["metrics"])


def test_the_top_hit_of_a_caption_holds_the_captions_objects(pipe, tmp_path):
    scenes = [s for s in sample_image_scenes("test", 60, 64, seed=7) if len(s["objects"]) <= 2][:24]
    paths = []
    for i, scene in enumerate(scenes):
        image, _ = render_image(scene, np.random.default_rng(i))
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    index = pipe.index(images=[str(p) for p in paths], ids=[str(i) for i in range(len(paths))], progress=False)
    right = 0
    for i, scene in enumerate(scenes):
        top = pipe.search(index, text=_caption(scene), k=1, rerank=8)[0]
        right += _pairs(scenes[int(top.id)]) >= _pairs(scene)
    assert right >= 0.75 * len(scenes), f"{right} of {len(scenes)} top hits hold the caption's objects"


def test_a_colour_question_about_a_single_object_is_answered_right(pipe, tmp_path):
    rng = random.Random(0)
    right, total = 0, 0
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        if rng.random() > 0.25:
            continue
        scene = {"size": 64, "objects": [{"shape": shape, "color": color, "center": [32.0, 32.0], "radius": 9.0}]}
        image, _ = render_image(scene, np.random.default_rng(i))
        path = tmp_path / f"{color}_{shape}.png"
        image.save(path)
        answer, _ = pipe.answer(path, f"what color is the {shape}?", topk=1)[0]
        right, total = right + (answer == color), total + 1
    assert right >= 0.75 * total, f"{right} of {total} colour questions answered right"
