"""ShapesWorld: the embedded default corpus of mmfm.

A procedurally generated, seeded image / video / caption / QA / mask corpus written to disk in the
real dataset formats (ALBEF retrieval/pretrain JSON, VQAv2-style QA, MSRVTT-style video JSON, PNG
masks), so the loaders that read COCO or MSRVTT read it unchanged. It is small enough for a 2-core CPU
yet still needs the skills the real tasks need:

* binding: a scene holds up to four objects with distinct colour-shape pairs, captions and questions
  name both, and `binding_test.json` pairs each test caption with a colour-swapped (false) twin;
* relations: captions and questions use left of / right of / above / below on a 3x3 layout;
* generalisation: `test_novel` images each contain a colour-shape pair never drawn anywhere else;
* time: video objects move, change colour, appear or disappear, and video questions ask about it.

Everything is derived from `random.Random(f"{seed}:{split}:{index}...")` (never from the worker or the
clock), so the same seed gives byte-identical annotation files whatever the number of workers.
See docs/data.md for the file formats.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmfm.data.video import write_mp4
from mmfm.errors import DataError

DEFAULT_IMAGES = 20000
DEFAULT_VIDEOS = 4000

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "star": "stars",
}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (60, 110, 255),
    "yellow": (240, 225, 40),
    "purple": (165, 70, 220),
    "orange": (250, 140, 20),
    "white": (240, 240, 240),
    "gray": (140, 140, 140),
}
SIZES = {"small": 0.19, "large": 0.28}  # object diameter as a fraction of the image side
ALL_PAIRS = tuple((color, shape) for color in COLORS for shape in SHAPES)
# One held-out pair per shape and per colour, so every colour and every shape is still seen in training.
HELD_OUT_PAIRS = (
    ("red", "star"),
    ("green", "cross"),
    ("blue", "triangle"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "diamond"),
)
SEEN_PAIRS = tuple(pair for pair in ALL_PAIRS if pair not in HELD_OUT_PAIRS)

IMAGE_SPLITS = ("train", "val", "test", "test_novel")
VIDEO_SPLITS = ("train", "val", "test")
MAX_IMAGE_OBJECTS = 4
MAX_VIDEO_OBJECTS = 3
CAPTIONS_PER_ITEM = 5
MAX_CAPTION_WORDS = 20
QUESTIONS_PER_IMAGE = 6
QUESTIONS_PER_VIDEO = 4
VQA_REPEATS = 10  # VQAv2 has ten human answers per question
VIDEO_FPS = 8
VIDEO_TRAVEL = 0.3  # distance a moving object covers over the whole video, as a fraction of the side
VIDEO_EVENT_PROB = 0.4
TEST_PARTITION = 16  # one scene description in 16 may only be drawn in test, never in train/val

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
RELATIONS = ("left of", "right of", "above", "below")
CELL_PHRASES = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}
MOTION_PHRASES = {
    "left": ("moves left", "moves to the left", "slides left", "goes left"),
    "right": ("moves right", "moves to the right", "slides right", "goes right"),
    "up": ("moves up", "moves upward", "goes up", "rises"),
    "down": ("moves down", "moves downward", "goes down", "sinks"),
    "none": ("stays still", "does not move", "stays in place", "is still"),
}
IMAGE_ANSWERS = tuple(sorted({*COLORS, *SHAPES, *map(str, range(MAX_IMAGE_OBJECTS + 1)), "yes", "no"}))
VIDEO_ANSWERS = tuple(
    sorted({*COLORS, *SHAPES, *map(str, range(MAX_VIDEO_OBJECTS + 1)), "yes", "no", *DIRECTIONS, "nowhere"})
)


# ---------------------------------------------------------------- small helpers


def _rng(seed: int, split: str, index: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{split}:{index}:{purpose}")


def _np_rng(seed: int, split: str, index: int, kind: str) -> np.random.Generator:
    return np.random.default_rng([seed, IMAGE_SPLITS.index(split), index, ("image", "video").index(kind)])


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def _vqa(question: str, answer: str, qtype: str) -> dict:
    return {"question": question, "answer": [answer] * VQA_REPEATS, "question_type": qtype}


def eval_count(train_count: int, divisor: int, low: int, high: int) -> int:
    """Size of a val/test split for `train_count` training items (0 when there is no training data)."""
    return 0 if train_count == 0 else int(np.clip(train_count // divisor, low, high))


# ---------------------------------------------------------------- scenes


def canonical_description(objects: list[dict]) -> str:
    """The scene as one order-free string; two scenes are 'the same' when these are equal."""
    return "; ".join(sorted(f"{o['size']} {o['color']} {o['shape']} {o['row']},{o['col']}" for o in objects))


def _in_test_partition(description: str) -> bool:
    digest = hashlib.md5(description.encode()).digest()
    return int.from_bytes(digest[:4], "little") % TEST_PARTITION == 0


def _place_in_cell(rng: random.Random, image_size: int, size: str, cell: int) -> dict:
    row, col = divmod(cell, 3)
    cell_px = image_size / 3
    radius = SIZES[size] * image_size / 2
    jitter = max(0.0, cell_px / 2 - radius - 1)  # keeps the whole object inside its cell
    cx = (col + 0.5) * cell_px + rng.uniform(-jitter, jitter)
    cy = (row + 0.5) * cell_px + rng.uniform(-jitter, jitter)
    return {
        "row": row,
        "col": col,
        "center": [round(cx, 2), round(cy, 2)],
        "radius": round(radius, 2),
        "bbox": [round(cx - radius, 2), round(cy - radius, 2), round(cx + radius, 2), round(cy + radius, 2)],
    }


def _sample_image_objects(rng: random.Random, image_size: int, novel: bool) -> list[dict]:
    count = rng.randint(1, MAX_IMAGE_OBJECTS)
    pairs = [rng.choice(HELD_OUT_PAIRS)] if novel else []
    pool = ALL_PAIRS if novel else SEEN_PAIRS
    while len(pairs) < count:
        pair = rng.choice(pool)
        if pair not in pairs:
            pairs.append(pair)
    cells = rng.sample(range(9), count)
    objects = []
    for (color, shape), cell in zip(pairs, cells):
        size = rng.choice(tuple(SIZES))
        objects.append(
            {"shape": shape, "color": color, "size": size, **_place_in_cell(rng, image_size, size, cell)}
        )
    return objects


def sample_image_scenes(split: str, count: int, image_size: int, seed: int) -> list[dict]:
    """Draw `count` scenes of `split`. Test scenes are unique and come from a partition of the scene
    space that train/val never draw from; test_novel scenes are unique and hold a held-out pair."""
    scenes, seen = [], set()
    for index in range(count):
        rng = _rng(seed, split, index, "scene")
        while True:
            objects = _sample_image_objects(rng, image_size, novel=split == "test_novel")
            description = canonical_description(objects)
            if split in ("train", "val"):
                if not _in_test_partition(description):
                    break
            elif description not in seen and (split == "test_novel" or _in_test_partition(description)):
                seen.add(description)
                break
        scenes.append(
            {
                "image_id": index,
                "image": f"images/{split}/{index:06d}.png",
                "mask": f"masks/{split}/{index:06d}.png",
                "size": image_size,
                "objects": objects,
            }
        )
    return scenes


def _swept_box(start: list[float], end: list[float], radius: float) -> tuple[float, ...]:
    return (
        min(start[0], end[0]) - radius - 1,
        min(start[1], end[1]) - radius - 1,
        max(start[0], end[0]) + radius + 1,
        max(start[1], end[1]) + radius + 1,
    )


def _boxes_overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_moving(rng: random.Random, image_size: int, radius: float, motion: str) -> tuple[list, list]:
    dx, dy = DIRECTIONS.get(motion, (0, 0))
    travel = VIDEO_TRAVEL * image_size
    low, high = radius + 1, image_size - radius - 1
    cx = rng.uniform(low - min(dx, 0) * travel, high - max(dx, 0) * travel)
    cy = rng.uniform(low - min(dy, 0) * travel, high - max(dy, 0) * travel)
    start = [round(cx, 2), round(cy, 2)]
    return start, [round(cx + dx * travel, 2), round(cy + dy * travel, 2)]


def _sample_video_objects(rng: random.Random, image_size: int, frames: int) -> list[dict]:
    colors = rng.sample(tuple(COLORS), rng.randint(1, MAX_VIDEO_OBJECTS))  # distinct colours per video
    objects, boxes = [], []
    for color in colors:
        shape = rng.choice([s for s in SHAPES if (color, s) not in HELD_OUT_PAIRS])
        size = rng.choice(tuple(SIZES))
        radius = round(SIZES[size] * image_size / 2, 2)
        for _ in range(30):
            motion = rng.choice(("none", *DIRECTIONS)) if rng.random() < 0.85 else "none"
            start, end = _place_moving(rng, image_size, radius, motion)
            box = _swept_box(start, end, radius)
            if not any(_boxes_overlap(box, other) for other in boxes):
                boxes.append(box)
                objects.append(
                    {
                        "shape": shape,
                        "color": color,
                        "size": size,
                        "radius": radius,
                        "motion": motion,
                        "start": start,
                        "end": end,
                        "event": None,
                    }
                )
                break
    if rng.random() < VIDEO_EVENT_PROB:
        _add_event(rng, objects, frames)
    return objects


def _add_event(rng: random.Random, objects: list[dict], frames: int) -> None:
    """Give one object a colour change, or make a still object appear or disappear midway."""
    obj = rng.choice(objects)
    kind = rng.choice(("color_change", "color_change", "appear", "disappear"))
    if kind == "color_change":
        used = {o["color"] for o in objects}
        targets = [c for c in COLORS if c not in used and (c, obj["shape"]) not in HELD_OUT_PAIRS]
        obj["event"] = {"type": kind, "frame": frames // 2, "to": rng.choice(targets)}
    else:
        obj["motion"], obj["end"] = "none", list(obj["start"])
        obj["event"] = {"type": kind, "frame": frames // 2}


def sample_video_scenes(split: str, count: int, image_size: int, frames: int, seed: int) -> list[dict]:
    """Draw `count` video scenes of `split` (objects with motion and at most one event)."""
    return [
        {
            "video_id": index,
            "video": f"videos/{split}/{index:06d}.mp4",
            "size": image_size,
            "frames": frames,
            "objects": _sample_video_objects(_rng(seed, split, index, "video"), image_size, frames),
        }
        for index in range(count)
    ]


# ---------------------------------------------------------------- relations and image text


def relations_between(a: dict, b: dict) -> list[str]:
    """Every relation word true of `a` relative to `b` (objects sit in distinct cells of a 3x3 grid)."""
    rels = []
    if a["col"] != b["col"]:
        rels.append("left of" if a["col"] < b["col"] else "right of")
    if a["row"] != b["row"]:
        rels.append("above" if a["row"] < b["row"] else "below")
    return rels


def _phrase(obj: dict, with_size: bool) -> str:
    return _article(f"{obj['size']} {_name(obj)}" if with_size else _name(obj))


def _shuffled(items: list, rng: random.Random) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


def _caption_list(objects: list[dict], rng: random.Random) -> str:
    prefix = rng.choice(("", "an image of ", "a picture of ", "a dark scene with ", "a photo showing "))
    with_size = rng.random() < 0.5
    return prefix + _join([_phrase(o, with_size) for o in _shuffled(objects, rng)])


def _caption_count(objects: list[dict], rng: random.Random) -> str:
    with_size = rng.random() < 0.5
    phrases = [_phrase(o, with_size) for o in _shuffled(objects, rng)]
    if len(objects) == 1:
        return rng.choice(("one object: ", "just one shape: ", "a single object, ")) + phrases[0]
    noun = rng.choice(("objects", "shapes"))
    return f"{NUMBER_WORDS[len(objects)]} {noun}: {_join(phrases)}"


def _caption_relation(objects: list[dict], rng: random.Random) -> str:
    with_size = rng.random() < 0.5
    if len(objects) == 1:
        return f"{_phrase(objects[0], with_size)} {CELL_PHRASES[objects[0]['row'], objects[0]['col']]}"
    a, b, *rest = _shuffled(objects, rng)
    relation = rng.choice(relations_between(a, b))
    if relation in ("left of", "right of") and rng.random() < 0.5:
        relation = "to the " + relation
    verb = rng.choice(("", "is "))
    caption = f"{_phrase(a, with_size)} {verb}{relation} {_phrase(b, with_size)}"
    if rest:
        caption += rng.choice((", plus ", ", along with ", " and also ")) + _join(
            [_phrase(o, False) for o in rest]
        )
    return caption


def _caption_positions(objects: list[dict], rng: random.Random) -> str:
    with_size = rng.random() < 0.3
    return _join(
        [f"{_phrase(o, with_size)} {CELL_PHRASES[o['row'], o['col']]}" for o in _shuffled(objects, rng)]
    )


def _pick_captions(templates: tuple, scene_objects: list[dict], rng: random.Random) -> list[str]:
    """Five distinct captions of at most MAX_CAPTION_WORDS words, each template tried first once."""
    order = _shuffled(templates, rng)
    captions: list[str] = []
    for attempt in range(200):
        template = order[attempt] if attempt < len(order) else rng.choice(templates)
        caption = template(scene_objects, rng)
        if caption not in captions and len(caption.split()) <= MAX_CAPTION_WORDS:
            captions.append(caption)
            if len(captions) == CAPTIONS_PER_ITEM:
                return captions
    raise AssertionError(f"could not find {CAPTIONS_PER_ITEM} captions for {scene_objects}")


def image_captions(objects: list[dict], rng: random.Random) -> list[str]:
    """Five true captions; every one names each object's colour and shape."""
    return _pick_captions(
        (_caption_list, _caption_count, _caption_relation, _caption_positions), objects, rng
    )


