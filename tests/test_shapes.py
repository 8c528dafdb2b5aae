"""ShapesWorld: determinism, truth of every caption/answer against the scene files, masks, splits,
binding probes, videos and CLI errors. Answers are re-derived here from the scene geometry, not from
the generator's own helpers."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfm.data import shapes
from mmfm.errors import DataError

IMAGES, VIDEOS = 60, 16
REPO = Path(__file__).resolve().parent.parent
PLURAL_TO_SHAPE = {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "diamonds": "diamond",
    "crosses": "cross",
    "stars": "star",
}


def _load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", REPO / "tools" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "seed0"
    shapes.generate(out, images=IMAGES, videos=VIDEOS, seed=0, workers=2)
    return out


def _load(corpus: Path, name: str):
    return json.loads((corpus / "annotations" / name).read_text())


def _annotation_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((directory / "annotations").glob("*.json"))}


def _left_of(a: dict, b: dict) -> bool:
    return a["bbox"][2] < b["bbox"][0]


def _above(a: dict, b: dict) -> bool:
    return a["bbox"][3] < b["bbox"][1]


RELATION_TESTS = {
    "left of": _left_of,
    "right of": lambda a, b: _left_of(b, a),
    "above": _above,
    "below": lambda a, b: _above(b, a),
}


def _find(objects: list[dict], color: str, shape: str) -> dict:
    (found,) = [o for o in objects if o["color"] == color and o["shape"] == shape]
    return found


def _answer_image_question(question: str, objects: list[dict]) -> str:
    """Independent re-derivation of an image answer from the scene."""
    if question == "how many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o["shape"] == PLURAL_TO_SHAPE[m[1]] for o in objects))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (obj,) = [o for o in objects if o["shape"] == m[1]]  # only asked when unambiguous
        return obj["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (obj,) = [o for o in objects if o["color"] == m[1]]
        return obj["shape"]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
        a, b = _find(objects, m[1], m[2]), _find(objects, m[4], m[5])
        return "yes" if RELATION_TESTS[m[3]](a, b) else "no"
    if m := re.fullmatch(r"what shape is (left of|right of|above|below) the (\w+) (\w+)\?", question):
        b = _find(objects, m[2], m[3])
        (a,) = [o for o in objects if o is not b and RELATION_TESTS[m[1]](o, b)]
        return a["shape"]
    raise AssertionError(f"unexpected question {question!r}")


def _direction(obj: dict) -> str:
    dx, dy = obj["end"][0] - obj["start"][0], obj["end"][1] - obj["start"][1]
    if dx == dy == 0:
        return "nowhere"
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _answer_video_question(question: str, objects: list[dict]) -> str:
    events = {o["event"]["type"]: o for o in objects if o["event"]}
    if question == "how many objects move?":
        return str(sum(_direction(o) != "nowhere" for o in objects))
    if m := re.fullmatch(r"(?:which way|in which direction) does the (\w+) (\w+) move\?", question):
        return _direction(_find(objects, m[1], m[2]))
    if m := re.fullmatch(r"what color does the (\w+) (\w+) turn\?", question):
        return _find(objects, m[1], m[2])["event"]["to"]
    if m := re.fullmatch(r"which shape (appear|disappear)s\?", question):
        return events[m[1]]["shape"]
    if m := re.fullmatch(r"does any object (change color|appear|disappear)\?", question):
        return "yes" if m[1].replace("change color", "color_change") in events else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_same_seed_gives_byte_identical_annotations(corpus, tmp_path):
    shapes.generate(tmp_path / "again", images=IMAGES, videos=VIDEOS, seed=0, workers=1)
    shapes.generate(tmp_path / "other", images=IMAGES, videos=VIDEOS, seed=1, workers=2)
    first, again, other = (_annotation_bytes(d) for d in (corpus, tmp_path / "again", tmp_path / "other"))
    assert len(first) >= 25 and "summary.json" in first and first == again
    assert first["scenes_train.json"] != other["scenes_train.json"]
    assert first["retrieval_train.json"] != other["retrieval_train.json"]


def test_the_cli_prints_the_timing_and_keeps_it_out_of_the_corpus(tmp_path, capsys):
    tiny = ["--images", "3", "--videos", "2", "--size", "32", "--frames", "2", "--seed", "5"]
    _load_make_data().main(["shapes", "--out", str(tmp_path / "cli"), "--workers", "1", *tiny])
    assert re.search(r"\d+\.\d\d s on 1 workers", capsys.readouterr().out)
    summary = shapes.generate(tmp_path / "api", images=3, videos=2, size=32, frames=2, seed=5, workers=2)
    assert _annotation_bytes(tmp_path / "cli") == _annotation_bytes(tmp_path / "api")
    assert summary == _load(tmp_path / "api", "summary.json") and "timing" not in summary


def test_split_sizes_and_file_formats(corpus):
    summary = _load(corpus, "summary.json")
    assert summary["counts"]["train"]["images"] == IMAGES and summary["counts"]["test"]["images"] == 10
    assert summary["counts"]["val"]["videos"] == 8
    train = _load(corpus, "retrieval_train.json")
    assert len(train) == len(_load(corpus, "pretrain.json")) == 5 * IMAGES
    for split in ("val", "test", "test_novel"):
        entries = _load(corpus, f"retrieval_{split}.json")
        assert len(entries) == 10 and all(len(set(e["caption"])) == 5 for e in entries)
        assert all((corpus / e["image"]).is_file() for e in entries)
    vqa = _load(corpus, "vqa_train.json")
    answers = set(_load(corpus, "answer_list.json"))
    assert all(len(q["answer"]) == 10 and q["answer"][0] in answers and q["dataset"] == "shapes" for q in vqa)
    assert len({q["question_id"] for q in vqa}) == len(vqa)
    assert {q["question_type"] for q in vqa} == {"count", "color", "shape", "exists", "relation"}
    video_answers = set(_load(corpus, "videoqa_answer_list.json"))
    assert all(q["answer"][0] in video_answers for q in _load(corpus, "videoqa_train.json"))
    seg = _load(corpus, "seg_val.json")
    assert all((corpus / e["mask"]).is_file() for e in seg) and len(seg) == 10


def test_captions_are_short_and_name_every_object(corpus):
    scenes = {s["image"]: s for s in _load(corpus, "scenes_test.json")}
    for entry in _load(corpus, "retrieval_test.json"):
        for caption in entry["caption"]:
            assert len(caption.split()) <= 20
            for obj in scenes[entry["image"]]["objects"]:
                assert re.search(rf"\b{obj['color']} {obj['shape']}\b", caption), (caption, obj)
    video_scenes = {s["video"]: s for s in _load(corpus, "video_scenes_train.json")}
    for entry in _load(corpus, "video_train.json"):
        assert len(set(entry["caption"])) == 5
        for caption in entry["caption"]:
            assert len(caption.split()) <= 20
            assert all(
                f"{o['color']} {o['shape']}" in caption for o in video_scenes[entry["video"]]["objects"]
            )


def test_relation_captions_are_true(corpus):
    pattern = re.compile(
        r"an? (?:small |large )?(\w+) (\w+) (?:is )?(?:to the )?(left of|right of|above|below) "
        r"an? (?:small |large )?(\w+) (\w+)"
    )
    checked = 0
    for split in ("train", "test"):
        scenes = {s["image"]: s["objects"] for s in _load(corpus, f"scenes_{split}.json")}
        for entry in _load(corpus, f"retrieval_{split}.json"):
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            for m in filter(None, map(pattern.match, captions)):
                objects = scenes[entry["image"]]
                assert RELATION_TESTS[m[3]](_find(objects, m[1], m[2]), _find(objects, m[4], m[5])), m[0]
                checked += 1
    assert checked > 20


@pytest.mark.parametrize("split", ["train", "test", "test_novel"])
def test_image_answers_match_scenes(corpus, split):
    scenes = {s["image"]: s["objects"] for s in _load(corpus, f"scenes_{split}.json")}
    questions = _load(corpus, f"vqa_{split}.json")
    assert len(questions) >= 4 * len(scenes)
    for q in questions:
        assert q["answer"] == [_answer_image_question(q["question"], scenes[q["image"]])] * 10, q
    exists = [q["answer"][0] for q in questions if q["question_type"] == "exists"]
    assert "yes" in exists and "no" in exists


def test_masks_and_pixels_agree_with_scenes(corpus):
    for scene in _load(corpus, "scenes_val.json"):
        mask = np.asarray(Image.open(corpus / scene["mask"]))
        image = np.asarray(Image.open(corpus / scene["image"]).convert("RGB")).astype(int)
        assert mask.dtype == np.uint8 and mask.shape == (64, 64)
        classes = {shapes.SHAPES.index(o["shape"]) + 1 for o in scene["objects"]}
        assert set(np.unique(mask)) == {0} | classes
        for obj in scene["objects"]:
            x0, y0, x1, y1 = (round(v) for v in obj["bbox"])
            inside = mask[y0 : y1 + 1, x0 : x1 + 1] == shapes.SHAPES.index(obj["shape"]) + 1
            assert inside.sum() > 10
            mean = image[y0 : y1 + 1, x0 : x1 + 1][inside].mean(axis=0)
            assert np.abs(mean - shapes.COLORS[obj["color"]]).max() < 25, (obj, mean)


def test_test_scenes_are_unique_and_unseen_in_train(corpus):
    def description(objects):
        return tuple(sorted((o["size"], o["color"], o["shape"], o["row"], o["col"]) for o in objects))

    test = [description(s["objects"]) for s in _load(corpus, "scenes_test.json")]
    assert len(set(test)) == len(test)
    train = {description(s["objects"]) for s in _load(corpus, "scenes_train.json")}
    assert not train & set(test)
    # the generator draws test scenes from its own partition, so the property holds at any size
    many = shapes.sample_image_scenes("test", 400, 64, seed=3)
    many_train = shapes.sample_image_scenes("train", 2000, 64, seed=3)
    many_keys = {description(s["objects"]) for s in many}
    assert len(many_keys) == 400 and not many_keys & {description(s["objects"]) for s in many_train}


def test_novel_split_holds_pairs_never_seen_elsewhere(corpus):
    held_out = {tuple(p) for p in shapes.HELD_OUT_PAIRS}
    assert len(held_out) == 6
    for scene in _load(corpus, "scenes_test_novel.json"):
        assert any((o["color"], o["shape"]) in held_out for o in scene["objects"])
    for name in (
        "scenes_train.json",
        "scenes_val.json",
        "scenes_test.json",
        "video_scenes_train.json",
        "video_scenes_test.json",
    ):
        for scene in _load(corpus, name):
            for obj in scene["objects"]:
                assert (obj["color"], obj["shape"]) not in held_out
                assert not obj.get("event") or (obj["event"].get("to"), obj["shape"]) not in held_out


def test_binding_probes_swap_two_colours_and_are_false(corpus):
    scenes = {s["image"]: s["objects"] for s in _load(corpus, "scenes_test.json")}
    probes = _load(corpus, "binding_test.json")
    eligible = [
        im
        for im, objs in scenes.items()
        if len({(o["color"], o["shape"]) for o in objs}) >= 2
        and len({o["color"] for o in objs}) >= 2
        and len({o["shape"] for o in objs}) >= 2
    ]
    assert {p["image"] for p in probes} >= set(eligible) and probes
    for probe in probes:
        truth, swapped = probe["caption"].split(), probe["swapped"].split()
        diffs = [i for i, (a, b) in enumerate(zip(truth, swapped)) if a != b]
        assert len(truth) == len(swapped) and len(diffs) == 2
        i, j = diffs
        assert truth[i] == swapped[j] and truth[j] == swapped[i] and truth[i] in shapes.COLORS
        triples = sorted(re.findall(r"(small|large) (\w+) (\w+)", probe["swapped"]))
        real = sorted((o["size"], o["color"], o["shape"]) for o in scenes[probe["image"]])
        assert triples != real and sorted(re.findall(r"(small|large) (\w+) (\w+)", probe["caption"])) == real


@pytest.mark.parametrize("split", ["train", "test"])
def test_video_answers_match_scenes(corpus, split):
    scenes = {s["video"]: s["objects"] for s in _load(corpus, f"video_scenes_{split}.json")}
    questions = _load(corpus, f"videoqa_{split}.json")
    assert len(questions) >= 2 * len(scenes)
    for q in questions:
        assert q["answer"] == [_answer_video_question(q["question"], scenes[q["video"]])] * 10, q
    assert "direction" in {q["question_type"] for q in questions}


def test_videos_decode_and_objects_move_as_stated(corpus):
    import decord

    checked = 0
    for split in ("train", "val"):
        for scene in _load(corpus, f"video_scenes_{split}.json"):
            reader = decord.VideoReader(str(corpus / scene["video"]))
            assert len(reader) == 16
            frames = reader.get_batch([0, 15]).asnumpy().astype(int)
            assert frames.shape == (2, 64, 64, 3)
            for obj in scene["objects"]:
                if obj["event"] or obj["motion"] == "none":
                    continue
                centroids = []
                for frame in frames:
                    near = np.abs(frame - shapes.COLORS[obj["color"]]).max(axis=-1) < 40
                    ys, xs = np.nonzero(near)
                    centroids.append((xs.mean(), ys.mean()))
                dx, dy = np.subtract(centroids[1], centroids[0])
                expected = {"left": -dx, "right": dx, "up": -dy, "down": dy}[obj["motion"]]
                assert expected > 0.2 * 64, (scene["video"], obj, dx, dy)
                checked += 1
    assert checked >= 5


def test_event_videos_exist_and_change_colour_midway(corpus):
    import decord

    scenes = [
        s
        for s in _load(corpus, "video_scenes_train.json")
        if any(o["event"] and o["event"]["type"] == "color_change" for o in s["objects"])
    ]
    assert scenes
    scene = scenes[0]
    obj = next(o for o in scene["objects"] if o["event"])
    frames = decord.VideoReader(str(corpus / scene["video"])).get_batch([0, 15]).asnumpy().astype(int)

    def pixels_of(frame, color):
        return (np.abs(frame - shapes.COLORS[color]).max(axis=-1) < 40).sum()

    assert pixels_of(frames[0], obj["color"]) > 10 and pixels_of(frames[0], obj["event"]["to"]) < 3
    assert pixels_of(frames[1], obj["event"]["to"]) > 10 and pixels_of(frames[1], obj["color"]) < 3


@pytest.mark.parametrize(
    "flag, value, named",
    [
        ("--images", "-1", "images"),
        ("--size", "16", "size"),
        ("--frames", "1", "frames"),
        ("--videos", "-3", "videos"),
    ],
)
def test_bad_cli_arguments_name_the_argument(tmp_path, flag, value, named):
    make_data = _load_make_data()
    with pytest.raises(SystemExit, match=named):
        make_data.main(["shapes", "--out", str(tmp_path / "x"), flag, value])


def test_unusable_out_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match="out directory"):
        shapes.generate(blocker, images=1, videos=1)
    with pytest.raises(SystemExit, match="out directory"):
        _load_make_data().main(["shapes", "--out", str(blocker / "sub"), "--images", "1", "--videos", "1"])


def test_if_missing_skips_an_existing_corpus(corpus, capsys):
    summary = corpus / "annotations" / "summary.json"
    before = summary.read_bytes()
    _load_make_data().main(
        ["shapes", "--out", str(corpus), "--images", str(IMAGES), "--videos", str(VIDEOS), "--if-missing"]
    )
    assert "nothing to do" in capsys.readouterr().out and summary.read_bytes() == before
