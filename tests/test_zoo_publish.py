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
from mmfm import cli, zoo
from mmfm.config import model_config
from mmfm.errors import ModelError, ZooError
from mmfm.models.io import build_model, read_metadata, save_model
from mmfm.run import resolve_checkpoint
from mmfm.zoo.manifest import MANIFEST_HEADER, load_manifest

REPO = Path(__file__).resolve().parents[1]
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
        published = manifest.parent / "weights" / "tiny-shapes.safetensors"
        server.add("/zoo/tiny-shapes.safetensors", published.read_bytes())
        path = zoo.resolve("tiny-shapes", quiet=True)
        assert server.requests_for("/zoo/tiny-shapes.safetensors") == [("GET", None)]  # the URL came first
    assert entry["files"]["weights"]["sources"] == [
        server.url("/zoo/tiny-shapes.safetensors"),
        "file:weights/tiny-shapes.safetensors",
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
    assert entry["files"]["weights"]["sources"] == ["file:weights/tiny-shapes.safetensors"]
    assert entry["dtype"] == "float32"
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


def test_publish_refreshes_an_older_schema_header(tmp_path, monkeypatch, make_run):
    manifest = isolate_zoo(tmp_path, monkeypatch)
    manifest.write_text(MANIFEST_HEADER.splitlines(keepends=True)[0] + "# an older schema comment\n[]\n")
    make_run(tmp_path / "run")
    zoo.publish(tmp_path / "run", "tiny")
    assert manifest.read_text().startswith(MANIFEST_HEADER + "- name: tiny\n")


def test_publish_half_stores_float16_that_loads_as_float32(tmp_path, monkeypatch, make_run, checkpoint,
                                                            tiny_model):
    manifest = isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    entry = zoo.publish(tmp_path / "run", "tiny-half", half=True, hf_repo="org/repo")
    published = manifest.parent / "weights" / "tiny-half.safetensors"
    assert entry["files"]["weights"]["sources"] == [
        "file:weights/tiny-half.safetensors",
        "hf-hub:org/repo/tiny-half.safetensors",
    ]
    assert entry["dtype"] == "float16" and load_manifest()[0].dtype == "float16"
    assert entry["files"]["weights"]["size"] == published.stat().st_size < 0.6 * checkpoint.stat().st_size
    assert read_metadata(published) == read_metadata(checkpoint)
    state_dict, _ = zoo.load_state_dict(published)
    assert {tensor.dtype for tensor in state_dict.values()} == {torch.float16}

    loaded = mmfm.create_model("tiny-half")  # through the zoo: file: source, cache, load_model
    expected = tiny_model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, expected[key].half().float()), key  # exactly the fp16 values
        torch.testing.assert_close(value, expected[key], rtol=1e-3, atol=1e-4)


def test_publish_half_keeps_integer_and_bool_tensors(tmp_path, monkeypatch, make_run, checkpoint):
    manifest = isolate_zoo(tmp_path, monkeypatch)
    run = make_run(tmp_path / "run")
    tensors = {"w": torch.randn(3, 4, dtype=torch.float64), "steps": torch.arange(5),
               "flags": torch.tensor([True, False])}
    save_file(tensors, str(run / "model.safetensors"), metadata=read_metadata(checkpoint))
    zoo.publish(run, "tiny", half=True)
    state_dict, metadata = zoo.load_state_dict(manifest.parent / "weights" / "tiny.safetensors")
    assert state_dict["w"].dtype == torch.float16 and torch.equal(state_dict["w"], tensors["w"].half())
    assert state_dict["steps"].dtype == torch.int64 and torch.equal(state_dict["steps"], tensors["steps"])
    assert state_dict["flags"].dtype == torch.bool and torch.equal(state_dict["flags"], tensors["flags"])
    assert metadata == read_metadata(checkpoint)


def test_publish_refuses_a_checkpoint_of_mixed_float_dtypes_unless_half(tmp_path, monkeypatch, make_run,
                                                                        checkpoint):
    isolate_zoo(tmp_path, monkeypatch)
    run = make_run(tmp_path / "run")
    tensors = {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.bfloat16)}
    save_file(tensors, str(run / "model.safetensors"), metadata=read_metadata(checkpoint))
    with pytest.raises(ZooError, match=r"floating-point tensors are \['BF16', 'F32'\].*--half"):
        zoo.publish(run, "tiny")
    assert zoo.publish(run, "tiny", half=True)["dtype"] == "float16"