def _count_questions(objects: list[dict], rng: random.Random) -> list[dict]:
    shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    return [
        _vqa("how many objects are there?", str(len(objects)), "count"),
        _vqa(
            f"how many {PLURALS[shape]} are there?", str(sum(o["shape"] == shape for o in objects)), "count"
        ),
        _vqa(f"how many {color} objects are there?", str(sum(o["color"] == color for o in objects)), "count"),
    ]


def _attribute_questions(objects: list[dict], rng: random.Random) -> list[dict]:
    questions = []
    for obj in objects:
        if sum(o["shape"] == obj["shape"] for o in objects) == 1:
            questions.append(_vqa(f"what color is the {obj['shape']}?", obj["color"], "color"))
        if sum(o["color"] == obj["color"] for o in objects) == 1:
            questions.append(_vqa(f"what shape is the {obj['color']} object?", obj["shape"], "shape"))
    return questions


def _exists_questions(objects: list[dict], rng: random.Random) -> list[dict]:
    present = {(o["color"], o["shape"]) for o in objects}
    # Hard negatives recombine a colour and a shape that are both in the scene, but not together.
    binding = [(c, s) for c, _ in present for _, s in present if (c, s) not in present]
    absent = binding or [pair for pair in ALL_PAIRS if pair not in present]
    color, shape = rng.choice(sorted(present))
    negative = rng.choice(sorted(absent))
    return [
        _vqa(f"is there {_article(f'{color} {shape}')}?", "yes", "exists"),
        _vqa(f"is there {_article(' '.join(negative))}?", "no", "exists"),
    ]


