"""Fetch zoo files into a local cache: resumable, hash-verified, safe under concurrency, offline-aware.

Cache layout: `$MMFM_HOME/hub/<name>/<sha256[:12]>/<filename>` (`MMFM_HOME` defaults to `~/.cache/mmfm`).
A download streams into `<file>.part` (resumed with an HTTP Range request after a dropped connection),
is checked against the manifest's size and sha256, and only then renamed into place, so the cache never
holds a bad file. Nothing is written past the manifest's size: a source that sends more (an endless
stream, another file) fails as soon as it does, having read at most one chunk (1 MiB) past the size,
and its partial file is deleted; a `.part` already longer than the size is discarded, not resumed.
A `<file>.lock` file lock lets one thread/process download while the others wait.
Sources are tried in order; the final error lists why each one failed.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock
from tqdm.auto import tqdm

from mmfm.errors import ZooError
from mmfm.zoo.manifest import FileSpec, ZooEntry

DEFAULT_TIMEOUT = 30.0
CHUNK_SIZE = 1 << 20
MAX_RESUMES = 5
TRUTHY = ("1", "true", "yes", "on")

# Files hashed in this process: path -> (size, mtime_ns, inode) at the time they hashed right.
_verified: dict[Path, tuple[int, int, int]] = {}


class DownloadError(ZooError):
    """One source could not deliver the file (connection refused, HTTP error, ...)."""


class SourceNotFound(DownloadError):
    """The source answered 404 / the file does not exist there."""


class DownloadTimeout(DownloadError):
    """The source did not answer within the timeout."""


class HashMismatch(DownloadError):
    """The bytes a source delivered do not match the manifest's sha256 or size."""


class ConnectionDropped(DownloadError):
    """The connection closed before the whole file arrived (resumable)."""


class DiskFull(ZooError):
    """No space left in the cache folder."""


class OfflineMissing(ZooError):
    """Offline mode is on and the file is not in the cache."""


class AllSourcesFailed(ZooError):
    """Every source of a file failed; `causes` holds each source's error."""

    def __init__(self, message: str, causes: list[DownloadError]):
        super().__init__(message)
        self.causes = causes


def mmfm_home() -> Path:
    """The cache root: `$MMFM_HOME`, default `~/.cache/mmfm`."""
    return Path(os.environ.get("MMFM_HOME") or "~/.cache/mmfm").expanduser()


def hub_dir() -> Path:
    """Where zoo files are cached."""
    return mmfm_home() / "hub"


def is_offline() -> bool:
    """True when `MMFM_OFFLINE` or `HF_HUB_OFFLINE` is set to a true value."""
    return any(
        os.environ.get(var, "").strip().lower() in TRUTHY for var in ("MMFM_OFFLINE", "HF_HUB_OFFLINE")
    )


def default_timeout() -> float:
    """Seconds to wait for a server: `$MMFM_DOWNLOAD_TIMEOUT`, default 30."""
    return float(os.environ.get("MMFM_DOWNLOAD_TIMEOUT") or DEFAULT_TIMEOUT)


def cache_path(entry: ZooEntry, role: str = "weights") -> Path:
    """The local path of one file of an entry (whether or not it is there yet)."""
    spec = entry.files[role]
    return hub_dir() / entry.name / spec.sha256[:12] / spec.filename


def fetch(
    entry: ZooEntry, role: str = "weights", *, quiet: bool = False, timeout: float | None = None
) -> Path:
    """Return the verified local copy of an entry's file, downloading it if it is missing or corrupt.

    In offline mode only local ``file:`` sources (a checkpoint committed with the zoo) are tried.
    """
    spec = entry.files[role]
    target = cache_path(entry, role)
    if is_cached_file_valid(target, spec):
        return target
    sources = spec.sources
    if is_offline():
        sources = tuple(source for source in sources if source.startswith("file:"))
        if not sources:
            raise OfflineMissing(_offline_message(entry, spec, target))
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_cached_file_valid(target, spec):  # another thread/process fetched it while we waited
            return target
        target.unlink(missing_ok=True)  # missing, or present but corrupt
        _fetch_from_sources(entry, spec, sources, target, quiet, default_timeout() if timeout is None else timeout)
    return target


