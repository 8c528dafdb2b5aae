"""EpochSampler resume, worker-independent augmentations, collate and the bad-sample tracker."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmfm.data import (
    BadSample,
    BadSampleTracker,
    EpochSampler,
    ImageTextDataset,
    collate,
    make_collate,
    train_transform,
)
from mmfm.errors import DataError

N = 8


def test_sampler_yields_global_indices_epoch_by_epoch():
    stream = list(EpochSampler(N, seed=3, num_epochs=3))
    assert len(stream) == 3 * N
    for epoch in range(3):
        chunk = stream[epoch * N:(epoch + 1) * N]
        assert sorted(chunk) == list(range(epoch * N, (epoch + 1) * N))
    assert [g % N for g in stream[:N]] != [g % N for g in stream[N:2 * N]]  # a new order each epoch
    assert list(EpochSampler(N, shuffle=False, num_epochs=1)) == list(range(N))
    assert list(EpochSampler(N, seed=4, num_epochs=1)) != stream[:N]


def test_sampler_resumes_mid_epoch():
    full = list(EpochSampler(N, seed=1, num_epochs=3))
    resumed = EpochSampler(N, seed=1, num_epochs=3)
    resumed.skip(11)
    assert resumed.epoch == 1 and len(resumed) == 3 * N - 11
    assert list(resumed) == full[11:]
    assert list(EpochSampler(N, seed=1, start=11, num_epochs=3)) == full[11:]
    infinite = iter(EpochSampler(N, seed=1, start=5))
    assert [next(infinite) for _ in range(30)] == list(EpochSampler(N, seed=1, num_epochs=5))[5:35]


def test_sampler_state_round_trip():
    sampler = EpochSampler(N, seed=2, start=13)
    other = EpochSampler(N)
    other.load_state_dict(sampler.state_dict())
    assert (other.start, other.seed) == (13, 2)
    with pytest.raises(DataError, match="8 samples"):
        EpochSampler(N + 1).load_state_dict(sampler.state_dict())


@pytest.fixture
def dataset(tmp_path, write_png, write_json):
    rng = np.random.default_rng(0)
    entries = []
    for i in range(N):
        write_png(tmp_path / f"{i}.png", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
        entries.append({"image": f"{i}.png", "caption": f"thing {i} on the left", "image_id": i})
    return ImageTextDataset(write_json(tmp_path / "a.json", entries), root=tmp_path,
                            transform=train_transform(16), seed=7)


def _samples(dataset, start, num_workers):
    loader = DataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=make_collate(),
                        sampler=EpochSampler(len(dataset), seed=5, start=start, num_epochs=2))
    images, texts = [], []
    for batch in loader:
        images.extend(batch["image"])
        texts.extend(batch["text"])
    return images, texts


def test_resume_gives_same_samples_regardless_of_workers(dataset):
    torch.manual_seed(0)
    np.random.seed(0)
    full_images, full_texts = _samples(dataset, start=0, num_workers=0)
    torch.manual_seed(123)  # process RNG state must not matter
    np.random.seed(123)
    resumed_images, resumed_texts = _samples(dataset, start=6, num_workers=2)
    assert resumed_texts == full_texts[6:]
    assert len(resumed_images) == 2 * N - 6
    assert all(torch.equal(a, b) for a, b in zip(resumed_images, full_images[6:]))
    assert not torch.equal(full_images[0], full_images[N])  # same image, another epoch: new augmentation


def whitespace_tokenizer(texts):
    words = [t.split() for t in texts]
    length = max(len(w) for w in words)
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for row, sentence in enumerate(words):
        ids[row, :len(sentence)] = torch.tensor([len(w) for w in sentence])
        mask[row, :len(sentence)] = True
    return ids, mask


def test_collate_stacks_lists_and_tokenizes():
    samples = [{"image": torch.zeros(3, 4, 4), "text": "a bb", "image_id": 1, "target": torch.ones(2),
                "answers": ["x"]},
               None,
               {"image": torch.ones(3, 4, 4), "text": "ccc", "image_id": 2, "target": torch.zeros(2),
                "answers": ["y", "z"]},
               BadSample("/data/broken.png", 4, "truncated")]
    batch = make_collate(whitespace_tokenizer, ("text",))(samples)
    assert batch["image"].shape == (2, 3, 4, 4) and batch["target"].shape == (2, 2)
    assert batch["image_id"].tolist() == [1, 2] and batch["text"] == ["a bb", "ccc"]
    assert batch["answers"] == [["x"], ["y", "z"]]
    assert batch["text_ids"].tolist() == [[1, 2], [3, 0]] and batch["text_mask"].tolist() == [[1, 1], [1, 0]]
    assert (batch["num_seen"], batch["num_bad"], batch["bad_files"]) == (4, 2, ["/data/broken.png"])
    ragged = collate([{"image": torch.zeros(3, 4, 8)}, {"image": torch.zeros(3, 8, 4)}])
    assert isinstance(ragged["image"], list) and [t.shape[1] for t in ragged["image"]] == [4, 8]
    assert pickle.loads(pickle.dumps(make_collate(whitespace_tokenizer)))(samples)["num_bad"] == 2


def test_tracker_aborts_above_the_fraction():
    tracker = BadSampleTracker(max_fraction=0.05, min_seen=100)
    tracker.update({"num_seen": 50, "num_bad": 4, "bad_files": ["/d/first.png"]})  # 8 %, below min_seen
    tracker.update({"num_seen": 50, "num_bad": 0, "bad_files": []})  # 4 %
    with pytest.raises(DataError, match=r"7 of 110 samples were unreadable \(first: /d/first.png\).*"
                                        r"data.max_bad_fraction=0.05"):
        tracker.update({"num_seen": 10, "num_bad": 3, "bad_files": ["/d/other.png"]})
    fine = BadSampleTracker(max_fraction=0.05, min_seen=100)
    fine.update({"num_seen": 200, "num_bad": 10, "bad_files": []})  # exactly 5 %: allowed
    assert (fine.num_seen, fine.num_bad) == (200, 10)
