"""The best image-text retrieval any model can reach on a ShapesWorld test split.

`python tools/bench.py retrieval_ceiling --json F [--data data/shapes] [--split test|test_novel]`

Many ShapesWorld captions are partial ("a single object, a purple diamond" gives no size or position), so
several test images can be truthfully described by the same caption. This enumerates every caption the
generator can write for each test scene (every branch of every template), then, for each of the 5k test
captions, counts the test images that could have been given exactly that string. An oracle that knows what
every caption means but must guess among equally consistent images gets:

* `img_r1` (text -> image) = mean over captions of 1 / (number of consistent images);
* `txt_r1` (image -> text): the oracle ranks the captions consistent with the image by specificity
  (fewest consistent images first) and is right with the probability that a uniformly chosen one of the
  most specific ties is one of the image's own;
* `img_r5` likewise with min(1, 5 / consistent images).
"""

import itertools
import json
import math
from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", choices=("test", "test_novel"), default="test")


class _ScriptedRng:
    """A stand-in for random.Random that follows a script of branch indices and records each branch's
    arity, so that a depth-first walk over scripts visits every output of a caption template once."""

    def __init__(self, script: list[int]):
        self.script, self.arities = script, []

    def _pick(self, arity: int) -> int:
        position = len(self.arities)
        if position == len(self.script):
            self.script.append(0)
        self.arities.append(arity)
        return self.script[position]

    def choice(self, options):
        return options[self._pick(len(options))]

    def random(self) -> float:
        # The templates only compare random() with thresholds in (0, 1): 0.0 and 0.999 take both sides.
        return (0.0, 0.999)[self._pick(2)]

    def shuffle(self, items: list) -> None:
        permutation = next(itertools.islice(itertools.permutations(list(items)),
                                            self._pick(math.factorial(len(items))), None))
        items[:] = permutation


def every_output(template, objects: list[dict]) -> set[str]:
    outputs, script = set(), []
    while True:
        rng = _ScriptedRng(script)
        outputs.add(template(objects, rng))
        script = rng.script[:len(rng.arities)]
        while script and script[-1] + 1 == rng.arities[len(script) - 1]:
            script.pop()
        if not script:
            return outputs
        script[-1] += 1


def possible_captions(objects: list[dict]) -> set[str]:
    from mmfm.data import shapes

    templates = (shapes._caption_list, shapes._caption_count, shapes._caption_relation,
                 shapes._caption_positions)
    return {caption for template in templates for caption in every_output(template, objects)
            if len(caption.split()) <= shapes.MAX_CAPTION_WORDS}


def ceilings(scenes: list[dict], test: list[dict]) -> dict:
    can_say: dict[str, set[int]] = {}
    for index, scene in enumerate(scenes):
        for caption in possible_captions(scene["objects"]):
            can_say.setdefault(caption, set()).add(index)
    owner = {scene["image"]: index for index, scene in enumerate(scenes)}
    pairs = [(owner[entry["image"]], caption) for entry in test for caption in entry["caption"]]
    missing = [caption for _, caption in pairs if caption not in can_say]
    if missing:
        raise SystemExit(f"retrieval_ceiling: {len(missing)} test captions were not re-derived, e.g. {missing[0]!r}")
    consistent = [len(can_say[caption]) for _, caption in pairs]
    own = {}
    for image, caption in pairs:
        own.setdefault(image, set()).add(caption)
    txt_hits = []
    for image, captions in own.items():
        candidates = [caption for _, caption in pairs if image in can_say[caption]]
        best = min(len(can_say[caption]) for caption in candidates)
        top = [caption for caption in candidates if len(can_say[caption]) == best]
        txt_hits.append(sum(caption in captions for caption in top) / len(top))
    return {
        "img_r1": round(100 * sum(1 / n for n in consistent) / len(consistent), 2),
        "img_r5": round(100 * sum(min(1.0, 5 / n) for n in consistent) / len(consistent), 2),
        "txt_r1": round(100 * sum(txt_hits) / len(txt_hits), 2),
        "captions_with_one_image": round(100 * sum(n == 1 for n in consistent) / len(consistent), 2),
        "mean_consistent_images": round(sum(consistent) / len(consistent), 2),
        "max_consistent_images": max(consistent),
    }


def run(args) -> dict:
    annotations = args.data / "annotations"
    scenes = json.loads((annotations / f"scenes_{args.split}.json").read_text())
    test = json.loads((annotations / f"retrieval_{args.split}.json").read_text())
    return {"split": args.split, "images": len(test), "captions": sum(len(e["caption"]) for e in test),
            **ceilings(scenes, test)}