def _relation_questions(objects: list[dict], rng: random.Random) -> list[dict]:
    if len(objects) < 2:
        return []
    a, b = rng.sample(objects, 2)
    relation = rng.choice(RELATIONS)
    answer = "yes" if relation in relations_between(a, b) else "no"
    questions = [_vqa(f"is the {_name(a)} {relation} the {_name(b)}?", answer, "relation")]
    for relation in _shuffled(RELATIONS, rng):
        matches = [o for o in objects if o is not b and relation in relations_between(o, b)]
        if len(matches) == 1:
            questions.append(
                _vqa(f"what shape is {relation} the {_name(b)}?", matches[0]["shape"], "relation")
            )
            break
    return questions


def image_questions(objects: list[dict], rng: random.Random) -> list[dict]:
    """Up to QUESTIONS_PER_IMAGE questions, drawn round-robin over the question types."""
    groups = [
        _shuffled(make(objects, rng), rng)
        for make in (_count_questions, _attribute_questions, _exists_questions, _relation_questions)
    ]
    return _round_robin(_shuffled(groups, rng), QUESTIONS_PER_IMAGE)


def _round_robin(groups: list[list[dict]], limit: int) -> list[dict]:
    picked, asked = [], set()
    while len(picked) < limit and any(groups):
        for group in groups:
            if group and len(picked) < limit:
                question = group.pop()
                if question["question"] not in asked:
                    asked.add(question["question"])
                    picked.append(question)
    return picked


