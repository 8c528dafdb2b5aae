"""`mmfm zoo ...` through the real console-script entry point, and the README generator."""

import hashlib
import json
import os
import subprocess
import sys
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
    manifest = isolate_zoo(tmp_path, monkeypatch, [manifest_entry("tiny", DATA, ["file:tiny.safetensors"])])
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
    assert capsys.readouterr().out.split() == ["tiny", "retrieval", "4.0", "KiB", "cached"]
    assert zoo_cli("info", "tiny") == 0
    assert yaml.safe_load(capsys.readouterr().out)["metrics"] == {"txt_r1": 12.5}
    assert zoo_cli("clear", "tiny") == 0
    assert capsys.readouterr().out.startswith("removed ")
    assert zoo_cli("verify") == 0 and capsys.readouterr().out.startswith("missing")


def test_publish_command_adds_an_entry(zoo_cli, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    save_file(
        {"w": torch.zeros(2)},
        str(run / "model.safetensors"),
        metadata={"mmfm_config": "{}", "mmfm_format": "1"},
    )
    (run / "metrics.json").write_text(json.dumps({"vqa_acc": 55.0}))
    assert zoo_cli("publish", str(run), "--name", "tiny-vqa", "--task", "vqa", "--tag", "shapes") == 0
    assert json.loads(capsys.readouterr().out.split("\nregenerate")[0])["tags"] == ["shapes"]
    assert zoo_cli("publish", str(run), "--name", "tiny-vqa") == 2
    assert "already exists" in capsys.readouterr().err


def run_readme_tool(manifest: Path, *extra: str) -> subprocess.CompletedProcess:
    tool = REPO / "tools" / "make_zoo_readme.py"
    return subprocess.run(
        [sys.executable, str(tool), "--manifest", str(manifest), *extra],
        capture_output=True,
        text=True,
        check=False,
    )


def test_readme_check_detects_a_stale_table(tmp_path):
    manifest = tmp_path / "models.yaml"
    manifest.write_text(
        MANIFEST_HEADER
        + yaml.safe_dump([manifest_entry("tiny", DATA, ["file:tiny.safetensors"], params=2_500_000)])
    )
    assert run_readme_tool(manifest, "--check").returncode == 1  # no README yet
    assert run_readme_tool(manifest).returncode == 0
    readme = (tmp_path / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `tiny`"))
    assert (
        row
        == f"| `tiny` | retrieval | 2.5M | txt_r1 12.50 | 4.0 KiB | apache-2.0 | `{hashlib.sha256(DATA).hexdigest()[:12]}` |"
    )
    assert run_readme_tool(manifest, "--check").returncode == 0
    manifest.write_text(manifest.read_text().replace("12.5", "13.5"))
    result = run_readme_tool(manifest, "--check")
    assert result.returncode == 1 and "stale" in result.stderr
