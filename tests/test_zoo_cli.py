"""`mmfm zoo ...` through the real console-script entry point, and the README generator."""

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml
from zoo_server import isolate_zoo, manifest_entry

from mmfm import cli
from mmfm.zoo.manifest import MANIFEST_HEADER

REPO = Path(__file__).resolve().parents[1]
DATA = os.urandom(4096)


@pytest.fixture
def zoo_cli(tmp_path, monkeypatch):
    """Run `mmfm zoo ...` in-process on a one-entry zoo whose weights sit next to the manifest."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("mmfm.zoo.cli",))  # mmfm.inference.cli is not ours
    entry = manifest_entry("tiny", DATA, ["file:tiny.safetensors"], tasks=["image_text", "video_text"])
    manifest = isolate_zoo(tmp_path, monkeypatch, [entry])
    (manifest.parent / "tiny.safetensors").write_bytes(DATA)
    return lambda *argv: cli.main(["--quiet", "zoo", *argv])


def test_download_prints_the_verified_path(zoo_cli, capsys):
    assert zoo_cli("download", "tiny") == 0
    path = Path(capsys.readouterr().out.strip())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(DATA).hexdigest()


def test_errors_are_one_line_and_exit_code_2(zoo_cli, capsys):
    assert zoo_cli("download", "tinny") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("mmfm zoo: error: unknown model 'tinny'") and "did you mean tiny?" in err


def test_verify_reports_missing_ok_and_corrupt(zoo_cli, capsys):
    assert zoo_cli("verify") == 0
    assert capsys.readouterr().out.startswith("missing  tiny weights ")
    zoo_cli("download", "tiny")
    path = Path(capsys.readouterr().out.strip())
    assert zoo_cli("verify", "tiny") == 0
    assert capsys.readouterr().out == f"OK       tiny weights {path}\n"
    path.write_bytes(bytes(len(DATA)))  # same size, wrong bytes: only a re-hash can tell
    assert zoo_cli("verify") == 1
    out = capsys.readouterr().out
    assert out.startswith(f"CORRUPT  tiny weights {path}\n") and "mmfm zoo download NAME" in out


def test_list_info_and_clear(zoo_cli, capsys):
    zoo_cli("download", "tiny")
    capsys.readouterr()
    assert zoo_cli("list") == 0
    assert capsys.readouterr().out.split() == ["tiny", "image_text,video_text", "4.0", "KiB", "cached"]
    assert zoo_cli("info", "tiny") == 0
    assert yaml.safe_load(capsys.readouterr().out)["metrics"] == {"txt_r1": 12.5}
    assert zoo_cli("clear", "tiny") == 0
    assert capsys.readouterr().out.startswith("removed ")
    assert zoo_cli("verify") == 0 and capsys.readouterr().out.startswith("missing")


def write_run(run: Path) -> None:
    """A run folder whose checkpoint carries format-2 metadata (the zoo reads only that, not the tensors)."""
    import torch
    from safetensors.torch import save_file

    run.mkdir()
    metadata = {
        "mmfm_arch": json.dumps({"arch": "mmfm-demo", "family": "mmfm"}),
        "mmfm_preprocess": json.dumps({"image_size": 64, "mean": [0.5], "std": [0.5], "num_frames": 2}),
        "mmfm_answers": json.dumps({"vqa": ["yes", "no"]}),
        "mmfm_format": "2",
    }
    tensors = {"w": torch.zeros(2), "steps": torch.arange(3)}
    save_file(tensors, str(run / "model.safetensors"), metadata=metadata)
    (run / "metrics.json").write_text(json.dumps({"vqa_acc": 55.0}))
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"tasks": {"image_text": 1.0}}}))


def test_publish_command_adds_an_entry(zoo_cli, tmp_path, capsys):
    write_run(tmp_path / "run")
    run = str(tmp_path / "run")
    argv = ("--name", "tiny-vqa", "--task", "vqa", "--task", "image_text", "--tag", "shapes")
    assert zoo_cli("publish", run, *argv) == 0
    entry = json.loads(capsys.readouterr().out.split("\nregenerate")[0])
    assert entry["tags"] == ["shapes"] and entry["tasks"] == ["vqa", "image_text"]
    assert entry["architecture"] == {"arch": "mmfm-demo", "family": "mmfm"}
    assert entry["preprocessing"] == {"image_size": 64, "mean": [0.5], "std": [0.5], "num_frames": 2}
    assert zoo_cli("publish", run, "--name", "tiny-vqa") == 2
    assert "already exists" in capsys.readouterr().err
    assert zoo_cli("publish", run, "--name", "tiny-rt") == 0
    assert json.loads(capsys.readouterr().out.split("\nregenerate")[0])["tasks"] == ["image_text"]
    assert zoo_cli("publish", run, "--name", "tiny-x", "--task", "retrieval") == 2
    assert "task 'retrieval' is not a task" in capsys.readouterr().err


def test_publish_command_half_mirrors_training_and_size_cap(zoo_cli, tmp_path, capsys):
    write_run(tmp_path / "run")
    run = str(tmp_path / "run")
    assert zoo_cli("publish", run, "--name", "big", "--max-size-mb", "0.0001") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights/big.safetensors would be 0.0 MB (" in err
    assert "bytes), over the 0.0001 MB limit" in err
    assert "--half" in err and not (tmp_path / "zoo" / "weights" / "big.safetensors").exists()
    argv = ("--name", "tiny-half", "--half", "--hf-repo", "org/repo")
    argv += ("--budget", "5 min", "--hardware", "1 CPU")
    assert zoo_cli("publish", run, *argv) == 0
    entry = json.loads(capsys.readouterr().out.split("\nregenerate")[0])
    assert entry["dtype"] == "float16"
    assert entry["files"]["weights"]["sources"] == [
        "file:weights/tiny-half.safetensors",
        "hf-hub:org/repo/tiny-half.safetensors",
    ]
    command = f"python tools/train.py --config {Path(run).as_posix()}/config.yaml"
    assert entry["training"] == {"command": command, "budget": "5 min", "hardware": "1 CPU"}
    assert zoo_cli("publish", run, "--name", "tiny-cmd", "--train-command", "make train") == 0
    entry = json.loads(capsys.readouterr().out.split("\nregenerate")[0])
    assert entry["training"] == {"command": "make train"} and entry["dtype"] == "float32"


@pytest.fixture
def readme_tool():
    """`tools/make_zoo_readme.py`'s main, run in-process: a subprocess would import torch again per call.

    The script itself runs as a subprocess in test_zoo_manifest.py (on the repository's manifest)."""
    spec = importlib.util.spec_from_file_location("make_zoo_readme", REPO / "tools" / "make_zoo_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda manifest, *extra: module.main(["--manifest", str(manifest), *extra])


def test_readme_check_detects_a_stale_table(tmp_path, readme_tool, capsys):
    manifest = tmp_path / "models.yaml"
    entry = manifest_entry("tiny", DATA, ["file:a"], tasks=["vqa", "image_text"], params=2_500_000)
    manifest.write_text(MANIFEST_HEADER + yaml.safe_dump([entry]))
    assert readme_tool(manifest, "--check") == 1  # no README yet
    assert readme_tool(manifest) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "`mmfm_arch`" in readme and 'mmfm.create_model("NAME")' in readme
    row = next(line for line in readme.splitlines() if line.startswith("| `tiny`"))
    sha = hashlib.sha256(DATA).hexdigest()
    assert row == ("| `tiny` | vqa, image_text | tiny | 2.5M "
                   f"| txt_r1 12.50 | 4.0 KiB | - | - | apache-2.0 | `{sha[:12]}` |")
    assert "How they were trained" not in readme
    assert readme_tool(manifest, "--check") == 0
    manifest.write_text(manifest.read_text().replace("12.5", "13.5"))
    capsys.readouterr()
    assert readme_tool(manifest, "--check") == 1 and "stale" in capsys.readouterr().err


def test_readme_shows_dtype_and_how_each_model_was_trained(tmp_path, readme_tool):
    manifest = tmp_path / "models.yaml"
    command = "python tools/train.py --config c.yaml"
    training = {"hardware": "2 CPU cores", "command": command, "budget": "20 min"}  # listed command first
    entries = [
        manifest_entry("tiny", DATA, ["file:a"], dtype="float16", training=training),
        manifest_entry("other", DATA, ["file:b"], dtype="float32"),
    ]
    manifest.write_text(MANIFEST_HEADER + yaml.safe_dump(entries))
    assert readme_tool(manifest) == 0
    readme = (tmp_path / "README.md").read_text()
    rows = {line.split(" | ")[0]: line.split(" | ") for line in readme.splitlines() if line.startswith("| `")}
    assert rows["| `tiny`"][6:8] == ["float16", "20 min"] and rows["| `other`"][6:8] == ["float32", "-"]
    section = readme.split("## How they were trained\n", 1)[1]
    assert section == ("\n### `tiny`\n\n- command: `python tools/train.py --config c.yaml`\n"
                       "- budget: 20 min\n- hardware: 2 CPU cores\n")
