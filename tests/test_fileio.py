"""mmfm.fileio: atomic writes keep the old file on failure, leave no temporaries, and never tear."""

import multiprocessing

import pytest

from mmfm.fileio import atomic_path, atomic_write_bytes, atomic_write_text

SIZE = 1 << 20
CHUNK = 1 << 14


def test_text_and_bytes_round_trip(tmp_path):
    text_file, bytes_file = tmp_path / "a.json", tmp_path / "b.bin"
    atomic_write_text(text_file, "first")
    atomic_write_text(text_file, "ünïcode ✓\n")
    atomic_write_bytes(bytes_file, bytes(range(256)))
    assert text_file.read_text(encoding="utf-8") == "ünïcode ✓\n"
    assert bytes_file.read_bytes() == bytes(range(256))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_failed_write_keeps_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_path(path) as tmp, open(tmp, "w") as handle:
        handle.write("new, half writ")
        raise RuntimeError("mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "index.safetensors") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_file_gets_the_usual_permissions(tmp_path):
    (tmp_path / "plain").write_text("x")
    atomic_write_text(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def _write_many(path, fill: int, rounds: int) -> None:
    """Write SIZE bytes of ``fill`` to ``path`` ``rounds`` times, in small chunks to invite tearing."""
    chunk = bytes([fill]) * CHUNK
    for _ in range(rounds):
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            for _ in range(SIZE // CHUNK):
                handle.write(chunk)


def test_concurrent_writers_never_tear(tmp_path):
    path = tmp_path / "shared.bin"
    payloads = {bytes([fill]) * SIZE for fill in (1, 2)}
    atomic_write_bytes(path, bytes([1]) * SIZE)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(path, fill, 40)) for fill in (1, 2)]
    for writer in writers:
        writer.start()
    reads = 0
    while any(writer.is_alive() for writer in writers):
        assert path.read_bytes() in payloads
        reads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert reads > 0
    assert path.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]
