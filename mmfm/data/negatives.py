"""Caption hard negatives for ITM: the same words, bound differently (NegCLIP-style swaps).

In-batch hard negatives (ALBEF) rarely differ from the positive only in which attribute goes with which
object, so ITM never has to learn binding from them. ``CaptionNegatives`` makes such a negative from the
caption itself, given groups of interchangeable words (colours, shapes, sizes, ...):

- swap two different words of one group ("a red circle and a blue square" -> "a blue circle and a red
  square"), accepted only if the caption's bigrams change, so a swap that yields the same description
  ("a red circle and a blue circle" -> "a blue circle and a red circle") is never called a negative;
- otherwise replace one group word by another word of its group ("a large red circle" -> "a large green
  circle").

With ``replace_prob`` p, a share p of the negatives is a one-word replacement whatever the caption. A
swap keeps every word, so the image can reject it by knowing which colour goes with which shape only
among the objects it holds; a replacement names an object that is not there ("a red circle" -> "a red
star"), so rejecting it needs the image to know what each object is.

Captions without any group word get no negative.
"""

import re
from collections import Counter
from itertools import pairwise

import numpy as np

_WORD = re.compile(r"[A-Za-z]+")


class CaptionNegatives:
    def __init__(self, word_groups: list[list[str]], replace_prob: float = 0.0):
        self.replace_prob = replace_prob
        self.group_of: dict[str, int] = {}
        self.groups = [sorted({w.lower() for w in group}) for group in word_groups]
        for index, group in enumerate(self.groups):
            if len(group) < 2:
                raise ValueError(f"negative word group {group} needs at least two words")
            for word in group:
                if self.group_of.setdefault(word, index) != index:
                    raise ValueError(f"word {word!r} is in two negative word groups")

    def __call__(self, caption: str, rng: np.random.Generator) -> str | None:
        spans = [m for m in _WORD.finditer(caption) if m.group().lower() in self.group_of]
        if not spans:
            return None
        if self.replace_prob > 0 and rng.random() < self.replace_prob:
            return self._replace(caption, spans, rng)
        return self._swap(caption, spans, rng) or self._replace(caption, spans, rng)

    def _swap(self, caption: str, spans: list[re.Match], rng: np.random.Generator) -> str | None:
        pairs = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
                 if self.group_of[a.group().lower()] == self.group_of[b.group().lower()]
                 and a.group().lower() != b.group().lower()]
        for choice in rng.permutation(len(pairs)):
            a, b = pairs[choice]
            swapped = (caption[:a.start()] + b.group() + caption[a.end():b.start()] + a.group()
                       + caption[b.end():])
            if _bigrams(swapped) != _bigrams(caption):
                return swapped
        return None

    def _replace(self, caption: str, spans: list[re.Match], rng: np.random.Generator) -> str:
        span = spans[int(rng.integers(len(spans)))]
        word = span.group().lower()
        others = [w for w in self.groups[self.group_of[word]] if w != word]
        other = others[int(rng.integers(len(others)))]
        return caption[:span.start()] + other + caption[span.end():]


def _bigrams(text: str) -> Counter:
    words = [w.lower() for w in _WORD.findall(text)]
    return Counter(pairwise(words))
