"""Concurrent downloads of one file (threads and processes): one download, one correct file."""

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from zoo_server import ZooServer, isolate_zoo, manifest_entry

from mmfm import zoo

DATA = os.urandom(512 * 1024)
SHA = hashlib.sha256(DATA).hexdigest()
REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
from pathlib import Path
from mmfm import zoo
zoo.load_manifest()  # its imports (the task registry, torch) before the race: the test is about the download
go = Path(sys.argv[1])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
print(zoo.resolve("tiny", quiet=True), flush=True)
"""


@pytest.fixture
def slow_server(tmp_path, monkeypatch):
    """A server whose single file takes about a second to send, so concurrent callers overlap."""
    with ZooServer() as server:
        url = server.add("/w/tiny.safetensors", DATA, throttle=0.12)
        isolate_zoo(tmp_path, monkeypatch, [manifest_entry("tiny", DATA, [url])])
        yield server


def test_two_threads_share_one_download(slow_server):
    barrier = threading.Barrier(2)
    results = []

    def worker():
        barrier.wait()
        results.append(zoo.resolve("tiny", quiet=True))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert len(results) == 2 and results[0] == results[1]
    assert hashlib.sha256(results[0].read_bytes()).hexdigest() == SHA
    assert slow_server.requests_for("/w/tiny.safetensors") == [("GET", None)]


def test_two_processes_share_one_download(slow_server, tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(go)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    start = time.monotonic()
    go.touch()
    paths = [child.communicate(timeout=25)[0].strip() for child in children]
    assert all(child.returncode == 0 for child in children)
    assert paths[0] == paths[1]
    assert time.monotonic() - start > 0.5  # both really waited on the same slow download
    assert hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest() == SHA
    assert slow_server.requests_for("/w/tiny.safetensors") == [("GET", None)]
