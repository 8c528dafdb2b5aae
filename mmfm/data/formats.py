"""Annotation formats: reading ALBEF/LAVIS-style JSON, converting real datasets, VQA answer scoring.

mmfm's own format is the ALBEF one (a JSON list of dicts, media paths relative to a `root`):

- image-text / retrieval train: ``{"image", "caption", "image_id"}``
- retrieval eval:  ``{"image", "caption": [k strings], "image_id"}`` (one entry per image)
- VQA:             ``{"question_id", "question", "answer": [...], "image", "dataset", "question_type"?}``
- video:           ``{"video", "caption": str | [..], "video_id"?}`` (video QA: VQA with ``"video"``)
- segmentation:    ``{"image", "mask"}``
- binding probes:  ``{"image", "caption", "swapped", "image_id"}``

Each format has a map-style dataset here (video ones in `mmfm.data.video`); all derive their
randomness from (seed, global index) — see `AnnotationDataset`.

Real datasets are converted to it: `load_vqav2` (official questions + annotations files) and
`load_msrvtt` (MSRVTT-style video JSON). `strip_punctuation` and `normalize_answer` are the official
VQAv2 evaluator's answer processing (github.com/GT-Vision-Lab/VQA, vqaEval.py); `vqa_soft_scores`
turns annotator counts into that evaluator's accuracy.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmfm.data.transforms import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIDEO_PIXELS,
    ImageTransform,
    UnreadableFile,
    load_image,
    load_mask,
    swap_left_right,
)
from mmfm.errors import DataError

# --- the official VQAv2 evaluator's answer normalisation (vqaEval.py), tables copied as data ---

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def strip_punctuation(text: str) -> str:
    """Official `processPunctuation`: drop or space out punctuation, strip periods not before a digit.

    Each mark is deleted everywhere when it stands next to a space somewhere in the text or the text
    has a comma between digits ("1,000" → "1000"); otherwise each occurrence becomes a space
    ("t-shirt" → "t shirt").
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # sic: the official code passes re.UNICODE as count


