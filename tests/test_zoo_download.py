"""Zoo downloads against a local fault-injecting server: resume, hashes, fallback, offline, corruption."""

import errno
import hashlib
import io
import os
import time

import pytest
from zoo_server import ZooServer, isolate_zoo, manifest_entry

from mmfm import zoo
from mmfm.errors import ZooError
from mmfm.zoo import download

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with ZooServer() as srv:
        yield srv


def use_sources(tmp_path, monkeypatch, *sources, data=DATA):
    isolate_zoo(tmp_path, monkeypatch, [manifest_entry("tiny", data, list(sources))])


def cache_files(tmp_path):
    """Every file under the cache except lock files."""
    root = tmp_path / "home"
    return sorted(p.name for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_download_verifies_and_then_uses_the_cache(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA))
    path = zoo.resolve("tiny", quiet=True)
    assert path == tmp_path / "home" / "hub" / "tiny" / SHA[:12] / "tiny.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA
    assert zoo.resolve("tiny", quiet=True) == path
    assert server.requests_for("/w/tiny.safetensors") == [("GET", None)]


def test_dropped_connection_is_resumed_with_a_range_request(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA, drop_after=100_000))
    path = zoo.resolve("tiny", quiet=True)
    requests = server.requests_for("/w/tiny.safetensors")
    assert requests == [("GET", None), ("GET", "bytes=100000-")]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA
    assert cache_files(tmp_path) == ["tiny.safetensors"]


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA))
    target = zoo.cache_path(zoo.load_manifest()[0])
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(DATA[:5000])
    assert zoo.resolve("tiny", quiet=True).read_bytes() == DATA
    assert server.requests_for("/w/tiny.safetensors") == [("GET", "bytes=5000-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA, ignore_range=True))
    target = zoo.cache_path(zoo.load_manifest()[0])
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(b"\0" * 5000)  # a bad prefix: must not be kept
    assert zoo.resolve("tiny", quiet=True).read_bytes() == DATA
    assert server.requests_for("/w/tiny.safetensors") == [("GET", "bytes=5000-")]


def test_hash_mismatch_is_rejected_and_nothing_is_left_in_the_cache(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA, wrong_bytes=True))
    with pytest.raises(download.AllSourcesFailed, match="sha256 mismatch") as info:
        zoo.resolve("tiny", quiet=True)
    assert [type(c) for c in info.value.causes] == [download.HashMismatch]
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("variable", ["MMFM_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_names_the_missing_file_and_makes_no_request(server, tmp_path, monkeypatch, variable):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA))
    monkeypatch.setenv(variable, "1")
    with pytest.raises(download.OfflineMissing, match=r"tiny\.safetensors.*mmfm zoo download tiny"):
        zoo.resolve("tiny", quiet=True)
    assert server.requests == []


def test_offline_mode_copies_a_committed_file_source_and_skips_the_network(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA), "file:weights/tiny.safetensors")
    (tmp_path / "zoo" / "weights").mkdir()
    (tmp_path / "zoo" / "weights" / "tiny.safetensors").write_bytes(DATA)
    monkeypatch.setenv("MMFM_OFFLINE", "1")
    path = zoo.resolve("tiny", quiet=True)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA and server.requests == []


def test_offline_mode_uses_a_cached_file(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA))
    path = zoo.resolve("tiny", quiet=True)
    monkeypatch.setenv("MMFM_OFFLINE", "1")
    monkeypatch.setattr(download, "_verified", {})  # a new process: re-hash, still no network
    assert zoo.resolve("tiny", quiet=True) == path
    assert len(server.requests) == 1


def test_next_source_after_a_404(server, tmp_path, monkeypatch):
    good = server.add("/good/tiny.safetensors", DATA)
    use_sources(tmp_path, monkeypatch, server.url("/missing/tiny.safetensors"), good)
    assert zoo.resolve("tiny", quiet=True).read_bytes() == DATA
    assert server.requests_for("/missing/tiny.safetensors") == [("GET", None)]


def test_next_source_after_a_timeout(server, tmp_path, monkeypatch):
    slow = server.add("/slow/tiny.safetensors", DATA, delay=3.0)
    use_sources(tmp_path, monkeypatch, slow, server.add("/good/tiny.safetensors", DATA))
    start = time.monotonic()
    assert zoo.resolve("tiny", quiet=True, timeout=0.5).read_bytes() == DATA
    assert time.monotonic() - start < 2.5
    assert len(server.requests_for("/slow/tiny.safetensors")) == 1


def test_error_lists_every_source_and_why_it_failed(server, tmp_path, monkeypatch):
    slow = server.add("/slow/tiny.safetensors", DATA, delay=2.0)
    use_sources(tmp_path, monkeypatch, server.url("/missing/tiny.safetensors"), slow)
    with pytest.raises(download.AllSourcesFailed) as info:
        zoo.resolve("tiny", quiet=True, timeout=0.5)
    message = str(info.value)
    assert "/missing/tiny.safetensors: HTTP 404" in message
    assert "/slow/tiny.safetensors: timed out after 0.5 s" in message
    assert [type(c) for c in info.value.causes] == [download.SourceNotFound, download.DownloadTimeout]


@pytest.mark.parametrize("damage", ["same_size_garbage", "truncated"])
def test_corrupted_cached_file_is_detected_and_fetched_again(server, tmp_path, monkeypatch, damage):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA))
    path = zoo.resolve("tiny", quiet=True)
    path.write_bytes(os.urandom(len(DATA)) if damage == "same_size_garbage" else DATA[:1000])
    assert zoo.resolve("tiny", quiet=True).read_bytes() == DATA
    assert len(server.requests_for("/w/tiny.safetensors")) == 2


