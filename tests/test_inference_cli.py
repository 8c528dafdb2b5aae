"""`mmfm index build / search / vqa / serve`: outputs, and bad input as one line + exit code 2."""

import json
import os
import subprocess
import sys

import pytest
from inference_fixtures import *

from mmfm.cli import main


@pytest.fixture(scope="module")
def built_index(tiny_checkpoint, gallery, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "idx"
    images = tmp_path_factory.mktemp("gallery")
    for path in gallery[0]:
        (images / path.rsplit("/", 1)[-1]).symlink_to(path)
    assert main(["--quiet", "index", "build", "--model", str(tiny_checkpoint), "--images", str(images),
                 "--out", str(out)]) == 0
    return out, images


def test_index_build_and_search_json(built_index, tiny_checkpoint, gallery, capsys):
    out, images = built_index
    capsys.readouterr()
    caption = gallery[1][3]
    assert main(["search", "--index", str(out), "--model", str(tiny_checkpoint), "--text", caption,
                 "--k", "5", "--rerank", "8", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 5 and {"id", "score", "itc", "itm"} <= set(hits[0])
    assert str(images / gallery[0][3].rsplit("/", 1)[-1]) in [h["id"] for h in hits]


def test_search_plain_output_is_ranked(built_index, tiny_checkpoint, gallery, capsys):
    out, _ = built_index
    capsys.readouterr()
    assert main(["search", "--index", str(out), "--model", str(tiny_checkpoint), "--text", gallery[1][0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    scores = [float(line.split()[1]) for line in lines]
    assert len(lines) == 10 and scores == sorted(scores, reverse=True)


def test_vqa_prints_answers(tiny_checkpoint, gallery, videos, capsys):
    assert main(["vqa", "--model", str(tiny_checkpoint), "--image", gallery[0][0], "--question", "is it red?",
                 "--topk", "3", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 3 and all(0 <= a["probability"] <= 1 for a in answers)
    assert main(["vqa", "--model", str(tiny_checkpoint), "--video", videos[0], "--question", "where?"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5


@pytest.mark.parametrize("case,match", [
    ("not_image", "not_image.png: cannot decode"),
    ("bad_video", "broken.mp4"),
    ("bomb", "decompression bomb"),
    ("empty_question", "question is empty"),
    ("no_files", "no image files found"),
    ("missing_model", "no such file"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, bad_inputs, gallery, tmp_path, capsys, case, match):
    model = ["--model", str(tiny_checkpoint)]
    argv = {
        "not_image": ["vqa", *model, "--image", str(bad_inputs["not_image"]), "--question", "what?"],
        "bad_video": ["vqa", *model, "--video", str(bad_inputs["bad_video"]), "--question", "what?"],
        "bomb": ["index", "build", *model, "--images", str(bad_inputs["bomb"]), "--out", str(tmp_path / "i")],
        "empty_question": ["vqa", *model, "--image", gallery[0][0], "--question", ""],
        "no_files": ["index", "build", *model, "--images", str(tmp_path / "*.png"), "--out", str(tmp_path / "i")],
        "missing_model": ["vqa", "--model", "runs/nowhere/model.safetensors", "--image", gallery[0][0],
                          "--question", "what?"],
    }[case]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err


def test_console_script_reports_unknown_zoo_name(tmp_path):
    manifest = tmp_path / "models.yaml"
    manifest.write_text("[]\n")
    result = subprocess.run([sys.executable, "-m", "mmfm.cli", "vqa", "--model", "mmfm-nope", "--image", "x.png",
                             "--question", "q"], check=False, capture_output=True, text=True,
                            env={**os.environ, "MMFM_ZOO_MANIFEST": str(manifest)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "unknown model 'mmfm-nope'" in result.stderr