def binding_probe(objects: list[dict], rng: random.Random) -> tuple[str, str] | None:
    """A full caption and its twin with two objects' colours swapped, chosen so the twin is false."""
    truth = sorted((o["size"], o["color"], o["shape"]) for o in objects)
    for a, b in _shuffled([(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]], rng):
        swapped_colors = {id(a): b["color"], id(b): a["color"]}
        swapped = [{**o, "color": swapped_colors.get(id(o), o["color"])} for o in objects]
        if sorted((o["size"], o["color"], o["shape"]) for o in swapped) != truth:
            order = _shuffled(range(len(objects)), rng)
            return (
                _join([_phrase(objects[i], True) for i in order]),
                _join([_phrase(swapped[i], True) for i in order]),
            )
    return None


# Zero-shot prompts in the captions' phrasing: each attribute's class ensembled over the other attribute's
# values ("a red {}", "a green {}", ...); on mmfm-shapes-s they lift shape top-1 from 77 to 96 (docs/inference.md).
ZEROSHOT_TEMPLATES = {
    "shape": tuple(_article(f"{color} {{}}") for color in COLORS),
    "color": tuple(f"a {{}} {shape}" for shape in SHAPES),
}


def single_object_classes(scenes: list[dict]) -> tuple[list[str], dict[str, tuple]]:
    """Zero-shot classification sets of the single-object scenes (their one object's attributes are
    the image's class): the image paths and, for "shape" and "color", (class names, each image's class
    index, the set's `ZEROSHOT_TEMPLATES`)."""
    objects = [(scene["image"], scene["objects"][0]) for scene in scenes if len(scene["objects"]) == 1]
    classes = {"shape": SHAPES, "color": tuple(COLORS)}
    return [image for image, _ in objects], {
        attribute: (names, [names.index(obj[attribute]) for _, obj in objects], ZEROSHOT_TEMPLATES[attribute])
        for attribute, names in classes.items()
    }


