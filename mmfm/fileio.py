"""Atomic file writes: the one helper every mmfm writer goes through (no torch, usable anywhere).

    with atomic_path("out/index.safetensors") as tmp:   # a unique, not yet existing sibling path
        save_file(tensors, str(tmp))                     # any writer that takes a path
    atomic_write_text("out/metrics.json", text)

The temporary is fsynced and ``os.replace``d onto the target only when the block succeeds, so readers
see the old file or the new one, never a torn one, even with several writers racing; on failure the
temporary is removed and the old file is left as it was.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` atomically."""
    path = Path(path)
    # A fresh name per writer (not a fixed `.name.tmp`) so concurrent writers never share a temporary.
    # The caller creates the file, so it gets the usual permissions (mkstemp would make it 0600).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename durable too; Windows cannot open a directory
        _fsync(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def _fsync(path: Path) -> None:
    # POSIX fsyncs through a read-only descriptor, so read-only files (copystat) work too.
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
