"""Video: decord reads PyAV-written MP4s, frame sampling, clamping of over-reported / short videos."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mmfm.data import (
    VideoQADataset,
    VideoRetrievalEvalDataset,
    VideoTextDataset,
    collate,
    eval_transform,
    frame_indices,
    load_clip,
)
from mmfm.data.transforms import UnreadableFile
from mmfm.data.video import read_frames
from mmfm.errors import DataError

FRAMES, HEIGHT, WIDTH, BAR = 16, 32, 64, 4


def bar_frames(num_frames=FRAMES):
    """A bright vertical bar moving right 4 px per frame on black: frame t has the bar at x = 4t."""
    frames = np.zeros((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(num_frames):
        frames[t, :, BAR * t: BAR * t + BAR] = 255
    return frames


def bar_x(frame):
    """Leftmost column of the bar in a (H, W, 3) or (3, H, W) frame."""
    columns = frame.float().mean(dim=(0, 2) if frame.shape[-1] == 3 else (0, 1))
    return int(torch.nonzero(columns > columns.max() / 2)[0])


@pytest.fixture
def bar_video(tmp_path, write_mp4):
    return write_mp4(tmp_path / "bar.mp4", bar_frames())


def test_uniform_indices_are_segment_centres():
    assert frame_indices(16, 4).tolist() == [2, 6, 10, 14]
    assert frame_indices(16, 16).tolist() == list(range(16))
    assert frame_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]  # short videos repeat frames


def test_random_indices_stay_in_their_segment():
    rng = np.random.default_rng(0)
    draws = np.stack([frame_indices(16, 4, "random", rng) for _ in range(50)])
    for segment in range(4):
        assert set(draws[:, segment].tolist()) == set(range(4 * segment, 4 * segment + 4))


def test_decord_reads_the_frames_asked_for(bar_video):
    clip = load_clip(bar_video, 4)
    assert clip.shape == (4, HEIGHT, WIDTH, 3) and clip.dtype == torch.uint8
    assert [bar_x(frame) for frame in clip] == [BAR * i for i in (2, 6, 10, 14)]


def test_short_video_repeats_frames(tmp_path, write_mp4):
    path = write_mp4(tmp_path / "short.mp4", bar_frames(3))
    clip = load_clip(path, 6)
    assert [bar_x(frame) for frame in clip] == [0, 0, 4, 4, 8, 8]


class OverReportingReader:
    """A reader whose len() claims more frames than decode (as decord does on some containers)."""

    def __init__(self, claimed, real):
        self.claimed, self.real = claimed, real
        self.calls = []

    def __len__(self):
        return self.claimed

    def get_batch(self, indices):
        self.calls.append(list(indices))
        if max(indices) >= self.real:
            raise RuntimeError("cannot seek past the end")
        return type("Batch", (), {"asnumpy": lambda _: np.array(indices)})()


def test_over_reported_frame_count_is_retried_with_fewer_frames():
    reader = OverReportingReader(claimed=40, real=25)
    indices = read_frames(reader, "fake.mp4", 4)
    assert reader.calls[0] == [5, 15, 25, 35] and len(reader.calls) == 3  # 40 → 30 → 22 frames
    assert indices.tolist() == frame_indices(22, 4).tolist()
    with pytest.raises(UnreadableFile, match="fake.mp4"):
        read_frames(OverReportingReader(claimed=40, real=0), "fake.mp4", 4)


def test_decord_width_bug_falls_back_to_pyav(tmp_path, write_mp4):
    frames = np.zeros((8, 32, 96, 3), np.uint8)  # decord2 fails on 96-px-wide frames
    frames[:, :, 40:44] = 255
    clip = load_clip(write_mp4(tmp_path / "w96.mp4", frames), 2)
    assert clip.shape == (2, 32, 96, 3) and bar_x(clip[0]) == 40


def test_video_datasets_round_trip(tmp_path, bar_video, write_json):
    ann = write_json(tmp_path / "v.json", [{"video": "bar.mp4", "caption": ["moves right", "a bar"],
                                            "video_id": "video0"}])
    ds = VideoTextDataset(ann, root=tmp_path, num_frames=4, transform=eval_transform(32))
    item = ds[0]
    assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
    assert item["text"] in ("moves right", "a bar") and (item["video_id"], item["index"]) == (0, 0)
    # the eval center crop keeps x in [16, 48): frame 1 (index 6) has its bar at 24 → 8 in the crop
    assert bar_x(item["video"][1]) == 8
    retrieval = VideoRetrievalEvalDataset(ann, root=tmp_path, num_frames=2, transform=eval_transform(32))
    assert retrieval.texts == ["moves right", "a bar"] and retrieval.txt2vid == [0, 0]
    assert retrieval[0]["video"].shape == (2, 3, 32, 32)
    qa = write_json(tmp_path / "qa.json", [{"video": "bar.mp4", "question": "where?", "answer": ["right"] * 3,
                                            "question_id": 3}])
    qa_item = VideoQADataset(qa, root=tmp_path, num_frames=2, transform=eval_transform(32),
                             answer_list=["left", "right"])[0]
    assert qa_item["target"].tolist() == pytest.approx([0.0, 0.9]) and qa_item["video"].shape == (2, 3, 32, 32)


def test_random_sampling_is_reproducible_per_index(tmp_path, bar_video, write_json):
    ann = write_json(tmp_path / "v.json", [{"video": "bar.mp4", "caption": "c"}])
    ds = VideoTextDataset(ann, root=tmp_path, num_frames=4, transform=eval_transform(32), sampling="random")
    assert torch.equal(ds[3]["video"], ds[3]["video"])
    assert any(not torch.equal(ds[0]["video"], ds[g]["video"]) for g in range(1, 6))


def test_bad_videos_are_skipped_or_raised(tmp_path, bar_video, write_json):
    data = Path(bar_video).read_bytes()
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.mp4").write_bytes(b"not a video\n" * 100)
    bad = ["missing.mp4", "zero.mp4", "truncated.mp4", "text.mp4"]
    ann = write_json(tmp_path / "v.json", [{"video": name, "caption": "c"} for name in ["bar.mp4", *bad]])
    ds = VideoTextDataset(ann, root=tmp_path, num_frames=2, transform=eval_transform(16))
    samples = []
    for index, name in enumerate(bad, start=1):
        with pytest.warns(UserWarning, match=name):
            samples.append(ds[index])
    batch = collate([ds[0], *samples])
    assert (batch["num_seen"], batch["num_bad"], batch["video"].shape) == (5, 4, (1, 2, 3, 16, 16))
    strict = VideoTextDataset(ann, root=tmp_path, num_frames=2, transform=eval_transform(16), on_error="raise")
    for index, name in enumerate(bad, start=1):
        with pytest.raises(DataError, match=name):
            strict[index]