def is_cached_file_valid(path: Path, spec: FileSpec, rehash: bool = False) -> bool:
    """Size always; sha256 on first use in this process (or when `rehash`, or when the file changed)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != spec.size:
        return False
    signature = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if not rehash and _verified.get(path) == signature:
        return True
    if sha256_file(path) != spec.sha256:
        _verified.pop(path, None)
        return False
    _verified[path] = signature
    return True


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_from_sources(entry: ZooEntry, spec: FileSpec, sources: tuple[str, ...], target: Path, quiet: bool,
                        timeout: float) -> None:
    part = target.with_name(target.name + ".part")
    causes: list[DownloadError] = []
    for source in sources:
        try:
            _fetch_source(source, entry, spec, part, quiet, timeout)
            _check_part(part, spec, source)
        except DownloadError as err:
            causes.append(err)
            continue
        os.replace(part, target)
        is_cached_file_valid(target, spec)  # records the verified signature of the final file
        return
    part.unlink(missing_ok=True)
    lines = "\n".join(f"  - {cause}" for cause in causes)
    raise AllSourcesFailed(
        f"could not download {spec.filename} of model {entry.name!r}; every source failed:\n{lines}\n"
        "Check your network or proxy, retry later (partial downloads resume), or fetch the file by hand "
        f"and place it at {target}",
        causes,
    )


def _fetch_source(
    source: str, entry: ZooEntry, spec: FileSpec, part: Path, quiet: bool, timeout: float
) -> None:
    try:
        if source.startswith(("http://", "https://")):
            _download_url(source, spec, part, quiet, timeout)
        elif source.startswith("hf-hub:"):
            _copy_into_part(_hf_hub_file(source, timeout), spec, part, quiet)
        else:
            _copy_into_part(_local_source_path(source, entry), spec, part, quiet)
    except HashMismatch:  # too many bytes: not the manifest's file, nothing worth resuming
        part.unlink(missing_ok=True)
        raise
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            part.unlink(missing_ok=True)
            raise DiskFull(
                f"no space left on the device while writing {part}; free some space or point MMFM_HOME "
                f"(now {mmfm_home()}) at a disk with at least {spec.size} bytes free"
            ) from err
        raise DownloadError(f"{source}: I/O error ({err}) while fetching into {part}") from err


def _check_part(part: Path, spec: FileSpec, source: str) -> None:
    size = part.stat().st_size
    digest = sha256_file(part) if size == spec.size else None
    if digest != spec.sha256:
        part.unlink(missing_ok=True)
        got = f"sha256 {digest}" if digest else f"{size} bytes"
        raise HashMismatch(
            f"{source}: sha256 mismatch, got {got}, the manifest expects sha256 {spec.sha256} ({spec.size} bytes); "
            "the download was discarded (the mirror holds another file, or the manifest is out of date)"
        )


def _download_url(url: str, spec: FileSpec, part: Path, quiet: bool, timeout: float) -> None:
    """Stream `url` into `part`, resuming from what is already there after a dropped connection."""
    resumes = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > spec.size:
            part.unlink()
            have = 0
        if have == spec.size:
            return
        try:
            _stream_url(url, spec, part, have, quiet, timeout)
            return
        except ConnectionDropped:
            resumes += 1
            if resumes > MAX_RESUMES:
                raise


def _stream_url(url: str, spec: FileSpec, part: Path, have: int, quiet: bool, timeout: float) -> None:
    headers = {"User-Agent": "mmfm-zoo", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # our partial file is not a prefix the server knows: start over
            part.unlink(missing_ok=True)
            raise ConnectionDropped(f"{url}: server refused the resume range; restarting") from err
        if err.code == 404:
            raise SourceNotFound(f"{url}: HTTP 404 not found (the mirror does not have this file)") from err
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except TimeoutError as err:
        raise DownloadTimeout(f"{url}: timed out after {timeout:g} s waiting for the server") from err
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            raise DownloadTimeout(f"{url}: timed out after {timeout:g} s waiting for the server") from err
        raise DownloadError(f"{url}: cannot connect ({reason})") from err
    with response:
        resumed = have > 0 and response.status == 206
        if resumed:
            _check_content_range(url, response.headers.get("Content-Range", ""), have)
        start = have if resumed else 0  # a 200 answer to a Range request is the whole file
        with open(part, "ab" if resumed else "wb") as fh, _progress(spec, start, quiet) as bar:
            _copy_response(url, _capped(url, _chunks(response), start, spec.size), fh, bar, timeout)
    if part.stat().st_size < spec.size:
        raise ConnectionDropped(f"{url}: connection closed after {part.stat().st_size} of {spec.size} bytes")


def _check_content_range(url: str, content_range: str, have: int) -> None:
    """A 206 must start where our partial file ends (`Content-Range: bytes HAVE-END/TOTAL`)."""
    try:
        start = int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError) as err:
        raise DownloadError(f"{url}: malformed Content-Range {content_range!r} in a 206 answer") from err
    if start != have:
        raise DownloadError(f"{url}: asked to resume at byte {have}, server answered from byte {start}")


def _copy_response(url: str, chunks: Iterator[bytes], fh: BinaryIO, bar: tqdm, timeout: float) -> None:
    received = 0
    try:
        for chunk in chunks:
            fh.write(chunk)
            bar.update(len(chunk))
            received += len(chunk)
    except TimeoutError as err:
        message = f"{url}: timed out after {timeout:g} s without data"
        # A stall after some bytes arrived is worth resuming; a server that sends nothing is a timeout.
        raise (ConnectionDropped(message) if received else DownloadTimeout(message)) from err
    except (http.client.HTTPException, ConnectionError) as err:
        raise ConnectionDropped(f"{url}: connection lost mid-file ({err})") from err


def _chunks(response) -> Iterator[bytes]:
    while chunk := response.read(CHUNK_SIZE):
        yield chunk


def _capped(source: str, chunks: Iterator[bytes], start: int, size: int) -> Iterator[bytes]:
    """`chunks` of a file whose first `start` bytes are already there, refused as soon as they would take it
    past the manifest's `size`: the caller never writes a byte beyond it."""
    total = start
    for chunk in chunks:
        total += len(chunk)
        if total > size:
            raise HashMismatch(
                f"{source}: sent more than the manifest's {size} bytes; stopped reading and discarded the "
                "download (the mirror holds another file, or the manifest is out of date)"
            )
        yield chunk


