"""`mmfm data convert` / `inspect`: real small sources → webdataset shards, read back with webdataset."""

import csv
import hashlib
import importlib.util
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from webdataset import tariterators

from mmfm.cli import main
from mmfm.data import ImageTextDataset, RetrievalEvalDataset

REPO = Path(__file__).resolve().parents[1]
IMAGES = 30


@pytest.fixture
def photos(tmp_path):
    """30 distinct PNGs in tmp_path/photos and their captions (two for the even ones)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    captions = {}
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
        extra = [f"another caption of {i} — ünïcode"] if i % 2 == 0 else []
        captions[f"p{i:02d}.png"] = [f"photo {i}", *extra]
    return folder, captions


def write_csv(path, rows, columns=("image", "caption"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def csv_rows(photos):
    _, captions = photos
    return [(f"photos/{name}", caption) for name, caps in captions.items() for caption in caps]


def read_shards(out):
    """Every sample of OUT/*.tar, in order, through webdataset's tar iterators."""
    urls = [{"url": str(p)} for p in sorted(Path(out).glob("*.tar"))]
    return list(tariterators.tarfile_samples(urls))


def manifest(out):
    return json.loads((Path(out) / "_manifest.json").read_text())


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(capsys, *argv):
    code = main(["--quiet", "data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_csv_round_trips_through_shards(tmp_path, photos, capsys):
    folder, captions = photos
    src = write_csv(tmp_path / "data.csv", csv_rows(photos))
    code, out, _ = run(capsys, "convert", src, "--to", "shards", "--out", tmp_path / "out", "--shard-size", 8,
                       "--workers", 1)
    assert code == 0 and "wrote 30 samples in 4 shards" in out
    samples = read_shards(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"{i // 8:05d}{i % 8:04d}" for i in range(IMAGES)]
    for sample, (name, caps) in zip(samples, captions.items()):
        assert set(sample) - {"__key__", "__url__"} == {"png", "txt", "json"}
        assert sample["png"] == (folder / name).read_bytes()  # the original bytes, not re-encoded
        assert sample["txt"].decode("utf-8") == caps[0]
        assert json.loads(sample["json"]) == {"captions": caps, "id": f"photos/{name}"}
    meta = manifest(tmp_path / "out")
    assert meta["format"] == "mmfm-shards/1" and meta["kind"] == "image" and meta["complete"]
    assert meta["samples"] == IMAGES and [s["samples"] for s in meta["shards"]] == [8, 8, 8, 6]
    for shard in meta["shards"]:
        path = tmp_path / "out" / shard["name"]
        assert shard["sha256"] == sha256(path) and shard["bytes"] == path.stat().st_size
    assert meta["bad"] == [] and not list((tmp_path / "out").glob(".*"))  # no temporaries left


def test_worker_count_does_not_change_the_bytes(tmp_path, photos, capsys):
    src = write_csv(tmp_path / "data.csv", csv_rows(photos))
    for workers in (1, 2):
        run(capsys, "convert", src, "--out", tmp_path / f"w{workers}", "--shard-size", 7,
            "--workers", workers)
    one, two = manifest(tmp_path / "w1"), manifest(tmp_path / "w2")
    assert len(one["shards"]) == 5 and one["shards"] == two["shards"]
    shas = [sha256(p) for p in sorted((tmp_path / "w2").glob("*.tar"))]
    assert shas == [s["sha256"] for s in one["shards"]]


def test_rerun_skips_finished_shards_and_rewrites_broken_ones(tmp_path, photos, capsys):
    src = write_csv(tmp_path / "data.csv", csv_rows(photos))
    args = ("convert", src, "--out", tmp_path / "out", "--shard-size", 8)
    run(capsys, *args)
    before = manifest(tmp_path / "out")
    code, out, _ = run(capsys, *args)
    assert code == 0 and "skipped 4 finished shards" in out
    (tmp_path / "out" / "00001.tar").unlink()
    data = bytearray((tmp_path / "out" / "00002.tar").read_bytes())
    data[600] ^= 0xFF
    (tmp_path / "out" / "00002.tar").write_bytes(bytes(data))
    code, out, _ = run(capsys, *args)
    assert "skipped 2 finished shards" in out and manifest(tmp_path / "out") == before
    shas = [sha256(p) for p in sorted((tmp_path / "out").glob("*.tar"))]
    assert shas == [s["sha256"] for s in before["shards"]]
    # a changed source rewrites what it changes, and shards past its new end go
    write_csv(src, csv_rows(photos)[:10])
    code, out, _ = run(capsys, *args)
    assert "wrote 7 samples in 1 shards" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar"]


def test_folder_with_sidecar_captions(tmp_path, photos, capsys):
    folder, captions = photos
    for name, caps in captions.items():
        (folder / name).with_suffix(".txt").write_text("\n".join(caps) + "\n\n", encoding="utf-8")
    (folder / "p05.txt").unlink()
    code, out, _ = run(capsys, "convert", folder, "--out", tmp_path / "out")
    assert code == 0 and "wrote 29 samples in 1 shards" in out and "1x no caption" in out
    samples = read_shards(tmp_path / "out")
    metas = {json.loads(s["json"])["id"]: json.loads(s["json"])["captions"] for s in samples}
    assert metas == {name: caps for name, caps in captions.items() if name != "p05.png"}
    assert manifest(tmp_path / "out")["bad"] == [{"source": str(folder / "p05.png"), "reason": "no caption"}]


def test_karpathy_json_with_split_filter(tmp_path, photos, capsys):
    _, captions = photos
    images = [{"filepath": "photos", "filename": name, "cocoid": 100 + i,
               "split": ("train", "restval", "val")[i % 3],
               "sentences": [{"raw": c, "tokens": c.split()} for c in caps]}
              for i, (name, caps) in enumerate(captions.items())]
    src = tmp_path / "dataset_coco.json"
    src.write_text(json.dumps({"images": images, "dataset": "coco"}))
    code, _, _ = run(capsys, "convert", src, "--split", "train,restval", "--out", tmp_path / "out")
    assert code == 0
    got = [json.loads(s["json"]) for s in read_shards(tmp_path / "out")]
    want = [{"captions": [s["raw"] for s in i["sentences"]], "id": i["cocoid"]}
            for i in images if i["split"] != "val"]
    assert got == want and len(got) == 20
    code, _, err = run(capsys, "convert", src, "--split", "test", "--out", tmp_path / "none")
    assert code == 2 and "no images with split 'test'" in err and str(src) in err


def test_vqav2_questions_are_merged_per_image(tmp_path, capsys):
    image_dir = tmp_path / "val2014"
    image_dir.mkdir()
    for image_id in (1, 2):
        Image.new("RGB", (8, 8), (image_id * 50, 0, 0)).save(image_dir / f"COCO_val2014_{image_id:012d}.jpg")
    questions = [{"question_id": q, "image_id": 1 + q % 2, "question": f"question {q}?"} for q in range(5)]
    annotations = [{"question_id": q, "image_id": 1 + q % 2, "question_type": "what", "answer_type": "other",
                    "answers": [{"answer": f"answer {q}", "answer_id": k} for k in range(10)]}
                   for q in range(5)]
    qfile, afile = tmp_path / "questions.json", tmp_path / "annotations.json"
    qfile.write_text(json.dumps({"questions": questions, "data_subtype": "val2014"}))
    afile.write_text(json.dumps({"annotations": annotations, "data_subtype": "val2014"}))
    code, out, _ = run(capsys, "convert", qfile, afile, "--image-dir", image_dir, "--out", tmp_path / "out")
    assert code == 0 and "wrote 2 samples" in out
    samples = read_shards(tmp_path / "out")
    assert [set(s) - {"__key__", "__url__"} for s in samples] == [{"jpg", "json"}] * 2  # no caption: no .txt
    for sample, image_id in zip(samples, (1, 2)):
        meta = json.loads(sample["json"])
        assert meta["id"] == image_id and meta["captions"] == []
        assert meta["questions"] == [{"question": f"question {q}?", "answer": [f"answer {q}"] * 10,
                                      "question_type": "what", "question_id": q}
                                     for q in range(5) if 1 + q % 2 == image_id]
        assert sample["jpg"] == (image_dir / f"COCO_val2014_{image_id:012d}.jpg").read_bytes()


def test_questions_give_an_answer_list_and_a_held_out_vqa_file(tmp_path, capsys):
    images = tmp_path / "img"
    images.mkdir()
    entries = []
    for n in range(6):
        Image.new("RGB", (8, 8), (n * 40, 0, 0)).save(images / f"{n}.png")
        entries += [{"image": f"img/{n}.png", "question": "what colour?", "answer": ["red"] * 7 + ["Two"] * 3},
                    {"image": f"img/{n}.png", "question": "how many?", "answer": ["2"] * (n + 1)}]
    (tmp_path / "vqa.json").write_text(json.dumps(entries))
    code, out, _ = run(capsys, "convert", tmp_path / "vqa.json", "--holdout", 2, "--out", tmp_path / "out")
    assert code == 0 and "wrote the 2 most frequent answers" in out
    assert json.loads((tmp_path / "out" / "answer_list.json").read_text()) == ["red", "2"]  # "Two" pools with 2
    held = json.loads((tmp_path / "out" / "holdout_vqa.json").read_text())
    assert len(held) == 4 and {e["question"] for e in held} == {"what colour?", "how many?"}
    assert not (tmp_path / "out" / "holdout.json").exists()  # no captions to retrieve
    assert len(read_shards(tmp_path / "out")) == 4


def test_msrvtt_videos_keep_their_bytes(tmp_path, write_mp4, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    write_mp4(videos / "video0.mp4", frames)
    write_mp4(videos / "video1.mp4", frames + 200)
    (videos / "video2.mp4").write_bytes(b"not a video\n" * 50)
    sentences = [{"video_id": f"video{k % 3}", "caption": f"clip {k}"} for k in range(6)]
    src = tmp_path / "MSRVTT_data.json"
    src.write_text(json.dumps({"sentences": sentences, "videos": []}))
    code, out, _ = run(capsys, "convert", src, "--video-dir", videos, "--out", tmp_path / "out")
    assert code == 0 and "wrote 2 samples" in out and "1 bad records" in out and "cannot open video" in out
    samples = read_shards(tmp_path / "out")
    assert [s["mp4"] for s in samples] == [(videos / f"video{k}.mp4").read_bytes() for k in (0, 1)]
    assert [json.loads(s["json"]) for s in samples] == [
        {"captions": [f"clip {k}", f"clip {k + 3}"], "id": f"video{k}"} for k in (0, 1)]
    assert manifest(tmp_path / "out")["kind"] == "video"
    code, out, _ = run(capsys, "inspect", tmp_path / "out")
    assert code == 0 and "2 samples (mp4 2)" in out


def test_bad_rows_are_skipped_and_recorded(tmp_path, photos, capsys):
    rows = csv_rows(photos)[:6] + [("photos/missing.png", "gone"), ("photos/corrupt.png", "broken"),
                                   ("photos/p29.png", "  "), ("", "no file")]
    (tmp_path / "photos" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    src = write_csv(tmp_path / "data.tsv", rows, columns=("filepath", "text"), delimiter="\t")
    code, out, _ = run(capsys, "convert", src, "--caption-col", "text", "--out", tmp_path / "out")
    assert code == 0 and "wrote 4 samples" in out and "4 bad records" in out
    reasons = {b["source"]: b["reason"] for b in manifest(tmp_path / "out")["bad"]}
    assert reasons[f"{src}:8"] == "file not found" and reasons[f"{src}:9"].startswith("cannot decode image")
    assert reasons[f"{src}:10"] == "no caption" and reasons[f"{src}:11"] == "no media path"


def test_unknown_column_and_all_bad_source_are_one_line_errors(tmp_path, photos, capsys):
    src = write_csv(tmp_path / "data.csv", csv_rows(photos))
    code, out, err = run(capsys, "convert", src, "--caption-col", "title", "--out", tmp_path / "out")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "no column 'title'" in err and "columns: image, caption" in err and str(src) in err
    bad = write_csv(tmp_path / "bad.csv", [("nowhere/a.png", "a"), ("nowhere/b.png", "b")])
    code, _, err = run(capsys, "convert", bad, "--out", tmp_path / "out2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err and "file not found" in err
    empty = write_csv(tmp_path / "empty.csv", [])
    code, _, err = run(capsys, "convert", empty, "--out", tmp_path / "out3")
    assert code == 2 and "no rows" in err and str(empty) in err


def test_holdout_is_disjoint_and_seeded(tmp_path, photos, capsys):
    src = write_csv(tmp_path / "data.csv", csv_rows(photos))
    for out in ("a", "b"):
        code, printed, _ = run(capsys, "convert", src, "--holdout", 5, "--out", tmp_path / out)
        assert code == 0 and "held out 5 media" in printed
    held = json.loads((tmp_path / "a" / "holdout.json").read_text())
    assert held == json.loads((tmp_path / "b" / "holdout.json").read_text())
    shard_ids = {json.loads(s["json"])["id"] for s in read_shards(tmp_path / "a")}
    held_ids = {e["image_id"] for e in held}
    assert len(held_ids) == 5 and not shard_ids & held_ids and len(shard_ids | held_ids) == IMAGES
    assert all(Path(e["image"]).is_absolute() and len(e["caption"]) >= 1 for e in held)
    evaluation = RetrievalEvalDataset(str(tmp_path / "a" / "holdout.json"))
    assert len(evaluation) == 5


def test_to_json_is_a_training_and_retrieval_file(tmp_path, photos, capsys):
    src = write_csv(tmp_path / "data.csv", csv_rows(photos))
    code, out, _ = run(capsys, "convert", src, "--to", "json", "--holdout", 3, "--out", tmp_path / "out")
    assert code == 0 and "wrote 27 entries" in out
    path = str(tmp_path / "out" / "annotations.json")
    entries = json.loads(Path(path).read_text())
    held = {e["image"] for e in json.loads((tmp_path / "out" / "holdout.json").read_text())}
    assert len(entries) == 27 and not held & {e["image"] for e in entries}
    assert ImageTextDataset(path)[0]["text"] in entries[0]["caption"]
    assert len(RetrievalEvalDataset(path).texts) == sum(len(e["caption"]) for e in entries)


def test_inspect_reports_truncated_shards_and_missing_captions(tmp_path, photos, capsys):
    src = write_csv(tmp_path / "data.csv", csv_rows(photos))
    out = tmp_path / "out"
    run(capsys, "convert", src, "--out", out, "--shard-size", 10)
    code, printed, _ = run(capsys, "inspect", out, "--grid", tmp_path / "grid.png")
    assert code == 0 and "3 shards, 30 samples (png 30)" in printed and "'photo 0'" in printed
    assert Image.open(tmp_path / "grid.png").format == "PNG"
    samples = read_shards(out)[10:20]
    with wds.TarWriter(str(out / "00001.tar")) as tar:  # 00001: sample 3 has no caption
        for k, sample in enumerate(samples):
            tar.write({key: v for key, v in sample.items() if key != "__url__" and (key, k) != ("txt", 3)})
    with tarfile.open(out / "00002.tar") as tar:
        member = tar.getmember("000020005.png")
    data = (out / "00002.tar").read_bytes()
    (out / "00002.tar").write_bytes(data[: member.offset_data + member.size // 2])  # cut inside a member
    (out / "00000.tar").write_bytes((out / "00000.tar").read_bytes()[:512 * 9])  # cut at a member boundary
    code, printed, _ = run(capsys, "inspect", out)
    assert code == 1
    assert "00001.tar 000010003: no caption" in printed and "00002.tar: unreadable tar" in printed
    assert "00001.tar: sha256 differs from the manifest" in printed
    assert "00000.tar: other sample count than the manifest lists (2, not 10)" in printed
    code, printed, _ = run(capsys, "inspect", f"{out}/{{00001..00002}}.tar")
    assert code == 1 and "2 shards, 1" in printed and "no caption" in printed


def test_inspect_albef_json_decodes_the_media(tmp_path, photos, capsys):
    folder, _ = photos
    (folder / "p01.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(60))
    entries = [{"image": f"photos/p0{i}.png", "caption": f"c{i}"} for i in range(3)]
    entries.append({"image": "photos/p00.png", "question": "what?", "answer": "that"})
    src = tmp_path / "ann.json"
    src.write_text(json.dumps(entries))
    code, printed, _ = run(capsys, "inspect", src)
    assert code == 1 and "3 samples (png 3), 1 with questions" in printed
    assert "p01.png: cannot decode png" in printed and "Q: what? A: that" in printed


def test_make_data_writes_shapes_shards(tmp_path, tiny_shapes):
    corpus = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, corpus)
    spec = importlib.util.spec_from_file_location("make_data", REPO / "tools" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    params = ["--images", "160", "--videos", "24", "--size", "64", "--frames", "4", "--seed", "0"]
    summary = (corpus / "annotations" / "summary.json").read_bytes()
    assert make_data.main(["shapes", "--out", str(corpus), *params, "--shards", "--workers", "2"]) == 0
    assert (corpus / "annotations" / "summary.json").read_bytes() == summary  # reused, not regenerated
    for folder, ext, count, questions in (("shards", "png", 160, 6), ("video_shards", "mp4", 24, 4)):
        tars = sorted((corpus / folder).glob("*.tar"))
        samples = read_shards(corpus / folder)
        assert len(tars) >= 2 and len(samples) == count == manifest(corpus / folder)["samples"]
        metas = [json.loads(s["json"]) for s in samples]
        assert all(ext in s and len(m["captions"]) == 5 and len(m["questions"]) == questions
                   for s, m in zip(samples, metas))
        assert all(s["txt"].decode() == m["captions"][0] for s, m in zip(samples, metas))
    first = json.loads((corpus / "annotations" / "vqa_train.json").read_text())[0]
    shard_meta = json.loads(read_shards(corpus / "shards")[0]["json"])
    assert first["question"] == shard_meta["questions"][0]["question"]