def test_file_source_is_relative_to_the_manifest(tmp_path, monkeypatch):
    manifest = isolate_zoo(
        tmp_path, monkeypatch, [manifest_entry("tiny", DATA, ["file:weights/tiny.safetensors"])]
    )
    (manifest.parent / "weights").mkdir()
    (manifest.parent / "weights" / "tiny.safetensors").write_bytes(DATA)
    assert zoo.resolve("tiny", quiet=True).read_bytes() == DATA


def test_disk_full_names_mmfm_home_and_leaves_no_part(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA))

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open
    monkeypatch.setattr(
        download,
        "open",
        lambda p, mode="r": FullDisk() if "b" in mode and mode != "rb" else real_open(p, mode),
        raising=False,
    )
    with pytest.raises(download.DiskFull, match=r"MMFM_HOME \(now .*home\)"):
        zoo.resolve("tiny", quiet=True)
    assert cache_files(tmp_path) == []


def test_unreachable_host_is_a_clear_error(tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, "http://127.0.0.1:9/tiny.safetensors")  # discard port: refused
    with pytest.raises(ZooError, match=r"127\.0\.0\.1:9/tiny\.safetensors: cannot connect"):
        zoo.resolve("tiny", quiet=True, timeout=2)


class _WriteCounter:
    """Spy on download's `open`: the largest number of bytes any one file opened for writing received."""

    def __init__(self, monkeypatch):
        self.most = 0
        real_open = open
        counter = self

        class Counted(io.FileIO):
            def write(self, data):
                self.written = getattr(self, "written", 0) + len(data)
                counter.most = max(counter.most, self.written)
                return super().write(data)

        def spy(path, mode="r"):
            return Counted(path, mode.replace("b", "")) if "b" in mode and mode != "rb" else real_open(path, mode)

        monkeypatch.setattr(download, "open", spy, raising=False)


def test_endless_source_stops_at_the_manifest_size_and_falls_back(server, tmp_path, monkeypatch):
    endless = server.add("/endless/tiny.safetensors", DATA[:50_000], endless=True)
    use_sources(tmp_path, monkeypatch, endless, server.add("/good/tiny.safetensors", DATA))
    writes = _WriteCounter(monkeypatch)
    assert zoo.resolve("tiny", quiet=True).read_bytes() == DATA
    assert writes.most == len(DATA), "nothing is written past the manifest's size"
    # it stopped reading: what it sent fits the size, one 1 MiB read and the sockets' buffers, not 1 GiB
    assert server.sent["/endless/tiny.safetensors"] < len(DATA) + 64 * download.CHUNK_SIZE
    assert cache_files(tmp_path) == ["tiny.safetensors"]


def test_endless_only_source_fails_clearly_and_leaves_no_part(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/endless/tiny.safetensors", DATA[:50_000], endless=True))
    with pytest.raises(download.AllSourcesFailed, match=f"sent more than the manifest's {len(DATA)} bytes") as info:
        zoo.resolve("tiny", quiet=True)
    assert [type(c) for c in info.value.causes] == [download.HashMismatch]
    assert cache_files(tmp_path) == [], "the partial download is discarded"


def test_resumed_download_is_capped_too(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA + b"extra bytes"))
    target = zoo.cache_path(zoo.load_manifest()[0])
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(DATA[:5000])
    writes = _WriteCounter(monkeypatch)
    with pytest.raises(download.AllSourcesFailed, match="sent more than the manifest's"):
        zoo.resolve("tiny", quiet=True)
    assert server.requests_for("/w/tiny.safetensors") == [("GET", "bytes=5000-")]
    assert writes.most <= len(DATA) - 5000 and cache_files(tmp_path) == []


def test_part_longer_than_the_manifest_size_is_discarded_not_resumed(server, tmp_path, monkeypatch):
    use_sources(tmp_path, monkeypatch, server.add("/w/tiny.safetensors", DATA))
    target = zoo.cache_path(zoo.load_manifest()[0])
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(DATA + b"\0" * 1000)  # left by an older, uncapped run
    assert zoo.resolve("tiny", quiet=True).read_bytes() == DATA
    assert server.requests_for("/w/tiny.safetensors") == [("GET", None)]


def test_oversized_file_source_is_refused_without_copying_it_all(tmp_path, monkeypatch):
    manifest = isolate_zoo(tmp_path, monkeypatch, [manifest_entry("tiny", DATA, ["file:weights/tiny.safetensors"])])
    (manifest.parent / "weights").mkdir()
    (manifest.parent / "weights" / "tiny.safetensors").write_bytes(DATA * 8)
    writes = _WriteCounter(monkeypatch)
    with pytest.raises(download.AllSourcesFailed, match="sent more than the manifest's"):
        zoo.resolve("tiny", quiet=True)
    assert writes.most <= len(DATA) and cache_files(tmp_path) == []