def _progress(spec: FileSpec, initial: int, quiet: bool) -> tqdm:
    return tqdm(
        total=spec.size,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=spec.filename,
        disable=quiet or not sys.stderr.isatty(),
    )


def _copy_into_part(source_path: Path, spec: FileSpec, part: Path, quiet: bool) -> None:
    with open(source_path, "rb") as src, open(part, "wb") as dst, _progress(spec, 0, quiet) as bar:
        for chunk in _capped(str(source_path), iter(lambda: src.read(CHUNK_SIZE), b""), 0, spec.size):
            dst.write(chunk)
            bar.update(len(chunk))


def _local_source_path(source: str, entry: ZooEntry) -> Path:
    """The file a `file:` source names: a path relative to the manifest's folder, never outside it."""
    folder = entry.manifest_dir.resolve()
    path = (folder / source[len("file:") :]).resolve()
    if not path.is_relative_to(folder):  # absolute, `..` or a link out: the manifest may not read other files
        raise ZooError(
            f"{source} of model {entry.name!r}: a file: source must be a path inside the manifest's folder "
            f"{folder} (like file:weights/{entry.name}.safetensors); fix the manifest"
        )
    if not path.is_file():
        raise SourceNotFound(f"{source}: file {path} does not exist")
    return path


def parse_hf_source(source: str) -> tuple[str, str, str | None]:
    """`hf-hub:org/repo[@revision]/path/file` -> (repo_id, filename, revision)."""
    parts = source[len("hf-hub:") :].split("/")
    if len(parts) < 3 or not all(parts):
        raise DownloadError(f"{source}: an hf-hub source must look like hf-hub:org/repo/path/to/file")
    repo, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}", "/".join(parts[2:]), revision or None


def _hf_hub_file(source: str, timeout: float) -> Path:
    """Download through huggingface_hub (its cache, `HF_ENDPOINT` and token apply)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, filename, revision = parse_hf_source(source)
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                etag_timeout=timeout,
            )
        )
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise SourceNotFound(f"{source}: not found on the Hugging Face Hub ({type(err).__name__})") from err
    except Exception as err:
        raise DownloadError(
            f"{source}: Hugging Face Hub download failed ({type(err).__name__}: {err})"
        ) from err


def _offline_message(entry: ZooEntry, spec: FileSpec, target: Path) -> str:
    state = "is corrupt" if target.exists() else "is not in the cache"
    return (
        f"offline mode (MMFM_OFFLINE / HF_HUB_OFFLINE) is on and {spec.filename} of model {entry.name!r} "
        f"{state} ({target}); unset MMFM_OFFLINE/HF_HUB_OFFLINE and run `mmfm zoo download {entry.name}`, "
        f"or copy the file there by hand (sha256 {spec.sha256}) from {spec.sources[0]}"
    )


def verify_entry(entry: ZooEntry) -> list[tuple[str, Path, str]]:
    """Re-hash an entry's cached files: [(role, path, "OK" | "CORRUPT" | "missing")]."""
    results = []
    for role, spec in entry.files.items():
        path = cache_path(entry, role)
        if not path.exists():
            status = "missing"
        else:
            status = "OK" if is_cached_file_valid(path, spec, rehash=True) else "CORRUPT"
        results.append((role, path, status))
    return results


def clear_cache(name: str | None = None) -> list[Path]:
    """Delete the cached files of one model (or of the whole zoo cache); returns the folders removed."""
    root = hub_dir()
    folders = [root / name] if name else sorted(root.iterdir()) if root.is_dir() else []
    removed = [folder for folder in folders if folder.is_dir()]
    for folder in removed:
        shutil.rmtree(folder)
    _verified.clear()
    return removed