# ---------------------------------------------------------------- video text


def _subject(obj: dict, rng: random.Random) -> str:
    return rng.choice((_article(_name(obj)), "the " + _name(obj)))


def _video_clause(obj: dict, rng: random.Random) -> str:
    subject, event = _subject(obj, rng), obj["event"]
    if event is None:
        return f"{subject} {rng.choice(MOTION_PHRASES[obj['motion']])}"
    if event["type"] == "color_change":
        change = rng.choice(("turns {}", "changes color to {}", "becomes {}")).format(event["to"])
        if obj["motion"] == "none":
            return f"{subject} {change}"
        return f"{subject} {rng.choice(MOTION_PHRASES[obj['motion']])} and {change}"
    verb = {
        "appear": ("appears", "appears midway", "shows up"),
        "disappear": ("disappears", "disappears midway", "vanishes"),
    }[event["type"]]
    return f"{subject} {rng.choice(verb)}"


def _video_caption_clauses(objects: list[dict], rng: random.Random) -> str:
    clauses = [_video_clause(o, rng) for o in _shuffled(objects, rng)]
    if len(clauses) == 2 and rng.random() < 0.5:
        return " while ".join(clauses)
    return _join(clauses)


def _video_caption_prefixed(objects: list[dict], rng: random.Random) -> str:
    counted = f"{NUMBER_WORDS[len(objects)]} {'object' if len(objects) == 1 else 'objects'}: "
    prefix = rng.choice(("in this video, ", "in the clip, ", counted))
    return prefix + _video_caption_clauses(objects, rng)


def video_captions(objects: list[dict], rng: random.Random) -> list[str]:
    """Five true captions that say how every object moves or changes."""
    return _pick_captions((_video_caption_clauses, _video_caption_prefixed), objects, rng)


def video_questions(objects: list[dict], rng: random.Random) -> list[dict]:
    """Questions whose answers need more than one frame: direction, change, appearance, motion count."""
    direction = [
        _vqa(
            rng.choice(("which way does the {} move?", "in which direction does the {} move?")).format(
                _name(o)
            ),
            o["motion"] if o["motion"] != "none" else "nowhere",
            "direction",
        )
        for o in objects
        if o["event"] is None
    ]
    events = {o["event"]["type"]: o for o in objects if o["event"]}
    change = [
        _vqa(f"does any object {verb}?", "yes" if kind in events else "no", "event")
        for kind, verb in (("color_change", "change color"), ("appear", "appear"), ("disappear", "disappear"))
    ]
    if "color_change" in events:
        obj = events["color_change"]
        change.append(_vqa(f"what color does the {_name(obj)} turn?", obj["event"]["to"], "color_change"))
    for kind in ("appear", "disappear"):
        if kind in events:
            change.append(_vqa(f"which shape {kind}s?", events[kind]["shape"], kind))
    moving = sum(o["motion"] != "none" for o in objects)
    count = [_vqa("how many objects move?", str(moving), "count_moving")]
    groups = [_shuffled(direction, rng), _shuffled(change, rng), count]
    return _round_robin(_shuffled(groups, rng), QUESTIONS_PER_VIDEO)


