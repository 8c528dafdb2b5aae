"""`hf-hub:` sources through huggingface_hub, pointed at the local server with HF_ENDPOINT."""

import os

import pytest
from zoo_server import ZooServer, isolate_zoo, manifest_entry

from mmfm import zoo
from mmfm.zoo import download

DATA = os.urandom(100_000)
SOURCE = "hf-hub:mmfm-org/zoo/weights/tiny.safetensors"


@pytest.fixture
def hf_server(tmp_path, monkeypatch):
    with ZooServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url(""))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


def test_hf_hub_source_downloads_through_huggingface_hub(hf_server, tmp_path, monkeypatch):
    hf_server.add("/mmfm-org/zoo/weights/tiny.safetensors", DATA)
    isolate_zoo(tmp_path, monkeypatch, [manifest_entry("tiny", DATA, [SOURCE])])
    path = zoo.resolve("tiny", quiet=True)
    assert path.read_bytes() == DATA
    assert path.name == "tiny.safetensors"
    assert ("GET", None) in hf_server.requests_for("/mmfm-org/zoo/weights/tiny.safetensors")


def test_hf_hub_missing_file_falls_back_to_the_next_source(hf_server, tmp_path, monkeypatch):
    mirror = hf_server.add("/mirror/tiny.safetensors", DATA)
    isolate_zoo(tmp_path, monkeypatch, [manifest_entry("tiny", DATA, [SOURCE, mirror])])
    assert zoo.resolve("tiny", quiet=True).read_bytes() == DATA
    assert hf_server.requests_for("/mmfm-org/zoo/weights/tiny.safetensors")  # the hub was asked first


def test_hf_hub_offline_makes_no_request(hf_server, tmp_path, monkeypatch):
    hf_server.add("/mmfm-org/zoo/weights/tiny.safetensors", DATA)
    isolate_zoo(tmp_path, monkeypatch, [manifest_entry("tiny", DATA, [SOURCE])])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(download.OfflineMissing, match=f"tiny.safetensors of model 'tiny'.*{SOURCE}"):
        zoo.resolve("tiny", quiet=True)
    assert hf_server.requests == []


def test_hf_source_parsing():
    assert download.parse_hf_source("hf-hub:org/repo/a/b.safetensors") == (
        "org/repo",
        "a/b.safetensors",
        None,
    )
    assert download.parse_hf_source("hf-hub:org/repo@v1/b.safetensors") == ("org/repo", "b.safetensors", "v1")
    with pytest.raises(download.DownloadError, match="hf-hub:org/repo/path/to/file"):
        download.parse_hf_source("hf-hub:org/b.safetensors")
