"""Sharded streaming (mmfm.data.shards): shard lists, shuffling, mixing, bad records, HTTP, and reading
through the Trainer with 2 workers and 2 processes, killed and resumed."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from zoo_server import ZooServer

from mmfm.cli import main
from mmfm.config import load_config
from mmfm.data.collate import make_collate
from mmfm.data.formats import BadSample
from mmfm.data.shards import (
    CaptionDecoder,
    MediaReader,
    QuestionDecoder,
    ShardSource,
    ShardStream,
    expand_shards,
    shuffled,
)
from mmfm.data.transforms import eval_transform
from mmfm.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = [sys.executable, str(ROOT / "tests" / "shard_trainer.py")]


def _png(value: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, (value * 7) % 256, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, prefix: str = "", manifest: bool = True) -> list[str]:
    """Shards of image-caption records keyed PREFIX + running number, with a manifest of their counts."""
    folder.mkdir(parents=True, exist_ok=True)
    names, number = [], 0
    for shard in range(shards):
        name = f"{shard:05d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for _ in range(per_shard):
                meta = {"captions": [f"picture {number}"],
                        "questions": [{"question": "what number?", "answer": [str(number % 3)] * 10}]}
                writer.write({"__key__": f"{prefix}{number:06d}", "png": _png(number), "txt": f"picture {number}",
                              "json": json.dumps(meta)})
                number += 1
        names.append(name)
    if manifest:
        (folder / "_manifest.json").write_text(json.dumps(
            {"shards": [{"name": n, "samples": per_shard} for n in names], "samples": shards * per_shard}))
    return [str(folder / n) for n in names]


def _key(record, rng):
    return {"key": record["__key__"]}


def _stream(urls, decode=_key, **kwargs):
    return ShardStream([ShardSource(tuple(urls), 1.0, "test")], decode, **kwargs)


def _samples(stream, count, slot=0, slots=1, position=None):
    samples = stream.slot_samples(slot, slots, position)
    return [next(samples) for _ in range(count)]


# ---- shard lists and shuffling ----------------------------------------------------------------------

def test_shard_patterns_directory_braces_glob_and_urls(tmp_path):
    urls = write_shards(tmp_path / "s", 4, 2)
    assert expand_shards(str(tmp_path / "s")) == urls
    assert expand_shards("s/{00000..00003}.tar", root=str(tmp_path)) == urls
    assert expand_shards(str(tmp_path / "s" / "0000[12].tar")) == urls[1:3]
    assert expand_shards(f"file://{tmp_path}/s/00000.tar") == urls[:1]
    assert expand_shards("http://127.0.0.1:1/d/{0..2}.tar") == [f"http://127.0.0.1:1/d/{k}.tar" for k in range(3)]
    # one missing file of a brace list is an unreadable shard when read; all missing is a typo
    assert len(expand_shards(str(tmp_path / "s" / "{00000..00004}.tar"))) == 5
    with pytest.raises(DataError, match="match no file"):
        expand_shards(str(tmp_path / "t" / "{00000..00004}.tar"))


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(100))
    once = list(shuffled(iter(items), 10, np.random.default_rng(1)))
    assert sorted(once) == items and once != items
    assert list(shuffled(iter(items), 10, np.random.default_rng(1))) == once
    assert list(shuffled(iter(items), 0, np.random.default_rng(1))) == items


def test_epoch_mode_reads_every_record_once_per_epoch_over_all_slots(tmp_path):
    urls = write_shards(tmp_path, 6, 5)
    stream = _stream(urls, shuffle_buffer=4)
    stream.configure(1, None, world=1, num_workers=3)
    per_slot = [[(s["key"], pos["sources"][0][0]) for s, pos in _samples(stream, 20, slot, 3)] for slot in range(3)]
    for epoch in (0, 1):
        keys = [key for slot in per_slot for key, e in slot if e == epoch]
        assert sorted(keys) == [f"{n:06d}" for n in range(30)]
    first = [key for key, _ in per_slot[0][:10]]
    assert first != [key for key, _ in per_slot[0][10:]]  # another shard order and shuffle each epoch


def test_a_position_resumes_the_exact_sequence(tmp_path):
    stream = _stream(write_shards(tmp_path, 4, 7), shuffle_buffer=5)
    full = _samples(stream, 40, 1, 2)
    position = full[16][1]
    assert position["sources"] == [[1, 3]]  # 14 records per slot per epoch
    assert [s for s, _ in _samples(stream, 23, 1, 2, position)] == [s for s, _ in full[17:]]


def test_too_few_shards_for_the_readers_is_a_clear_error(tmp_path):
    stream = _stream(write_shards(tmp_path, 3, 2))
    with pytest.raises(DataError, match=r"3 shard\(s\) for 4 readers"):
        stream.configure(4, None, world=2, num_workers=2)
    _stream(write_shards(tmp_path, 3, 2), mode="resampled").configure(4, None, world=2, num_workers=2)


def test_resampled_mode_draws_with_replacement_and_a_new_seed_after_resume(tmp_path):
    stream = _stream(write_shards(tmp_path, 4, 3), mode="resampled", shuffle_buffer=0)
    keys = [s["key"] for s, _ in _samples(stream, 60)]
    assert len(set(keys)) == 12 and max(keys.count(k) for k in set(keys)) > 5
    assert [s["key"] for s, _ in _samples(stream, 60)] == keys
    stream.configure(1, None, batches_done=30)
    assert [s["key"] for s, _ in _samples(stream, 60)] != keys


def test_mixing_weights_hold_over_10k_draws(tmp_path):
    a = write_shards(tmp_path / "a", 2, 10, prefix="a")
    b = write_shards(tmp_path / "b", 2, 10, prefix="b")
    stream = ShardStream([ShardSource(tuple(a), 3.0, "a"), ShardSource(tuple(b), 1.0, "b")], _key,
                         shuffle_buffer=0)
    draws = _samples(stream, 10_000)
    share = sum(s["key"].startswith("a") for s, _ in draws) / len(draws)
    assert abs(share - 0.75) < 0.02
    position = draws[4_999][1]
    assert position["draws"] == 5_000 and sum(read + 20 * epoch for epoch, read in position["sources"]) == 5_000
    resumed = [s["key"] for s, _ in _samples(stream, 100, position=position)]
    assert resumed == [s["key"] for s, _ in draws[5_000:5_100]]


# ---- decoding and bad records -----------------------------------------------------------------------

def _tar(path: Path, records: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def _decoder(questions=False):
    media, transform = MediaReader("image"), eval_transform(16)
    return QuestionDecoder(media, transform, ["0", "1", "2"]) if questions else \
        CaptionDecoder(media, transform, answer_list=["0", "1", "2"])


def test_records_decode_like_the_json_datasets(tmp_path):
    urls = write_shards(tmp_path, 1, 3)
    sample, _ = _samples(_stream(urls, _decoder(), shuffle_buffer=0), 1)[0]
    assert sample["image"].shape == (3, 16, 16) and sample["text"] == "picture 0"
    assert sample["has_question"] and sample["question"] == "what number?" and sample["target"].tolist() == [1, 0, 0]
    again, _ = _samples(_stream(urls, _decoder(), shuffle_buffer=0), 1)[0]
    assert again["image_id"] == sample["image_id"] and isinstance(sample["image_id"], int)
    vqa, _ = _samples(_stream(urls, _decoder(questions=True), shuffle_buffer=0), 2)[1]
    assert vqa["question"] == "what number?" and vqa["target"].tolist() == [0, 1, 0] and vqa["answers"] == ["1"] * 10


def _bad_shards(tmp_path: Path) -> list[str]:
    good = {"png": _png(1), "txt": "fine"}
    urls = [_tar(tmp_path / "00000.tar", [
        {"__key__": "ok1", **good},
        {"__key__": "nocap", "png": _png(2)},
        {"__key__": "nomedia", "txt": "a caption without an image"},
        {"__key__": "notpng", "png": b"\x89PNG but not really", "txt": "broken bytes"},
        {"__key__": "badjson", **good, "json": "{not json"},
        {"__key__": "ok2", **good},
    ])]
    truncated = Path(_tar(tmp_path / "00001.tar", [{"__key__": f"t{k}", "png": _png(k, 64), "txt": "x"}
                                                   for k in range(4)]))
    with tarfile.open(truncated) as tar:
        cut = tar.getmembers()[4].offset_data + 10  # inside t2.png's data
    truncated.write_bytes(truncated.read_bytes()[:cut])
    urls.append(str(truncated))
    urls.append(str(tmp_path / "00002.tar"))  # missing
    return urls


def test_every_bad_record_kind_is_skipped_named_and_counted(tmp_path):
    stream = _stream(_bad_shards(tmp_path), _decoder(), shuffle_buffer=0)
    with pytest.warns(UserWarning, match="skipping bad record"):
        samples = [s for s, pos in _samples(stream, 20) if pos["sources"][0][0] == 0]
    good = [s["key"] for s in samples if s]
    bad = {s.path: s.reason for s in samples if isinstance(s, BadSample)}
    assert {"ok1", "ok2"} <= set(good) and set(good) - {"ok1", "ok2"} == {"t0", "t1"}
    reasons = " | ".join(f"{path}: {reason}" for path, reason in bad.items())
    assert "00000.tar#nocap" in reasons and "no caption" in bad[f"{tmp_path}/00000.tar#nocap"]
    assert "no image member" in bad[f"{tmp_path}/00000.tar#nomedia"]
    assert "cannot decode image" in bad[f"{tmp_path}/00000.tar#notpng.png"]
    assert "not valid JSON" in bad[f"{tmp_path}/00000.tar#badjson"]
    assert "unreadable shard data" in bad[f"{tmp_path}/00001.tar"]
    assert "FileNotFoundError: No such file" in bad[f"{tmp_path}/00002.tar"]


def test_a_shard_shorter_than_its_manifest_is_a_bad_record(tmp_path):
    urls = write_shards(tmp_path, 1, 6)
    data = Path(urls[0]).read_bytes()
    with tarfile.open(urls[0]) as tar:
        members = tar.getmembers()
    cut = members[12].offset  # 3 members a record; a clean cut at a header: tarfile notices nothing
    Path(urls[0]).write_bytes(data[:cut] + b"\0" * 1024)
    samples = [s for s, _ in _samples(_stream(urls, shuffle_buffer=0), 5)]
    assert [s["key"] for s in samples[:4]] == [f"{n:06d}" for n in range(4)]
    assert isinstance(samples[4], BadSample) and "4 of the 6 records" in samples[4].reason


def test_on_error_raise_stops_at_the_first_bad_record(tmp_path):
    stream = _stream(_bad_shards(tmp_path), _decoder(), shuffle_buffer=0, on_error="raise")
    with pytest.raises(DataError, match=r"\.tar.*(unreadable|no caption).*or set data.on_error=skip"):
        _samples(stream, 3)


def test_shards_over_http_and_a_missing_one(tmp_path):
    urls = write_shards(tmp_path, 3, 4)
    with ZooServer() as server:
        for url in urls[:2]:
            server.add(f"/d/{Path(url).name}", Path(url).read_bytes())
        served = expand_shards(server.url("/d/{00000..00002}.tar"))
        stream = _stream(served, shuffle_buffer=0)
        with pytest.warns(UserWarning, match="skipping bad record"):
            samples = [s for s, _ in _samples(stream, 9)]
    assert sorted(s["key"] for s in samples if s) == [f"{n:06d}" for n in range(8)]
    bad = [s for s in samples if isinstance(s, BadSample)]
    assert len(bad) == 1 and bad[0].path.endswith("/d/00002.tar") and "HTTP error" in bad[0].reason


# ---- config -----------------------------------------------------------------------------------------

def test_sources_are_validated_with_clear_messages():
    with pytest.raises(ConfigError, match="not trained by this run; add it to train.tasks"):
        load_config(None, ["data.sources=[{shards: s, task: vqa}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].wieght: unknown key.*'weight'"):
        load_config(None, ["data.sources=[{shards: s, wieght: 2}]"])
    with pytest.raises(ConfigError, match="weight=-1"):
        load_config(None, ["data.sources=[{shards: s, weight: -1}]"])
    with pytest.raises(ConfigError, match="data.shard_mode"):
        load_config(None, ["data.shard_mode=sometimes"])
    cfg = load_config(None, ["data.sources=[{shards: s}]"])
    assert cfg.data.sources == [{"shards": "s", "weight": 1.0, "task": "image_text"}]


# ---- through the Trainer ----------------------------------------------------------------------------

def _keys(output: Path, rank: int = 0) -> dict[int, list[str]]:
    lines = [json.loads(line) for line in (output / f"keys_rank{rank}.jsonl").read_text().splitlines()]
    return {line["step"]: line["keys"] for line in lines}


def _converted_shards(folder: Path, count: int, shard_size: int) -> list[str]:
    """`mmfm data convert` of a generated CSV of `count` PNGs; returns the keys of the shards written."""
    rows = ["image,caption"]
    for n in range(count):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "images" / f"{n}.png").write_bytes(_png(n))
        rows.append(f"images/{n}.png,picture number {n}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    assert main(["data", "convert", str(folder / "pairs.csv"), "--to", "shards", "--out", str(folder / "shards"),
                 "--shard-size", str(shard_size), "--workers", "2", "--quiet"]) == 0
    keys = set()
    for shard in sorted((folder / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys |= {name.split(".")[0] for name in tar.getnames()}
    return sorted(keys)


def test_trainer_reads_each_sample_once_per_epoch_with_2_processes_and_2_workers(tmp_path):
    everything = _converted_shards(tmp_path, 200, 25)
    assert len(everything) == 200
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    result = subprocess.run(torchrun + SCRIPT[1:] + [str(tmp_path / "shards"), str(tmp_path / "run"), "--steps", "40",
                                                     "--workers", "2"],
                            capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2
    ranks = [_keys(tmp_path / "run", rank) for rank in (0, 1)]
    assert all(sorted(keys) == list(range(1, 41)) for keys in ranks)
    for steps in (range(1, 21), range(21, 41)):  # 4 readers x 2 shards x 25 = 10 batches of 5 per reader
        seen = [key for keys in ranks for step in steps for key in keys[step]]
        assert sorted(seen) == everything


def _wait_for(path: Path, proc, seconds=120) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


def test_killed_epoch_mode_run_resumes_with_the_same_sample_sequence(tmp_path):
    write_shards(tmp_path / "shards", 4, 25)
    args = [str(tmp_path / "shards"), "--steps", "60", "--workers", "2", "--save-every", "10"]
    reference = subprocess.run(SCRIPT + [args[0], str(tmp_path / "ref"), *args[1:]], capture_output=True, text=True,
                               timeout=300, check=False)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(SCRIPT + [args[0], str(killed), *args[1:], "--slow"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert _wait_for(killed / "checkpoints" / "step_00000050" / "train_state.json", proc), "no checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    state = json.loads((killed / "checkpoints" / "step_00000050" / "data_state.json").read_text())
    assert state["streams"]["image_text"]["0"]["sources"] == [[2, 25]]  # mid-way through the third epoch
    resumed = subprocess.run(SCRIPT + [args[0], str(killed), *args[1:], "--resume", "latest"],
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _keys(killed) == _keys(tmp_path / "ref")


def test_resume_with_another_worker_count_warns_and_restarts_the_epoch(tmp_path):
    write_shards(tmp_path / "shards", 4, 10)
    args = [str(tmp_path / "shards"), str(tmp_path / "run"), "--save-every", "6"]
    subprocess.run(SCRIPT + args + ["--steps", "6", "--workers", "2"], capture_output=True, check=True)
    result = subprocess.run(SCRIPT + args + ["--steps", "14", "--workers", "1", "--resume", "latest"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reader positions cannot carry over" in result.stderr
    keys = _keys(tmp_path / "run")
    assert sorted(key for step in range(7, 15) for key in keys[step]) == [f"{n:06d}" for n in range(40)]


def test_collated_batches_carry_the_reader_position(tmp_path):
    stream = _stream(write_shards(tmp_path, 2, 6), _decoder(), shuffle_buffer=0)
    stream.configure(4, make_collate(None), num_workers=0)
    batch = next(iter(stream))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["num_seen"] == 4
    assert batch["stream_state"] == {"slot": 0, "sources": [[0, 4]], "draws": 4}


def test_train_py_streams_shapesworld_shards_with_riding_questions_and_resumes(tmp_path, tiny_overrides,
                                                                              tiny_shapes):
    """The demo config on image and video shards (`make_data.py shapes --shards`): alignment samples carry
    their questions from the shards' .json, both answer heads train, a resumed run continues the streams."""
    from mmfm.data.shapes import write_shards as write_shapes_shards

    write_shapes_shards(tiny_shapes)
    train = [sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(ROOT / "configs" / "demo_shapes.yaml"),
             "--output", str(tmp_path / "run"), "--quiet", "--no-eval", *tiny_overrides, "data.num_workers=2",
             "data.sources=[{shards: shards, task: image_text}, {shards: video_shards, task: video_text}]",
             "train.save_every=3", "train.max_minutes=0"]
    first = subprocess.run(train + ["train.max_steps=3"], capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(train + ["train.max_steps=6", "--resume", "latest"], capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, 7))
    assert {"vqa", "video_qa", "loss/image_text", "loss/video_text"} <= {k for r in history for k in r}
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / "data_state.json").read_text())
    assert set(state["streams"]) == {"image_text", "video_text"} and state["layout"]["workers"] == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_samples"] == 0
