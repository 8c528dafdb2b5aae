"""`EpochSampler`: a resumable, deterministic stream of global sample indices.

It yields `g = epoch * N + perm_epoch[i]`, the permutation drawn from a torch.Generator seeded by
(seed, epoch). Datasets map g to entry `g % N` and seed their augmentations with g, so a sample's
content depends only on (seed, g): a run killed after k samples and restarted with `start=k` (or
`skip(k)`) sees the same remaining samples with the same augmentations, whatever the worker count.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from mmfm.errors import DataError


def epoch_permutation(dataset_len: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of epoch `epoch`: a permutation seeded by (seed, epoch), or 0..N-1 without shuffle."""
    if not shuffle:
        return torch.arange(dataset_len)
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
    return torch.randperm(dataset_len, generator=torch.Generator().manual_seed(mixed))


class EpochSampler(Sampler[int]):
    """Global indices epoch after epoch (forever, or `num_epochs`), starting at sample position `start`.

    `start` / `skip(n)` count samples already consumed over all epochs (e.g. steps × global batch);
    iterating always begins at the current position, so re-iterating repeats the same stream.
    """

    def __init__(self, dataset_len: int, seed: int = 0, shuffle: bool = True, start: int = 0,
                 num_epochs: int | None = None):
        if dataset_len <= 0:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got dataset_len={dataset_len}")
        self.dataset_len = dataset_len
        self.seed = seed
        self.shuffle = shuffle
        self.start = start
        self.num_epochs = num_epochs

    def skip(self, n_samples: int) -> None:
        """Advance the start position by `n_samples` (resume mid-epoch)."""
        self.start += n_samples

    @property
    def epoch(self) -> int:
        """The epoch the next sample belongs to."""
        return self.start // self.dataset_len

    def __iter__(self) -> Iterator[int]:
        first_epoch, offset = divmod(self.start, self.dataset_len)
        epochs = itertools.count(first_epoch) if self.num_epochs is None else range(first_epoch, self.num_epochs)
        for epoch in epochs:
            order = epoch_permutation(self.dataset_len, self.seed, epoch, self.shuffle)
            base = epoch * self.dataset_len
            yield from (base + order[offset:]).tolist()
            offset = 0

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an EpochSampler without num_epochs is infinite and has no len()")
        return max(0, self.num_epochs * self.dataset_len - self.start)

    def state_dict(self) -> dict:
        """Position and settings, for checkpoints."""
        return {"dataset_len": self.dataset_len, "seed": self.seed, "shuffle": self.shuffle, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict` (the dataset length must match)."""
        if state["dataset_len"] != self.dataset_len:
            raise DataError(f"sampler state is for {state['dataset_len']} samples but the dataset has "
                            f"{self.dataset_len}; resume with the same data or start a new run")
        self.seed, self.shuffle, self.start = state["seed"], state["shuffle"], state["start"]
