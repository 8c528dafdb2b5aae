"""Batching: `collate` (drops unreadable samples, counts them, tokenizes texts) and `BadSampleTracker`.

A batch is a dict: equal-size tensors stacked, different-size ones (native aspect) kept as a list,
numbers as tensors, strings and other values as lists, plus `num_seen` (samples asked for),
`num_bad` (unreadable ones dropped) and `bad_files`. With a text tokenizer
(`tokenizer(list[str]) -> (LongTensor ids (B, L), BoolTensor mask (B, L))`), every text key K also
gets `K_ids` and `K_mask`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from mmfm.data.formats import BadSample
from mmfm.errors import DataError

TextTokenizer = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def collate(samples: Sequence[dict | None], text_tokenizer: TextTokenizer | None = None,
            text_keys: Sequence[str] = ("text",)) -> dict:
    """Merge dataset samples into a batch; None / BadSample entries are dropped and counted."""
    good = [s for s in samples if s]
    batch = {"num_seen": len(samples), "num_bad": len(samples) - len(good),
             "bad_files": [s.path for s in samples if isinstance(s, BadSample)]}
    if not good:
        return batch
    for key in good[0]:
        batch[key] = merge([s[key] for s in good])
    if text_tokenizer is not None:
        for key in text_keys:
            if key in batch:
                batch[f"{key}_ids"], batch[f"{key}_mask"] = text_tokenizer(batch[key])
    return batch


def merge(values: list):
    """Stack tensors of one shape (else keep a list); numbers → tensor; anything else → list."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        same_shape = all(v.shape == first.shape for v in values)
        return torch.stack(values) if same_shape else list(values)
    if isinstance(first, bool):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, int) and all(isinstance(v, int) for v in values):
        return torch.tensor(values, dtype=torch.long)
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float32)
    return list(values)


def make_collate(text_tokenizer: TextTokenizer | None = None, text_keys: Sequence[str] = ("text",)):
    """A picklable collate_fn for DataLoader workers (the tokenizer must be picklable too)."""
    return functools.partial(collate, text_tokenizer=text_tokenizer, text_keys=tuple(text_keys))


class BadSampleTracker:
    """Counts unreadable samples over a run; raises DataError once they exceed `max_fraction`.

    Call `update(batch)` on every collated batch; the check starts after `min_seen` samples.
    """

    def __init__(self, max_fraction: float = 0.01, min_seen: int = 100):
        self.max_fraction = max_fraction
        self.min_seen = min_seen
        self.num_seen = 0
        self.num_bad = 0
        self.first_bad: str | None = None

    def update(self, batch: dict) -> None:
        """Add a batch's counts, then `check()`."""
        self.num_seen += batch["num_seen"]
        self.num_bad += batch["num_bad"]
        if self.first_bad is None and batch.get("bad_files"):
            self.first_bad = batch["bad_files"][0]
        self.check()

    def check(self) -> None:
        """Raise DataError when more than `max_fraction` of at least `min_seen` samples were unreadable."""
        if self.num_seen >= self.min_seen and self.num_bad > self.max_fraction * self.num_seen:
            raise DataError(f"{self.num_bad} of {self.num_seen} samples were unreadable "
                            f"(first: {self.first_bad or 'unknown'}) — more than "
                            f"data.max_bad_fraction={self.max_fraction}; fix or remove them")

    def state_dict(self) -> dict:
        return {"num_seen": self.num_seen, "num_bad": self.num_bad, "first_bad": self.first_bad}

    def load_state_dict(self, state: dict) -> None:
        self.num_seen, self.num_bad, self.first_bad = state["num_seen"], state["num_bad"], state["first_bad"]
