"""A checkpoint is data, not instructions: its metadata never makes mmfm fetch or open anything, and a
damaged or crafted file is one clear ModelError (one line, exit code 2 from the CLI), never a traceback."""

import inspect
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mmfm
from mmfm.config import ModelConfig
from mmfm.errors import ModelError
from mmfm.models.io import ANSWERS_KEY, ARCH_KEY, WEIGHT_SOURCE_KEYS, load_model, load_state_dict, save_model
from mmfm.models.model import MMFM
from mmfm.models.segmentation import SegmentationModel

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = "test_resnet"  # timm's smallest feature model; its default weights live on the Hugging Face Hub


class Listener:
    """A TCP socket on 127.0.0.1 that counts the connections made to it (and closes each at once)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/weights.pth"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def _saved(family: str, path: Path) -> Path:
    if family == "segmentation":
        model = SegmentationModel(BACKBONE, 3)
    else:
        model = MMFM(ModelConfig(width=32, depth=2, heads=2, fusion_layer=1, img_size=32, patch_size=8,
                                 context_length=16, max_frames=4, embed_dim=16, vision_tokenizer="backbone",
                                 vision_tokenizer_kwargs={"name": BACKBONE}))
    save_model(model, path)
    return path


def _rewrite(path: Path, out: Path, edit) -> Path:
    """A copy of checkpoint `path` whose metadata `edit(metadata)` changed in place, tensors untouched."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    edit(metadata)
    save_file(load_file(str(path)), str(out), metadata=metadata)
    return out


def _with_kwargs(extra: dict):
    def edit(metadata):
        arch = json.loads(metadata[ARCH_KEY])
        key = "backbone_kwargs" if arch["family"] == "segmentation" else "vision_tokenizer_kwargs"
        arch[key] = {**arch[key], **extra}
        metadata[ARCH_KEY] = json.dumps(arch)
    return edit


def _weight_sources(url: str, sentinel: Path) -> dict[str, dict]:
    """Each way a stored config could steer timm to a weight source (with ``pretrained`` where it needs it)."""
    remote = {"url": url, "hf_hub_id": "", "file": ""}  # no Hub id: timm would GET the url
    return {
        "pretrained_cfg_overlay": {"pretrained": True, "pretrained_cfg_overlay": remote},
        "pretrained_cfg": {"pretrained": True, "pretrained_cfg": {**remote, "architecture": BACKBONE}},
        "checkpoint_path": {"checkpoint_path": str(sentinel)},  # timm opens it even without pretrained
        "pretrained_file": {"pretrained_file": str(sentinel)},
        "cache_dir": {"pretrained": True, "cache_dir": str(sentinel.parent / "cache"),
                      "pretrained_cfg_overlay": remote},
    }


@pytest.mark.parametrize("family", ["mmfm", "segmentation"])
@pytest.mark.parametrize("source", ["pretrained_cfg_overlay", "pretrained_cfg", "checkpoint_path",
                                    "pretrained_file", "cache_dir"])
def test_stored_weight_sources_are_dropped_so_loading_does_no_io(tmp_path, listener, family, source):
    """Dropped, not refused: a checkpoint trained from a pretrained backbone legitimately stores
    ``pretrained``/``pretrained_file``, and its own weights make every weight source moot. The sentinel
    path does not exist, so an attempt to open it would fail the load."""
    sentinel = tmp_path / "elsewhere" / "weights.pth"
    clean = _saved(family, tmp_path / "clean.safetensors")
    crafted = _rewrite(clean, tmp_path / "crafted.safetensors",
                       _with_kwargs(_weight_sources(listener.url, sentinel)[source]))
    # mmfm.load is the inference entry point (a Pipeline serves mmfm-family models); create_model underlies it
    model = mmfm.load(crafted, device="cpu").model if family == "mmfm" else mmfm.create_model(crafted)
    untrained = mmfm.create_model(crafted, pretrained=False)
    assert listener.connections == 0, "loading a checkpoint connected to an address its metadata names"
    assert not sentinel.parent.exists()
    reference = load_model(clean)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    kwargs = model.arch_dict().get("vision_tokenizer_kwargs", model.arch_dict().get("backbone_kwargs"))
    assert not set(kwargs) & WEIGHT_SOURCE_KEYS and isinstance(untrained, type(model))


def test_every_io_parameter_of_timm_create_model_is_a_dropped_weight_source():
    """If timm adds a parameter that fetches or opens something, this fails until it is listed."""
    harmless = {"model_name", "scriptable", "exportable", "no_jit", "kwargs"}
    assert set(inspect.signature(timm.create_model).parameters) - harmless <= WEIGHT_SOURCE_KEYS


def test_unknown_top_level_key_in_stored_architecture_is_a_model_error(tmp_path):
    clean = _saved("mmfm", tmp_path / "clean.safetensors")

    def edit(metadata):
        metadata[ARCH_KEY] = json.dumps({**json.loads(metadata[ARCH_KEY]), "checkpoint_path": "/etc/passwd"})

    crafted = _rewrite(clean, tmp_path / "crafted.safetensors", edit)
    with pytest.raises(ModelError, match=r"unknown config key .*crafted\.safetensors: architecture checkpoint_path"):
        load_model(crafted)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update({ANSWERS_KEY: json.dumps({"vqa": 5})}), r"'mmfm_answers'\['vqa'\] must be a list"),
    (lambda m: m.update({ARCH_KEY: json.dumps({**json.loads(m[ARCH_KEY]), "width": -4})}),
     "the architecture it stores cannot be built"),
])
def test_crafted_metadata_values_are_model_errors(tmp_path, edit, match):
    crafted = _rewrite(_saved("mmfm", tmp_path / "clean.safetensors"), tmp_path / "crafted.safetensors", edit)
    with pytest.raises(ModelError, match=match):
        mmfm.create_model(crafted)


def test_damaged_pickles_are_model_errors(tmp_path):
    (tmp_path / "text.pth").write_text("hello")  # torch.load raises a KeyError on it
    (tmp_path / "code.pth").write_bytes(pickle.dumps(os.system))  # a global: refused by weights_only
    with pytest.raises(ModelError, match="text.pth is corrupt or not a torch file"):
        load_state_dict(tmp_path / "text.pth")
    with pytest.raises(ModelError, match="refusing to load"):
        load_state_dict(tmp_path / "code.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pkl")
    for pickled in ("text.pth", "code.pth", "weights.pkl"):  # as the weights of a zoo architecture
        with pytest.raises(ModelError, match=f"{pickled} is not a readable safetensors file"):
            mmfm.create_model(mmfm.list_models()[0], pretrained=tmp_path / pickled)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mmfm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)


def test_cli_with_a_pickle_or_crafted_checkpoint_prints_one_line_and_exits_2(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pkl")
    crafted = _rewrite(_saved("mmfm", tmp_path / "clean.safetensors"), tmp_path / "crafted.safetensors",
                       lambda m: m.update({ANSWERS_KEY: json.dumps({"vqa": 5})}))
    config = str(ROOT / "configs" / "demo_shapes.yaml")
    for checkpoint, match in (("weights.pkl", "not a readable safetensors file"), (crafted.name, "mmfm_answers")):
        result = _cli("eval", "--checkpoint", checkpoint, "--config", config, "--output", "out", cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert lines[-1].startswith("mmfm eval: error:") and match in lines[-1]
