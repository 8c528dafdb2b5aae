"""Media limits: video frame / clip pixel limits before and after decoding, truncated-video warnings,
the config keys that set the limits, and the server's decode budget for concurrent uploads."""

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from inference_fixtures import *

from mmfm.cli import main
from mmfm.config import DataConfig, load_config
from mmfm.data import VideoTextDataset, collate, eval_transform, load_clip, video
from mmfm.data.transforms import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VIDEO_PIXELS, UnreadableFile
from mmfm.errors import ConfigError, DataError, InputError
from mmfm.inference.server import create_app
from mmfm.tasks.base import dataset_kwargs

BIG = 1024  # frame side of the "large" test video: 1 Mpixel per frame, cheap to encode, over a tiny limit


def _frames(count, height, width, bar_width=4):
    """A bright bar moving right one bar width per frame, on grey."""
    frames = np.full((count, height, width, 3), 60, np.uint8)
    for t in range(count):
        frames[t, :, bar_width * t: bar_width * (t + 1)] = 255
    return frames


@pytest.fixture
def big_video(tmp_path, write_mp4):
    return write_mp4(tmp_path / "big.mp4", _frames(2, BIG, BIG, 64))


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any frame decoding (decord or the PyAV fallback) fail the test."""
    def decoded(*_args, **_kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(video, "open_video", decoded)
    monkeypatch.setattr(video, "_decode_pyav", decoded)


def _truncate(path, keep=0.6):
    data = Path(path).read_bytes()
    truncated = Path(path).with_name("truncated_" + Path(path).name)
    truncated.write_bytes(data[: int(len(data) * keep)])
    return str(truncated)


# ---- data: limits before and after decoding ----------------------------------------------------------

def test_probe_reads_size_and_declared_frames_from_the_header(tmp_path, write_mp4, big_video, no_decoding):
    assert video.probe_video(big_video) == video.VideoInfo(BIG, BIG, 2, fps=8.0)
    mkv = write_mp4(tmp_path / "clip.mkv", _frames(24, 32, 64))  # MKV: no count, duration x frame rate
    assert video.probe_video(mkv, max_pixels=100) == video.VideoInfo(64, 32, 24, fps=8.0)


def test_video_over_the_frame_limit_is_a_bad_sample_and_is_not_decoded(tmp_path, write_mp4, write_json,
                                                                      big_video, monkeypatch):
    write_mp4(tmp_path / "small.mp4", _frames(4, 32, 64))
    ann = write_json(tmp_path / "v.json", [{"video": "small.mp4", "caption": "c"}, {"video": "big.mp4", "caption": "c"}])
    kwargs = {"root": tmp_path, "num_frames": 2, "transform": eval_transform(16), "max_pixels": 512 * 512}
    ds = VideoTextDataset(ann, **kwargs)
    good = ds[0]
    monkeypatch.setattr(video, "open_video", lambda *_: pytest.fail("decord opened an over-limit video"))
    monkeypatch.setattr(video, "_decode_pyav", lambda *_: pytest.fail("PyAV decoded an over-limit video"))
    with pytest.warns(UserWarning, match="big.mp4"):
        bad = ds[1]
    assert "decompression bomb: 1024x1024" in bad.reason and "data.max_pixels" in bad.reason
    batch = collate([good, bad])
    assert (batch["num_seen"], batch["num_bad"], batch["bad_files"]) == (2, 1, [str(tmp_path / "big.mp4")])
    with pytest.raises(DataError, match="big.mp4.*decompression bomb"):
        VideoTextDataset(ann, on_error="raise", **kwargs)[1]


def test_clip_limit_counts_the_frames_to_decode(tmp_path, write_json, big_video, monkeypatch):
    ann = write_json(tmp_path / "v.json", [{"video": "big.mp4", "caption": "c"}])
    limit = 3 * BIG * BIG
    two = VideoTextDataset(ann, root=tmp_path, num_frames=2, transform=eval_transform(16), max_video_pixels=limit)
    assert two[0]["video"].shape == (2, 3, 16, 16)
    four = VideoTextDataset(ann, root=tmp_path, num_frames=4, transform=eval_transform(16), max_video_pixels=limit)
    monkeypatch.setattr(video, "open_video", lambda *_: pytest.fail("decord opened an over-limit clip"))
    with pytest.warns(UserWarning, match="big.mp4"):
        bad = four[0]
    assert "4 frames of 1024x1024 are 4194304 pixels" in bad.reason and "data.max_video_pixels" in bad.reason


def test_decoded_frames_are_checked_again(big_video, monkeypatch):
    """A header that under-states the frame size is caught on the decoded frames."""
    monkeypatch.setattr(video, "probe_video", lambda path, max_pixels: video.VideoInfo(16, 16, 2))
    with pytest.raises(UnreadableFile, match="decompression bomb: 1024x1024"):
        load_clip(big_video, 2, max_pixels=512 * 512)
    with pytest.raises(UnreadableFile, match="video too large to decode"):
        load_clip(big_video, 2, max_video_pixels=BIG * BIG)


# ---- data: truncated videos ------------------------------------------------------------------------

def test_truncated_mkv_warns_and_loads_what_is_there(tmp_path, write_mp4):
    full = write_mp4(tmp_path / "clip.mkv", _frames(48, 32, 64, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_clip(full, 4).shape == (4, 32, 64, 3)
    truncated = _truncate(full)
    with pytest.warns(UserWarning, match=r"truncated_clip.mkv: only (\d+) of the 48 frames") as record:
        clip = load_clip(truncated, 4)
    readable = int(str(record[0].message).split("only ")[1].split(" ")[0])
    assert clip.shape == (4, 32, 64, 3) and 1 <= readable < 48
    bar = [int(np.argmax(frame[0, :, 0].numpy())) for frame in clip]  # frame t has its bar at x = t
    assert bar == video.frame_indices(readable, 4).tolist()


def _decord_fails(*args, **kwargs):
    raise video.UnreadableFile(args[1], "cannot decode frames (decord2 < 3.4 on 48 or 96 px wide frames)")


def test_truncated_video_in_the_pyav_fallback_warns(tmp_path, write_mp4, monkeypatch):
    full = write_mp4(tmp_path / "w96.mkv", _frames(48, 32, 96, 1))
    calls = []
    fallback = video._read_frames_pyav
    monkeypatch.setattr(video, "read_frames", _decord_fails)  # what older decord2 did on this width
    monkeypatch.setattr(video, "_read_frames_pyav", lambda *args: calls.append(args) or fallback(*args))
    with pytest.warns(UserWarning, match=r"truncated_w96.mkv: only \d+ of the 48 frames"):
        clip = load_clip(_truncate(full), 4)
    assert clip.shape == (4, 32, 96, 3) and len(calls) == 1


# ---- config ------------------------------------------------------------------------------------------

def test_limits_are_config_keys_that_reach_the_datasets():
    assert (DataConfig().max_pixels, DataConfig().max_video_pixels) == (DEFAULT_MAX_PIXELS, DEFAULT_MAX_VIDEO_PIXELS)
    cfg = load_config(None, ["data.max_pixels=1000", "data.max_video_pixels=5000"])
    kwargs = dataset_kwargs(cfg)
    assert (kwargs["max_pixels"], kwargs["max_video_pixels"]) == (1000, 5000)
    with pytest.raises(ConfigError, match="data.max_video_pixels=0"):
        load_config(None, ["data.max_video_pixels=0"])


# ---- inference: pipeline and server ------------------------------------------------------------------

def test_pipeline_refuses_an_over_limit_video_before_decoding(tiny_pipe, big_video, no_decoding, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "max_pixels", 512 * 512)
    with pytest.raises(InputError, match="video .*big.mp4: decompression bomb: 1024x1024"):
        tiny_pipe.read_video(big_video)
    with pytest.raises(InputError, match="decompression bomb"):
        tiny_pipe.decoded_pixels(big_video)
    monkeypatch.setattr(tiny_pipe, "max_pixels", DEFAULT_MAX_PIXELS)
    assert tiny_pipe.decoded_pixels(big_video) == ("video", NUM_FRAMES * BIG * BIG)


@pytest.mark.parametrize("limit,match", [("max_pixels", "decompression bomb: 1024x1024"),
                                         ("max_video_pixels", "video too large to decode")])
def test_server_answers_400_for_an_over_limit_video(tiny_pipe, image_index, big_video, no_decoding, monkeypatch,
                                                    limit, match):
    monkeypatch.setattr(tiny_pipe, limit, 2 * BIG * BIG if limit == "max_video_pixels" else 512 * 512)
    with TestClient(create_app(tiny_pipe, image_index)) as client:
        with open(big_video, "rb") as f:
            vqa = client.post("/vqa", files={"video": ("big.mp4", f)}, data={"question": "what moves?"})
        with open(big_video, "rb") as f:
            search = client.post("/search", files={"file": ("big.mp4", f)})
    for response in (vqa, search):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "InputError" and match in error["message"] and "upload 'big.mp4'" in error["message"]


def _concurrent_video_questions(tiny_pipe, image_index, videos, monkeypatch, max_decode_pixels):
    """Ask 3 questions about videos at once, each decode taking 0.3 s -> (responses, most decodes at once, app)."""
    running, most, lock = [0], [0], threading.Lock()

    def slow_read_video(path):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)
        try:
            return type(tiny_pipe).read_video(tiny_pipe, path)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(tiny_pipe, "read_video", slow_read_video)
    app = create_app(tiny_pipe, image_index, batch_wait_ms=5, max_decode_pixels=max_decode_pixels)

    def ask(path):
        with open(path, "rb") as f:
            return client.post("/vqa", files={"video": (Path(path).name, f)}, data={"question": "where?"})

    with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(ask, videos[:3]))
    return responses, most[0], app


def test_decode_budget_makes_concurrent_uploads_wait(tiny_pipe, image_index, videos, monkeypatch):
    kind, one_video = tiny_pipe.decoded_pixels(videos[0])
    assert kind == "video" and all(tiny_pipe.decoded_pixels(v)[1] == one_video for v in videos[:3])
    responses, most, app = _concurrent_video_questions(tiny_pipe, image_index, videos, monkeypatch, 3 * one_video)
    assert [r.status_code for r in responses] == [200] * 3 and most > 1  # room for all: they overlap
    responses, most, app = _concurrent_video_questions(tiny_pipe, image_index, videos, monkeypatch, one_video)
    assert [r.status_code for r in responses] == [200] * 3  # waited, not refused
    assert most == 1 and app.state.decode_budget.peak == one_video and app.state.decode_budget.in_use == 0


def test_upload_larger_than_the_whole_budget_is_refused(tiny_pipe, image_index, videos):
    one_video = tiny_pipe.decoded_pixels(videos[0])[1]
    app = create_app(tiny_pipe, image_index, max_decode_pixels=one_video - 1)
    with TestClient(app) as client, open(videos[0], "rb") as f:
        response = client.post("/vqa", files={"video": ("clip.mp4", f)}, data={"question": "where?"})
    assert response.status_code == 400
    assert "--max-decode-pixels" in response.json()["error"]["message"]
    with pytest.raises(InputError, match="max_decode_pixels=0"):
        create_app(tiny_pipe, image_index, max_decode_pixels=0)


def test_serve_cli_passes_the_decode_budget(monkeypatch):
    import mmfm.inference.cli as inference_cli
    from mmfm.inference import server

    served = {}
    monkeypatch.setattr(inference_cli, "_pipeline", lambda args: "pipeline")
    monkeypatch.setattr(server, "serve", lambda *args: served.update(args=args))
    assert main(["serve", "--model", "m", "--max-decode-pixels", "12345"]) == 0
    assert served["args"][0] == "pipeline" and served["args"][-1] == 12345