# ---------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        w = r / 3
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    if shape == "star":
        return [
            (
                cx + (r if k % 2 == 0 else r * 0.45) * math.cos(math.pi * (k / 5 - 0.5)),
                cy + (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi * (k / 5 - 0.5)),
            )
            for k in range(10)
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: list[float], radius: float, fill) -> None:
    cx, cy = center
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=fill)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark textured background (noise, stripes or blotches over a gradient) that keeps gray visible."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]
    image = rng.uniform(5, 40, 3) + ramp * rng.uniform(-20, 20, 3)
    texture = rng.integers(3)
    if texture == 0:
        image = image + rng.normal(0, 7, (size, size, 1))
    elif texture == 1:
        freq, tilt = rng.uniform(4, 12), rng.uniform(0, np.pi)
        image = image + 10 * np.sin(2 * np.pi * freq * (np.cos(tilt) * xs + np.sin(tilt) * ys))[..., None]
    else:
        blotches = rng.normal(0, 12, (8, 8, 3))
        image = image + np.kron(blotches, np.ones((size // 8 + 1, size // 8 + 1, 1)))[:size, :size]
    return np.clip(image, 0, 85).astype(np.uint8)


def _object_fill(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-10, 11, 3), 0, 255))


def render_image(scene: dict, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The RGB image and its mask (0 background, 1..6 = SHAPES index + 1) of an image scene."""
    size = scene["size"]
    image = Image.fromarray(_background(rng, size))
    mask = Image.new("L", (size, size), 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for obj in scene["objects"]:
        _draw_shape(draw, obj["shape"], obj["center"], obj["radius"], _object_fill(rng, obj["color"]))
        _draw_shape(mask_draw, obj["shape"], obj["center"], obj["radius"], SHAPES.index(obj["shape"]) + 1)
    grain = rng.integers(-3, 4, (size, size, 1), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8)), mask


def object_state(obj: dict, frame: int, frames: int) -> tuple[list[float], str] | None:
    """Centre and colour of a video object at `frame`, or None while it is not visible."""
    event = obj["event"] or {}
    if (event.get("type") == "appear" and frame < event["frame"]) or (
        event.get("type") == "disappear" and frame >= event["frame"]
    ):
        return None
    t = frame / (frames - 1)
    center = [s + (e - s) * t for s, e in zip(obj["start"], obj["end"])]
    color = event["to"] if event.get("type") == "color_change" and frame >= event["frame"] else obj["color"]
    return center, color


def render_video(scene: dict, rng: np.random.Generator) -> list[np.ndarray]:
    """The RGB frames of a video scene over a static textured background."""
    background = Image.fromarray(_background(rng, scene["size"]))
    shown = [o["color"] for o in scene["objects"]] + [
        o["event"]["to"] for o in scene["objects"] if o["event"] and o["event"]["type"] == "color_change"
    ]
    fills = {c: _object_fill(rng, c) for c in shown}
    frames = []
    for frame in range(scene["frames"]):
        image = background.copy()
        draw = ImageDraw.Draw(image)
        for obj in scene["objects"]:
            state = object_state(obj, frame, scene["frames"])
            if state:
                _draw_shape(draw, obj["shape"], state[0], obj["radius"], fills[state[1]])
        frames.append(np.asarray(image))
    return frames


# ---------------------------------------------------------------- per-item work (runs in the pool)


def _image_item(out_dir: Path, seed: int, split: str, scene: dict) -> dict:
    index = scene["image_id"]
    image, mask = render_image(scene, _np_rng(seed, split, index, "image"))
    image.save(out_dir / scene["image"], compress_level=1)
    mask.save(out_dir / scene["mask"], compress_level=1)
    rng = _rng(seed, split, index, "text")
    probe = binding_probe(scene["objects"], rng) if split == "test" else None
    return {
        "captions": image_captions(scene["objects"], rng),
        "questions": image_questions(scene["objects"], rng),
        "binding": probe,
    }


def _video_item(out_dir: Path, seed: int, split: str, scene: dict) -> dict:
    index = scene["video_id"]
    write_mp4(out_dir / scene["video"], render_video(scene, _np_rng(seed, split, index, "video")), VIDEO_FPS)
    rng = _rng(seed, split, index, "video-text")
    return {
        "captions": video_captions(scene["objects"], rng),
        "questions": video_questions(scene["objects"], rng),
    }


def _run_chunk(task: tuple) -> list[dict]:
    kind, out_dir, seed, split, scenes = task
    make = _image_item if kind == "image" else _video_item
    return [make(out_dir, seed, split, scene) for scene in scenes]


# ---------------------------------------------------------------- annotation files


def _image_annotations(split: str, scenes: list[dict], items: list[dict]) -> dict[str, list]:
    files: dict[str, list] = {}
    entries = [(s["image"], s["image_id"], item) for s, item in zip(scenes, items)]
    if split == "train":
        pairs = [
            {"image": im, "caption": c, "image_id": i} for im, i, item in entries for c in item["captions"]
        ]
        files["pretrain.json"] = files["retrieval_train.json"] = pairs
    else:
        files[f"retrieval_{split}.json"] = [
            {"image": im, "caption": item["captions"], "image_id": i} for im, i, item in entries
        ]
    files[f"vqa_{split}.json"] = [
        {"question_id": i * 100 + k, "image": im, "dataset": "shapes", **q}
        for im, i, item in entries
        for k, q in enumerate(item["questions"])
    ]
    if split != "test_novel":
        files[f"seg_{split}.json"] = [{"image": s["image"], "mask": s["mask"]} for s in scenes]
    if split == "test":
        files["binding_test.json"] = [
            {"image": im, "image_id": i, "caption": item["binding"][0], "swapped": item["binding"][1]}
            for im, i, item in entries
            if item["binding"]
        ]
    files[f"scenes_{split}.json"] = scenes
    return files


def _video_annotations(split: str, scenes: list[dict], items: list[dict]) -> dict[str, list]:
    return {
        f"video_{split}.json": [
            {"video": s["video"], "caption": item["captions"], "video_id": s["video_id"]}
            for s, item in zip(scenes, items)
        ],
        f"videoqa_{split}.json": [
            {"question_id": s["video_id"] * 100 + k, "video": s["video"], "dataset": "shapes", **q}
            for s, item in zip(scenes, items)
            for k, q in enumerate(item["questions"])
        ],
        f"video_scenes_{split}.json": scenes,
    }


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, sort_keys=True) + "\n")


# ---------------------------------------------------------------- entry point


def _check_arguments(out_dir: Path, images: int, videos: int, size: int, frames: int, workers) -> None:
    for name, value in (("images", images), ("videos", videos)):
        if not isinstance(value, int) or value < 0:
            raise DataError(f"ShapesWorld: {name} must be a whole number >= 0, got {value!r}")
    if not isinstance(size, int) or not 32 <= size <= 512:
        raise DataError(f"ShapesWorld: size must be an integer in [32, 512], got {size!r}")
    if not isinstance(frames, int) or frames < 2:
        raise DataError(f"ShapesWorld: frames must be an integer >= 2, got {frames!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise DataError(f"ShapesWorld: workers must be >= 1, got {workers!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"ShapesWorld: out directory {str(out_dir)!r} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"ShapesWorld: cannot create out directory {str(out_dir)!r}: {err.strerror}") from err
    if not os.access(out_dir, os.W_OK):
        raise DataError(f"ShapesWorld: out directory {str(out_dir)!r} is not writable")


def split_counts(images: int, videos: int) -> dict[str, dict[str, int]]:
    """Number of images and videos per split for `images` train images and `videos` train videos."""
    test_images = eval_count(images, 20, 10, 1000)
    eval_videos = eval_count(videos, 8, 8, 500)
    return {
        "train": {"images": images, "videos": videos},
        "val": {"images": test_images, "videos": eval_videos},
        "test": {"images": test_images, "videos": eval_videos},
        "test_novel": {"images": test_images, "videos": 0},
    }


def generate(
    out_dir,
    images: int = DEFAULT_IMAGES,
    videos: int = DEFAULT_VIDEOS,
    size: int = 64,
    frames: int = 16,
    seed: int = 0,
    workers: int | None = None,
) -> dict:
    """Write the ShapesWorld corpus under `out_dir` and return its summary (also in summary.json).

    The summary holds what was made, never how long it took, so one seed gives byte-identical files;
    callers time the call themselves (`tools/make_data.py` prints it, `tools/bench.py data` reports it).
    """
    out_dir = Path(out_dir)
    _check_arguments(out_dir, images, videos, size, frames, workers)
    counts = split_counts(images, videos)
    tasks = []
    for split in IMAGE_SPLITS:
        scenes = sample_image_scenes(split, counts[split]["images"], size, seed)
        tasks.append(("image", split, scenes))
    for split in VIDEO_SPLITS:
        tasks.append(
            ("video", split, sample_video_scenes(split, counts[split]["videos"], size, frames, seed))
        )
    folders = [f"{sub}/{split}" for sub in ("images", "masks") for split in IMAGE_SPLITS]
    for folder in [*folders, *(f"videos/{split}" for split in VIDEO_SPLITS), "annotations"]:
        (out_dir / folder).mkdir(parents=True, exist_ok=True)

    chunk = 64
    jobs = [
        (kind, out_dir, seed, split, scenes[i : i + chunk])
        for kind, split, scenes in tasks
        for i in range(0, len(scenes), chunk)
    ]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        results = [_run_chunk(job) for job in jobs]
    else:
        with Pool(workers) as pool:
            results = pool.map(_run_chunk, jobs, chunksize=1)

    items: dict[tuple[str, str], list[dict]] = {}
    for job, result in zip(jobs, results):
        items.setdefault((job[0], job[3]), []).extend(result)
    files: dict[str, list] = {
        "answer_list.json": list(IMAGE_ANSWERS),
        "videoqa_answer_list.json": list(VIDEO_ANSWERS),
    }
    for kind, split, scenes in tasks:
        make = _image_annotations if kind == "image" else _video_annotations
        files.update(make(split, scenes, items.get((kind, split), [])))
    for name, data in files.items():
        _write_json(out_dir / "annotations" / name, data)

    summary = {
        "params": {"images": images, "videos": videos, "size": size, "frames": frames, "seed": seed},
        "counts": {
            split: {
                **counts[split],
                "captions": CAPTIONS_PER_ITEM * counts[split]["images"],
                "image_questions": len(files.get(f"vqa_{split}.json", [])),
                "video_questions": len(files.get(f"videoqa_{split}.json", [])),
            }
            for split in IMAGE_SPLITS
        },
        "binding_probes": len(files["binding_test.json"]),
    }
    _write_json(out_dir / "annotations" / "summary.json", summary)
    return summary


# ---------------------------------------------------------------- webdataset shards of the train split

SHARD_SETS = {  # folder: (what it holds, its annotation files)
    "shards": ("images", ("pretrain.json", "vqa_train.json")),
    "video_shards": ("videos", ("video_train.json", "videoqa_train.json")),
}
MIN_SHARDS = 8  # so that 8 loader workers or ranks each get a shard
MAX_SHARD_SIZE = 1000


def write_shards(data_dir, workers: int = 1, shard_size: int | None = None,
                 quiet: bool = True) -> dict[str, dict]:
    """Write the train split of the corpus in `data_dir` as webdataset shards: `shards/` (images, their
    captions and VQA questions) and `video_shards/` (videos, captions, video QA). Returns each set's manifest.

    The default shard size gives at least `MIN_SHARDS` shards per set (at most 1000 samples each). Shards
    a previous call finished from the same annotations are kept (see `mmfm.data.convert`).
    """
    from mmfm.data import convert  # it imports torch (through the datasets); generating needs no torch

    data_dir = Path(data_dir)
    counts = json.loads((data_dir / "annotations" / "summary.json").read_text())["counts"]["train"]
    manifests = {}
    for folder, (kind, names) in SHARD_SETS.items():
        if not counts[kind]:
            continue
        files = [data_dir / "annotations" / name for name in names]
        records, bad = convert.read_source(files, "albef", root=data_dir)
        size = shard_size or max(1, min(MAX_SHARD_SIZE, math.ceil(len(records) / MIN_SHARDS)))
        manifests[folder], _ = convert.write_shards(records, data_dir / folder,
                                                    source=", ".join(map(str, files)), shard_size=size,
                                                    workers=workers, bad=bad, quiet=quiet)
    return manifests
