"""Publishing a run directory, downloading it back, creating its model, and loading checkpoints safely."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from zoo_server import ZooServer, isolate_zoo

import mmfm
from mmfm import zoo
from mmfm.config import model_config
from mmfm.errors import ModelError, ZooError
from mmfm.models.io import build_model, save_model
from mmfm.zoo.manifest import load_manifest

ANSWERS = {"vqa": ["yes", "no", "two"]}
PREPROCESS = {"image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "num_frames": 4}
TRAIN_TASKS = {"image_text": 1.0, "vqa": 0.5}


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny real model with an answer head and non-default preprocessing, in eval mode."""
    torch.manual_seed(0)
    arch = model_config({"arch": "mmfm-demo", "width": 32, "depth": 2, "heads": 2, "fusion_layer": 1})
    return build_model(arch, ANSWERS, PREPROCESS).eval()


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint") / "model.safetensors"
    save_model(tiny_model, path)
    return path


@pytest.fixture
def make_run(checkpoint):
    """Write a run folder: model.safetensors (format 2), metrics.json, config.yaml with train.tasks."""

    def make(run_dir: Path, train: dict | None = None) -> Path:
        run_dir.mkdir(parents=True)
        shutil.copyfile(checkpoint, run_dir / "model.safetensors")
        metrics = {"txt_r1": 41.5, "val": {"img_r1": 30.0}, "note": "x"}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        config = {"model": {"arch": "mmfm-demo", "width": 32}, "train": train or {"tasks": TRAIN_TASKS}}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        return run_dir

    return make


def outputs(model, pixels: torch.Tensor, texts: list[str]) -> list[torch.Tensor]:
    """ITC features, ITM logits and VQA logits: every part of the model a checkpoint must restore."""
    ids, mask = model.tokenizer(texts)
    with torch.no_grad():
        vision, text = model.encode_vision(pixels), model.encode_text(ids, mask)
        return [vision.feat, text.feat, model.itm_logits(text.tokens, vision.tokens),
                model.answer_logits("vqa", text.tokens, vision.tokens)]


def test_publish_download_load_round_trip(tmp_path, monkeypatch, make_run, tiny_model):
    manifest = isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
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
    assert entry["metrics"] == {"txt_r1": 41.5, "val.img_r1": 30.0}
    assert entry["params"] == sum(p.numel() for p in tiny_model.parameters())
    assert [e.name for e in load_manifest()] == ["tiny-shapes"]
    state_dict, metadata = zoo.load_state_dict(path)
    expected = tiny_model.state_dict()
    assert state_dict.keys() <= expected.keys()
    assert all(torch.equal(state_dict[k], expected[k]) for k in state_dict)
    assert metadata["mmfm_format"] == "2" and json.loads(metadata["mmfm_answers"]) == ANSWERS
    assert zoo.read_info(path).arch == tiny_model.arch_dict()


def test_publish_records_the_checkpoint_and_create_model_loads_it(tmp_path, monkeypatch, make_run,
                                                                  tiny_model):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    entry = zoo.publish(tmp_path / "run", "tiny-shapes")
    assert entry["tasks"] == list(TRAIN_TASKS)
    assert entry["architecture"] == tiny_model.arch_dict()
    assert entry["architecture"]["arch"] == "mmfm-demo" and entry["architecture"]["family"] == "mmfm"
    assert entry["preprocessing"] == PREPROCESS
    assert entry["files"]["weights"]["sources"] == ["file:tiny-shapes.safetensors"]
    assert mmfm.list_models(task="vqa") == ["tiny-shapes"] and mmfm.list_models(task="video_qa") == []

    loaded = mmfm.create_model("tiny-shapes")  # no server: fetched from the file: source into the cache
    assert zoo.cache_path(load_manifest()[0]).is_file()
    assert loaded.answers == ANSWERS and loaded.preprocess == PREPROCESS and not loaded.training
    pixels = torch.rand(2, 3, 64, 64)
    texts = ["a red circle left of a blue square", "two green triangles"]
    for got, want in zip(outputs(loaded, pixels, texts), outputs(tiny_model, pixels, texts), strict=True):
        assert torch.equal(got, want)


def test_explicit_tasks_override_the_run_config(tmp_path, monkeypatch, make_run):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    assert zoo.publish(tmp_path / "run", "tiny", tasks=["vqa"])["tasks"] == ["vqa"]
    assert load_manifest()[0].tasks == ("vqa",)


def test_publish_without_tasks_is_an_error(tmp_path, monkeypatch, make_run):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run", train={"steps": 10})
    with pytest.raises(ZooError, match=r"config\.yaml names no train\.tasks.*--task NAME"):
        zoo.publish(tmp_path / "run", "tiny")
    with pytest.raises(ZooError, match=r"cannot publish .*run: task 'dance' is not a task; use one of"):
        zoo.publish(tmp_path / "run", "tiny", tasks=["vqa", "dance"])
    assert load_manifest() == []


def test_publish_refuses_to_overwrite_unless_asked(tmp_path, monkeypatch, make_run):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    first = zoo.publish(tmp_path / "run", "tiny")
    with pytest.raises(ZooError, match="'tiny' already exists.*--overwrite"):
        zoo.publish(tmp_path / "run", "tiny")
    second = zoo.publish(tmp_path / "run", "tiny", overwrite=True, description="again")
    assert second["files"] == first["files"]
    assert [e.description for e in load_manifest()] == ["again"]


def test_publish_keeps_the_manifest_header(tmp_path, monkeypatch, make_run):
    manifest = isolate_zoo(tmp_path, monkeypatch)
    manifest.write_text("# my private zoo\n[]\n")
    make_run(tmp_path / "run")
    zoo.publish(tmp_path / "run", "tiny")
    assert manifest.read_text().startswith("# my private zoo\n- name: tiny\n")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"format": "pt"}, "no 'mmfm_arch' metadata: it was not saved by mmfm"),
        ({"mmfm_arch": "{}", "mmfm_format": "3"}, "has format '3'; this mmfm reads format '2'"),
    ],
)
def test_publish_rejects_a_checkpoint_without_format_2_metadata(tmp_path, monkeypatch, make_run, metadata,
                                                                message):
    isolate_zoo(tmp_path, monkeypatch)
    run = make_run(tmp_path / "run")
    save_file({"w": torch.zeros(2)}, str(run / "model.safetensors"), metadata=metadata)
    with pytest.raises(ModelError, match=message):
        zoo.publish(run, "tiny")
    assert load_manifest() == []


def test_publish_requires_metrics(tmp_path, monkeypatch, make_run):
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
    with pytest.raises(ModelError, match="refusing to load .*evil.pth: the pickle holds code"):
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
    with pytest.raises(ModelError, match="broken.safetensors is not a readable safetensors file"):
        zoo.load_state_dict(checkpoint)
