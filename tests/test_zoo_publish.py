"""Publishing a run directory, downloading it back, and loading checkpoints safely."""

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from zoo_server import ZooServer, isolate_zoo

from mmfm import zoo
from mmfm.errors import ZooError
from mmfm.zoo.manifest import load_manifest

CONFIG = {"name": "tiny", "depth": 2, "fusion_layer": 1, "image_size": 32}


def make_run(run_dir: Path, metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """A trained-run folder: model.safetensors (+ mmfm metadata), metrics.json, config.yaml."""
    tensors = {"trunk.weight": torch.randn(4, 3), "head.bias": torch.arange(5, dtype=torch.float16)}
    run_dir.mkdir(parents=True)
    if metadata is None:
        metadata = {"mmfm_config": json.dumps(CONFIG), "mmfm_format": "1"}
    save_file(tensors, str(run_dir / "model.safetensors"), metadata=metadata)
    (run_dir / "metrics.json").write_text(json.dumps({"txt_r1": 41.5, "val": {"img_r1": 30.0}, "note": "x"}))
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"task": "retrieval", "data": {"mean": [0.5], "frames": 4}})
    )
    return tensors


def test_publish_download_load_round_trip(tmp_path, monkeypatch):
    manifest = isolate_zoo(tmp_path, monkeypatch)
    tensors = make_run(tmp_path / "run")
    with ZooServer() as server:
        entry = zoo.publish(tmp_path / "run", "tiny-shapes", description="test", base_url=server.url("/zoo"))
        published = manifest.parent / "tiny-shapes.safetensors"
        server.add("/zoo/tiny-shapes.safetensors", published.read_bytes())
        path = zoo.resolve("tiny-shapes", quiet=True)
        assert server.requests_for("/zoo/tiny-shapes.safetensors") == [("GET", None)]  # the URL came first
    assert entry["files"]["weights"]["sources"] == [
        server.url("/zoo/tiny-shapes.safetensors"),
        "file:tiny-shapes.safetensors",
    ]
    assert entry["architecture"] == CONFIG
    assert entry["task"] == "retrieval"
    assert entry["metrics"] == {"txt_r1": 41.5, "val.img_r1": 30.0}
    assert entry["preprocessing"] == {"image_size": 32, "mean": [0.5], "frames": 4}
    assert entry["params"] == 17
    assert [e.name for e in load_manifest()] == ["tiny-shapes"]
    state_dict, metadata = zoo.load_state_dict(path)
    assert state_dict.keys() == tensors.keys()
    assert all(
        torch.equal(state_dict[k], tensors[k]) and state_dict[k].dtype == tensors[k].dtype for k in tensors
    )
    assert metadata == {"mmfm_config": json.dumps(CONFIG), "mmfm_format": "1"}
    assert zoo.read_config(path) == CONFIG


def test_publish_without_base_url_serves_from_the_zoo_folder(tmp_path, monkeypatch):
    isolate_zoo(tmp_path, monkeypatch)
    tensors = make_run(tmp_path / "run")
    zoo.publish(tmp_path / "run", "tiny")
    state_dict, _ = zoo.load_state_dict(zoo.resolve("tiny", quiet=True))
    assert torch.equal(state_dict["trunk.weight"], tensors["trunk.weight"])


def test_publish_refuses_to_overwrite_unless_asked(tmp_path, monkeypatch):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    first = zoo.publish(tmp_path / "run", "tiny")
    with pytest.raises(ZooError, match="'tiny' already exists.*--overwrite"):
        zoo.publish(tmp_path / "run", "tiny")
    second = zoo.publish(tmp_path / "run", "tiny", overwrite=True, description="again")
    assert second["files"] == first["files"]
    assert [e.description for e in load_manifest()] == ["again"]


def test_publish_keeps_the_manifest_header(tmp_path, monkeypatch):
    manifest = isolate_zoo(tmp_path, monkeypatch)
    manifest.write_text("# my private zoo\n[]\n")
    make_run(tmp_path / "run")
    zoo.publish(tmp_path / "run", "tiny")
    assert manifest.read_text().startswith("# my private zoo\n- name: tiny\n")


def test_publish_rejects_a_checkpoint_without_mmfm_metadata(tmp_path, monkeypatch):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run", metadata={"format": "pt"})
    with pytest.raises(ZooError, match="no 'mmfm_config' metadata"):
        zoo.publish(tmp_path / "run", "tiny")
    assert load_manifest() == []


def test_publish_requires_metrics(tmp_path, monkeypatch):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    (tmp_path / "run" / "metrics.json").unlink()
    with pytest.raises(ZooError, match=r"metrics\.json is missing"):
        zoo.publish(tmp_path / "run", "tiny")


class RunsCode:
    """Unpickling this object would create a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_rejected_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "payload": RunsCode(marker)}, checkpoint)
    with pytest.raises(ZooError, match="refusing to load .*evil.pth: the pickle holds code"):
        zoo.load_state_dict(checkpoint)
    assert not marker.exists()


def test_plain_pickled_state_dict_loads(tmp_path):
    checkpoint = tmp_path / "ok.pt"
    torch.save({"state_dict": {"weight": torch.arange(3.0)}}, checkpoint)
    state_dict, metadata = zoo.load_state_dict(checkpoint)
    assert torch.equal(state_dict["weight"], torch.arange(3.0)) and metadata == {}


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    checkpoint = tmp_path / "broken.safetensors"
    checkpoint.write_bytes(pickle.dumps("not safetensors"))
    with pytest.raises(ZooError, match="broken.safetensors is not a readable safetensors file"):
        zoo.load_state_dict(checkpoint)
