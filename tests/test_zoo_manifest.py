"""Manifest schema validation, name/tag lookup and the repository's own manifest + README."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from zoo_server import isolate_zoo, manifest_entry

import mmfm
from mmfm import zoo
from mmfm.architectures import list_architectures
from mmfm.errors import ZooError
from mmfm.tasks import list_tasks
from mmfm.zoo.manifest import DEFAULT_MANIFEST, find_entry, load_manifest, save_manifest

REPO = Path(__file__).resolve().parents[1]
DATA = b"weights"


def write(tmp_path, monkeypatch, *entries):
    return isolate_zoo(tmp_path, monkeypatch, list(entries))


def test_unknown_name_suggests_close_matches(tmp_path, monkeypatch):
    write(
        tmp_path,
        monkeypatch,
        manifest_entry("mmfm-small-shapes", DATA, ["file:a"]),
        manifest_entry("mmfm-base-coco", DATA, ["file:b"]),
    )
    with pytest.raises(ZooError, match=r"unknown model 'mmfm-smal-shapes'.*did you mean mmfm-small-shapes\?"):
        zoo.resolve("mmfm-smal-shapes")


def test_unknown_name_without_close_match_points_to_the_list(tmp_path, monkeypatch):
    write(tmp_path, monkeypatch, manifest_entry("mmfm-small-shapes", DATA, ["file:a"]))
    with pytest.raises(ZooError, match="mmfm zoo list"):
        zoo.info("resnet")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("license"), r"entry #0 \(tiny\): missing key 'license'"),
        (lambda e: e.update(colour="red"), r"entry #0 \(tiny\): unknown key 'colour'"),
        (lambda e: e["files"]["weights"].pop("sha256"), r"files\.weights: missing key 'sha256'"),
        (lambda e: e["files"]["weights"].update(sha256="abc"), "64 hex digits"),
        (lambda e: e["files"]["weights"].update(sources=["ftp://x/y"]), "must start with one of"),
        (lambda e: e.update(tasks="vqa"), "key 'tasks' must be a list"),
        (lambda e: e.update(tasks=[]), "key 'tasks' must be a non-empty list"),
        (lambda e: e.update(task="vqa"), r"unknown key 'task'"),
        (lambda e: e["preprocessing"].update(crop=1), r"preprocessing: unknown key 'crop'"),
        (lambda e: e.update(training="20 min"), r"entry #0 \(tiny\): key 'training' must be a mapping"),
        (lambda e: e.update(training={"budget": 20}), r"key 'training\.budget' must be a string, got int"),
        (lambda e: e.update(training={"gpus": "1"}), r"\(tiny\) training: unknown key 'gpus' \(allowed: c"),
        (lambda e: e.update(dtype="int8"), r"key 'dtype' must be one of float16, float32, got 'int8'"),
    ],
)
def test_schema_errors_name_entry_and_key(tmp_path, monkeypatch, change, message):
    entry = manifest_entry("tiny", DATA, ["file:a"])
    change(entry)
    write(tmp_path, monkeypatch, entry)
    with pytest.raises(ZooError, match=message):
        load_manifest()


def test_training_and_dtype_round_trip(tmp_path, monkeypatch):
    training = {"command": "python tools/train.py --config runs/zoo_s/config.yaml", "budget": "20 min",
                "hardware": "2 CPU cores"}
    written = manifest_entry("tiny", DATA, ["file:a"], dtype="float16", training=training)
    manifest = write(tmp_path, monkeypatch, written)
    entry = load_manifest()[0]
    assert entry.dtype == "float16" and entry.training == training
    assert entry.to_dict() == written
    save_manifest([entry], manifest)
    assert load_manifest()[0] == entry and yaml.safe_load(manifest.read_text()) == [written]


def link_out(zoo_dir: Path, outside: Path) -> str:
    """A file: source inside the folder that is a symbolic link to a file outside it."""
    (zoo_dir / "weights").mkdir()
    (zoo_dir / "weights" / "tiny.safetensors").symlink_to(outside)
    return "file:weights/tiny.safetensors"


@pytest.mark.parametrize(
    "source",
    [
        lambda zoo_dir, outside: "file:../escape.safetensors",
        lambda zoo_dir, outside: "file:weights/../../escape.safetensors",
        lambda zoo_dir, outside: f"file:{outside}",
        link_out,
    ],
    ids=["parent", "parent-via-subfolder", "absolute", "symlink"],
)
def test_file_source_outside_the_manifest_folder_is_refused(tmp_path, monkeypatch, source):
    outside = tmp_path / "escape.safetensors"
    outside.write_bytes(DATA)
    zoo_dir = tmp_path / "zoo"  # where write() puts models.yaml
    zoo_dir.mkdir()
    write(tmp_path, monkeypatch, manifest_entry("tiny", DATA, [source(zoo_dir, outside)]))
    with pytest.raises(ZooError, match=r"of model 'tiny': a file: source must be a path inside the manifest"):
        zoo.resolve("tiny", quiet=True)
    assert not any((tmp_path / "home").rglob("*.safetensors"))


def test_unknown_task_is_rejected_naming_entry_task_and_the_valid_ones(tmp_path, monkeypatch):
    write(tmp_path, monkeypatch, manifest_entry("tiny", DATA, ["file:a"], tasks=["vqa", "retrieval"]))
    with pytest.raises(ZooError) as info:
        load_manifest()
    message = str(info.value)
    assert "entry #0 (tiny): task 'retrieval' is not a task" in message
    assert message.endswith("use one of " + ", ".join(list_tasks()))


def test_duplicate_names_are_rejected(tmp_path, monkeypatch):
    write(
        tmp_path,
        monkeypatch,
        manifest_entry("tiny", DATA, ["file:a"]),
        manifest_entry("tiny", DATA, ["file:b"]),
    )
    with pytest.raises(ZooError, match="'tiny' appears twice"):
        load_manifest()


def test_tag_picks_the_entry_of_an_architecture(tmp_path, monkeypatch):
    write(
        tmp_path,
        monkeypatch,
        manifest_entry("tiny-shapes", DATA, ["file:a"], tags=["shapes"]),
        manifest_entry("tiny-coco", DATA, ["file:b"], tags=["coco"]),
    )
    assert find_entry("tiny", tag="coco").name == "tiny-coco"
    assert find_entry("tiny-shapes", tag="shapes").name == "tiny-shapes"
    with pytest.raises(ZooError, match=r"no zoo entry tagged 'vqa'; tags available: \['coco', 'shapes'\]"):
        find_entry("tiny", tag="vqa")


def test_list_models_and_info(tmp_path, monkeypatch):
    write(
        tmp_path,
        monkeypatch,
        manifest_entry("b-model", DATA, ["file:b"]),
        manifest_entry("a-model", DATA, ["file:a"], tasks=["vqa", "image_text"]),
    )
    assert zoo.list_models() == ["a-model", "b-model"]
    assert zoo.list_models(task="vqa") == ["a-model"]
    assert zoo.list_models(task="image_text") == ["a-model", "b-model"]
    assert zoo.list_models(task="segmentation") == []
    with pytest.raises(ZooError, match="task 'retrieval' is not a task; use one of vqa"):
        zoo.list_models(task="retrieval")
    assert mmfm.list_models(task="vqa") == ["a-model"]
    assert mmfm.list_models(pretrained=False) == list_architectures()
    details = zoo.info("a-model")
    assert details["metrics"] == {"txt_r1": 12.5}
    assert details["cache_path"].endswith("a-model/" + details["files"]["weights"]["sha256"][:12] + "/a")


def test_missing_manifest_names_the_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFM_ZOO_MANIFEST", str(tmp_path / "nope.yaml"))
    with pytest.raises(ZooError, match=r"nope\.yaml not found; check MMFM_ZOO_MANIFEST"):
        zoo.list_models()


def test_repository_manifest_is_valid_and_documents_the_schema():
    assert isinstance(load_manifest(DEFAULT_MANIFEST), list)
    text = DEFAULT_MANIFEST.read_text()
    assert text.startswith("# mmfm model zoo manifest") and "sha256" in text
    assert isinstance(yaml.safe_load(text), list)


def test_repository_readme_is_up_to_date():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_zoo_readme.py"),
            "--check",
            "--manifest",
            str(DEFAULT_MANIFEST),
        ],
        capture_output=True,
        check=False,
        text=True,
    )
    assert result.returncode == 0, result.stderr