def test_publish_refuses_a_file_over_the_size_cap(tmp_path, monkeypatch, make_run, checkpoint):
    manifest = isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    full_mb = checkpoint.stat().st_size / 1e6
    limit = round(full_mb * 0.75, 3)
    size = checkpoint.stat().st_size
    message = rf"weights/tiny\.safetensors would be {full_mb:.1f} MB \({size} bytes\), over the {limit:g} MB"
    message += r" limit.*--half"
    with pytest.raises(ZooError, match=message):
        zoo.publish(tmp_path / "run", "tiny", max_size_mb=limit)
    assert load_manifest() == [] and list((manifest.parent / "weights").iterdir()) == []
    assert zoo.publish(tmp_path / "run", "tiny", max_size_mb=limit, half=True)["dtype"] == "float16"


def test_publish_lists_the_url_then_the_file_then_the_hub(tmp_path, monkeypatch, make_run):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    entry = zoo.publish(tmp_path / "run", "tiny", base_url="https://example.org/zoo/", hf_repo="org/repo")
    assert entry["files"]["weights"]["sources"] == [
        "https://example.org/zoo/tiny.safetensors",
        "file:weights/tiny.safetensors",
        "hf-hub:org/repo/tiny.safetensors",
    ]
    with pytest.raises(ZooError, match=r"--hf-repo 'repo' must look like ORG/REPO"):
        zoo.publish(tmp_path / "run", "tiny2", hf_repo="repo")


def test_publish_records_how_the_checkpoint_was_trained(tmp_path, monkeypatch, make_run):
    isolate_zoo(tmp_path, monkeypatch)
    run = make_run(tmp_path / "run")
    entry = zoo.publish(run, "tiny", budget="300 steps, 2 min", hardware="2 CPU cores")
    training = {
        "command": f"python tools/train.py --config {run.as_posix()}/config.yaml",
        "budget": "300 steps, 2 min",
        "hardware": "2 CPU cores",
    }
    assert entry["training"] == training and load_manifest()[0].training == training
    again = zoo.publish(run, "tiny", overwrite=True, train_command="mmfm train --config c.yaml")
    assert again["training"] == {"command": "mmfm train --config c.yaml"}
    assert load_manifest()[0].to_dict() == again


def test_eval_checkpoint_accepts_a_zoo_name(tmp_path, monkeypatch, make_run, tiny_model):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    zoo.publish(tmp_path / "run", "tiny-shapes")
    evaluated = []  # a real evaluation is the tasks' business: here only which model --checkpoint loads
    monkeypatch.setattr("mmfm.run.timed_evaluate",
                        lambda model, cfg, quiet: evaluated.append(model) or {"x": 1})
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("mmfm.run",))
    argv = ["eval", "--checkpoint", "tiny-shapes", "--config", str(REPO / "configs" / "demo_shapes.yaml"),
            "--output", str(tmp_path / "eval"), "--quiet"]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == {"x": 1}
    expected = tiny_model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in evaluated[0].state_dict().items())
    assert resolve_checkpoint("tiny-shapes") == zoo.resolve("tiny-shapes")


def test_an_existing_path_wins_over_a_zoo_name(tmp_path, monkeypatch, make_run):
    isolate_zoo(tmp_path, monkeypatch)
    make_run(tmp_path / "run")
    zoo.publish(tmp_path / "run", "tiny-shapes")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-shapes").mkdir()
    assert resolve_checkpoint("tiny-shapes") == Path("tiny-shapes")


def test_eval_checkpoint_that_is_neither_path_nor_zoo_name(tmp_path, monkeypatch, capsys):
    isolate_zoo(tmp_path, monkeypatch)
    with pytest.raises(ModelError, match=r"--checkpoint nope: no such run directory or \.safetensors file, "
                                         r"and no model of that name in the model zoo .*`mmfm zoo list`"):
        resolve_checkpoint("nope")
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("mmfm.run",))
    argv = ["eval", "--checkpoint", "runs/nope", "--config", str(REPO / "configs" / "demo_shapes.yaml"),
            "--output", str(tmp_path / "eval")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmfm eval: error: --checkpoint runs/nope: no such run directory")
    assert "`mmfm zoo list`" in err and err.count("\n") == 1


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