def _digits_articles_contractions(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words → digits, drop articles, contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Normalise a VQA answer as the official VQAv2 evaluator normalises a prediction.

    The evaluator processes ground truths less (see `mmfm.evaluation.vqa.vqa_accuracy`).
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(strip_punctuation(text))


# Official accuracy of predicting an answer that c of 10 annotators gave: (c·min(1, (c−1)/3) +
# (10−c)·min(1, c/3)) / 10 = 0.3, 0.6, 0.9, 1.0 for c = 1, 2, 3, ≥4 (BUTD / ViLT soft scores).
_SCORE_BY_COUNT = {1: 0.3, 2: 0.6, 3: 0.9}


def vqa_soft_scores(answers: list[str]) -> dict[str, float]:
    """Training soft score per distinct normalised answer: 0.3, 0.6, 0.9, 1.0 for 1, 2, 3, ≥4 annotators.

    The count→score map is the official accuracy that predicting the answer earns (min(c/3, 1) would
    give more for c ≤ 3). Unlike the evaluator, both the annotators' answers and the
    answer list (`VQADataset.answer_index`) go through `normalize_answer`, so "Two" and "2" pool
    their votes on the one class the model can output.
    """
    counts = Counter(normalize_answer(a) for a in answers)
    return {answer: _SCORE_BY_COUNT.get(count, 1.0) for answer, count in counts.items()}


def answer_index(answer_list: list[str]) -> dict[str, int]:
    """Normalised answer -> its class in `answer_list` (the first one when two normalise alike)."""
    index: dict[str, int] = {}
    for k, answer in enumerate(answer_list):
        index.setdefault(normalize_answer(answer), k)
    return index


def answer_target(answers: list[str], index: dict[str, int], size: int) -> torch.Tensor:
    """Soft-score vector (size,) over an answer list for annotator `answers`; answers off the list get none."""
    target = torch.zeros(size)
    for answer, score in vqa_soft_scores(answers).items():
        if answer in index:
            target[index[answer]] = score
    return target


# --- reading annotation files ---

def load_annotations(ann_file: str | os.PathLike) -> list[dict]:
    """Read an mmfm/ALBEF annotation file: a JSON list of dicts. Raises DataError naming the file."""
    data = read_json(ann_file)
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise DataError(f"{ann_file}: expected a JSON list of objects (ALBEF annotation format); "
                        f"convert the file first (see mmfm.data.load_vqav2 / load_msrvtt)")
    return data


def read_json(path: str | os.PathLike):
    """`json.load` with a DataError naming the file when it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}; check the path (and data root) in the config")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); fix or regenerate the file") from err


def resolve(root: str | os.PathLike | None, path: str) -> str:
    """A media path from an annotation, joined to `root` unless it is absolute."""
    if root is None or os.path.isabs(path):
        return path
    return os.path.join(root, path)


def require_keys(entry: dict, keys: tuple[str, ...], ann_file, index: int) -> None:
    """Raise DataError if an annotation entry lacks one of `keys`."""
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DataError(f"{ann_file}: entry {index} lacks key(s) {missing} (has {sorted(entry)}); "
                        f"fix the annotation file")


def captions_of(entry: dict) -> list[str]:
    """The captions of an entry as a list (a single string caption becomes a one-item list)."""
    caption = entry["caption"]
    return [caption] if isinstance(caption, str) else list(caption)


def contiguous_ids(values: list) -> list[int]:
    """Map arbitrary ids (strings like "coco_391895", ints) to 0, 1, 2, ... in order of first appearance."""
    mapping: dict = {}
    return [mapping.setdefault(v, len(mapping)) for v in values]


# --- converters for real datasets ---

def load_vqav2(questions_file, annotations_file, image_dir) -> list[dict]:
    """Official VQAv2 ``questions`` + ``annotations`` JSON → ALBEF VQA entries (10 answers each).

    Image paths are ``image_dir/COCO_<data_subtype>_<id:012d>.jpg`` (the official naming); when only
    ``<id:012d>.jpg`` exists in `image_dir` (COCO 2017 layout) that name is used instead.
    """
    questions = read_json(questions_file)
    annotations = read_json(annotations_file)
    try:
        by_qid = {a["question_id"]: a for a in annotations["annotations"]}
        subtype = questions.get("data_subtype", annotations.get("data_subtype", "train2014"))
        entries = [_vqav2_entry(q, by_qid[q["question_id"]], image_dir, subtype)
                   for q in questions["questions"]]
    except (KeyError, TypeError) as err:
        raise DataError(f"{questions_file} / {annotations_file}: not an official VQAv2 questions/annotations "
                        f"pair (missing {err}); pass the matching v2_OpenEnded_*_questions.json and "
                        f"v2_mscoco_*_annotations.json") from err
    return entries


def _vqav2_entry(question: dict, annotation: dict, image_dir, subtype: str) -> dict:
    image_id = question["image_id"]
    return {
        "question_id": question["question_id"],
        "question": question["question"],
        "answer": [a["answer"] for a in annotation["answers"]],
        "image": _coco_image_path(image_dir, subtype, image_id),
        "image_id": image_id,
        "dataset": "vqa",
        "question_type": annotation.get("question_type", ""),
        "answer_type": annotation.get("answer_type", ""),
    }


def _coco_image_path(image_dir, subtype: str, image_id: int) -> str:
    official = os.path.join(image_dir, f"COCO_{subtype}_{image_id:012d}.jpg")
    plain = os.path.join(image_dir, f"{image_id:012d}.jpg")
    return plain if not os.path.exists(official) and os.path.exists(plain) else official


def load_msrvtt(json_file, video_dir, ext: str = ".mp4") -> list[dict]:
    """MSRVTT-style video JSON → ``[{"video", "caption": [..], "video_id"}]``, one entry per video.

    Accepts a list of ``{"video_id": "video7", "caption": str | [..]}`` or ``{"video": "video7.mp4", ...}``,
    and the MSRVTT_data.json shape ``{"sentences": [{"video_id", "caption"}], "videos": [...]}``.
    Captions of the same video are gathered in file order; videos keep their first-seen order.
    """
    data = read_json(json_file)
    rows = data["sentences"] if isinstance(data, dict) and "sentences" in data else data
    if not isinstance(rows, list):
        raise DataError(f"{json_file}: expected a list of captions or an MSRVTT_data.json "
                        f"with a 'sentences' list")
    captions: dict[str, list[str]] = {}
    files: dict[str, str] = {}
    for index, row in enumerate(rows):
        video_id, file_name = _msrvtt_video_id(row, json_file, index, ext)
        files.setdefault(video_id, file_name)
        captions.setdefault(video_id, []).extend(captions_of(row))
    return [{"video": os.path.join(video_dir, files[v]), "caption": caps, "video_id": v}
            for v, caps in captions.items()]


def _msrvtt_video_id(row: dict, json_file, index: int, ext: str) -> tuple[str, str]:
    if not isinstance(row, dict) or "caption" not in row or not ("video_id" in row or "video" in row):
        raise DataError(f"{json_file}: entry {index} needs 'caption' and 'video_id' or 'video'; "
                        f"fix the file")
    if "video" in row:
        file_name = str(row["video"])
        return Path(file_name).stem, file_name
    video_id = str(row["video_id"])
    return video_id, video_id + ext


# --- datasets ---

ON_ERROR_MODES = ("skip", "raise")


class BadSample:
    """What a dataset returns for an unreadable sample (falsy, like None); `collate` drops and counts it."""

    __slots__ = ("index", "path", "reason")

    def __init__(self, path: str, index: int, reason: str):
        self.path, self.index, self.reason = path, index, reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"BadSample({self.path!r}, index={self.index}, reason={self.reason!r})"


class AnnotationDataset(Dataset):
    """Map-style dataset over an annotation list; base of every mmfm dataset.

    `dataset[g]` accepts any int g (a global sample index from `EpochSampler`): the entry is `g % len`
    and all augmentation randomness comes from `numpy.random.default_rng([seed, g])`, so a sample is
    the same whatever the worker count or process RNG state. Unreadable media give a warning and a
    falsy `BadSample` (on_error="skip") or a DataError (on_error="raise"); so do media over the limits,
    `max_pixels` per image or video frame and `max_video_pixels` per decoded clip (T x H x W, video
    datasets), both checked from the file's header before decoding.
    """

    media_key = "image"
    required_keys: tuple[str, ...] = ()

    def __init__(self, ann_file, root=None, transform: ImageTransform | None = None, *, seed: int = 0,
                 on_error: str = "skip", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS):
        if on_error not in ON_ERROR_MODES:
            raise ValueError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
        self.ann_file = "<annotation list>" if isinstance(ann_file, list) else str(ann_file)
        self.entries = ann_file if isinstance(ann_file, list) else load_annotations(ann_file)
        self.root = root
        self.transform = transform or ImageTransform()
        self.seed = seed
        self.on_error = on_error
        self.max_pixels, self.max_video_pixels = max_pixels, max_video_pixels
        if not self.entries:
            raise DataError(f"{self.ann_file}: no entries; point the config at a non-empty annotation file")
        for index, entry in enumerate(self.entries):
            require_keys(entry, (self.media_key, *self.required_keys), self.ann_file, index)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, g: int):
        g = int(g)
        index = g % len(self.entries)
        try:
            return self.load(index, np.random.default_rng([self.seed, g]))
        except UnreadableFile as err:
            return self._bad_sample(err, index)

    def load(self, index: int, rng: np.random.Generator) -> dict:
        """Build sample `index` using only `rng` for randomness."""
        raise NotImplementedError

    def load_media(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
        """Decode and transform the entry's image → (tensor (3, H, W), whether it was flipped)."""
        img = load_image(resolve(self.root, self.entries[index]["image"]), self.max_pixels)
        geom = self.transform.sample(img.width, img.height, rng)
        return self.transform.image(img, geom), geom.flip

    def _bad_sample(self, err: UnreadableFile, index: int) -> BadSample:
        where = f"{self.ann_file} entry {index}"
        if self.on_error == "raise":
            raise DataError(f"{where}: unreadable file {err.path} ({err.reason}); fix or remove the file, "
                            f"or set on_error='skip' to skip unreadable samples") from err
        warnings.warn(f"skipping unreadable file {err.path} ({where}): {err.reason}", stacklevel=2)
        return BadSample(err.path, index, err.reason)


def choose(items: list, rng: np.random.Generator):
    """One item; a draw from `rng` only when there is a choice."""
    return items[int(rng.integers(len(items)))] if len(items) > 1 else items[0]


def maybe_swap(text: str, flipped: bool) -> str:
    return swap_left_right(text) if flipped else text


def answers_of(entry: dict, flipped: bool) -> list[str]:
    """A VQA entry's annotator answers (one string or a list), left/right swapped for a flipped image."""
    answers = entry.get("answer", [])
    return [maybe_swap(a, flipped) for a in ([answers] if isinstance(answers, str) else answers)]


class ImageTextDataset(AnnotationDataset):
    """Pretrain / retrieval-train pairs ``{"image", "caption", "image_id"}`` → image, text, image_id, index.

    A caption list yields one random caption per draw. image_id values (any hashable) are mapped to
    contiguous ints (same image → same id, as ITM negative masking needs). With ``negatives`` (a
    ``CaptionNegatives``) a sample also carries ``negative_text`` ("" when the caption has none) and
    ``has_negative``. With ``questions`` (a ``QuestionBank``) it also carries one of its image's questions
    (``question``, ``target``, ``has_question``), so one vision forward serves alignment and answering.
    """

    required_keys = ("caption",)

    def __init__(self, ann_file, root=None, transform=None, negatives=None, questions=None, **kwargs):
        super().__init__(ann_file, root, transform, **kwargs)
        self.image_ids = contiguous_ids([e.get(f"{self.media_key}_id", e[self.media_key]) for e in self.entries])
        self.negatives = negatives
        self.questions = questions

    def load(self, index, rng):
        media, flipped = self.load_media(index, rng)
        text = maybe_swap(choose(captions_of(self.entries[index]), rng), flipped)
        sample = {self.media_key: media, "text": text, f"{self.media_key}_id": self.image_ids[index], "index": index}
        if self.negatives is not None:
            negative = self.negatives(text, rng)
            sample["negative_text"], sample["has_negative"] = negative or "", negative is not None
        if self.questions is not None:
            sample.update(self.questions.draw(self.entries[index][self.media_key], flipped, rng))
        return sample


class RetrievalEvalDataset(AnnotationDataset):
    """Retrieval eval, one entry per image with k captions. Items are images; texts are attributes.

    `texts[t]` is caption t, `txt2img[t]` its image index, `img2txt[i]` the caption indices of image i.
    """

    required_keys = ("caption",)

    def __init__(self, ann_file, root=None, transform=None, **kwargs):
        super().__init__(ann_file, root, transform, **kwargs)
        self.image_ids = contiguous_ids([e.get(f"{self.media_key}_id", e[self.media_key]) for e in self.entries])
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for index, entry in enumerate(self.entries):
            captions = captions_of(entry)
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            self.texts.extend(captions)
            self.txt2img.extend([index] * len(captions))

    def load(self, index, rng):
        media, _ = self.load_media(index, rng)
        return {self.media_key: media, f"{self.media_key}_id": self.image_ids[index], "index": index}


class VQADataset(AnnotationDataset):
    """VQA (ALBEF json) → image, question, answers, soft-score target over `answer_list`, ids.

    `target[k]` = the soft score of answer_list[k] (`vqa_soft_scores`: 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 /
    3 / ≥4 annotators, after `normalize_answer`); answers outside the list get no target mass. `answer_list` is a list or a JSON file (a list).
    A horizontal flip swaps left/right in the question and the answers.
    """

    required_keys = ("question",)

    def __init__(self, ann_file, root=None, transform=None, answer_list=None, **kwargs):
        super().__init__(ann_file, root, transform, **kwargs)
        if answer_list is not None and not isinstance(answer_list, list):
            answer_list = read_json(answer_list)
        self.answer_list: list[str] = answer_list or []
        self.answer_index = answer_index(self.answer_list)

    def load(self, index, rng):
        entry = self.entries[index]
        media, flipped = self.load_media(index, rng)
        answers = answers_of(entry, flipped)
        return {self.media_key: media, "question": maybe_swap(entry["question"], flipped),
                "answers": answers, "target": self.target(answers),
                "question_id": entry.get("question_id", index),
                "question_type": entry.get("question_type", ""), "index": index}

    def target(self, answers: list[str]) -> torch.Tensor:
        """Soft-score vector over the answer list for these annotator answers."""
        return answer_target(answers, self.answer_index, len(self.answer_list))


class QuestionBank:
    """The questions of a VQA dataset grouped by media path, for image-text samples to carry.

    ``draw(path, flipped, rng)`` -> ``question`` (left/right swapped when the image was flipped), its
    soft-score ``target`` over the VQA dataset's answer list and ``has_question``; a path without
    questions gives an empty question, a zero target and ``has_question=False``. No media are read here.
    """

    def __init__(self, vqa: VQADataset):
        self.vqa = vqa
        self.by_media: dict[str, list[int]] = {}
        for index, entry in enumerate(vqa.entries):
            self.by_media.setdefault(entry[vqa.media_key], []).append(index)

    def draw(self, media: str, flipped: bool, rng: np.random.Generator) -> dict:
        indices = self.by_media.get(media)
        if not indices:
            return {"question": "", "target": torch.zeros(len(self.vqa.answer_list)), "has_question": False}
        entry = self.vqa.entries[choose(indices, rng)]
        target = self.vqa.target(answers_of(entry, flipped))
        return {"question": maybe_swap(entry["question"], flipped), "target": target, "has_question": True}


class SegmentationDataset(AnnotationDataset):
    """``{"image", "mask"}`` → image and LongTensor mask (H, W); the same crop/flip applies to both."""

    required_keys = ("mask",)

    def load(self, index, rng):
        entry = self.entries[index]
        img = load_image(resolve(self.root, entry["image"]), self.max_pixels)
        mask_path = resolve(self.root, entry["mask"])
        mask = load_mask(mask_path, self.max_pixels)
        if mask.size != img.size:
            raise UnreadableFile(mask_path, f"mask is {mask.size[0]}x{mask.size[1]} but the image is "
                                            f"{img.width}x{img.height}")
        geom = self.transform.sample(img.width, img.height, rng)
        return {"image": self.transform.image(img, geom), "mask": self.transform.mask(mask, geom),
                "index": index}


class BindingDataset(AnnotationDataset):
    """Binding probes ``{"image", "caption", "swapped", "image_id"}`` (a caption and its attribute-swapped twin)."""

    required_keys = ("caption", "swapped")

    def load(self, index, rng):
        entry = self.entries[index]
        media, flipped = self.load_media(index, rng)
        return {"image": media, "caption": maybe_swap(entry["caption"], flipped),
                "swapped": maybe_swap(entry["swapped"], flipped),
                "image_id": entry.get("image_id", index), "index": index}
