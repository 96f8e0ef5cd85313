"""geb.files: atomic writes (a failed write keeps the previous file and leaves no temp file), the one temp-name rule,
sha256 of files, the cache dir and pinned fetching."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from geb.files import (
    FetchError,
    atomic_copy,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cache_dir,
    fetch_pinned,
    file_sha256,
    is_temp_name,
    remove_temp_files,
    temp_name,
)


class Crash(Exception):
    pass


def test_atomic_writes_round_trip(tmp_path):
    data = os.urandom(3000)
    atomic_write_bytes(tmp_path / "a.bin", data)
    atomic_write_text(tmp_path / "b.txt", "héllo 世界\n")
    obj = {"x": [1, 2.5, None], "名": "值"}
    atomic_write_json(tmp_path / "c.json", obj, indent=1)
    atomic_copy(tmp_path / "a.bin", tmp_path / "sub.bin")
    assert (tmp_path / "a.bin").read_bytes() == data == (tmp_path / "sub.bin").read_bytes()
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo 世界\n"
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    assert json.loads(text) == obj and text.endswith("}\n") and "名" in text  # UTF-8, not \u escapes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json", "sub.bin"]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "state.json"
    old = os.urandom(500)
    path.write_bytes(old)
    with pytest.raises(Crash), atomic_path(path) as tmp:
        assert is_temp_name(tmp) and tmp.parent == tmp_path
        tmp.write_bytes(os.urandom(800))  # half a new file on disk when the writer dies
        raise Crash
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.bin", path)
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not json": object()})
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_dir_replaces_on_success_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as d:
        assert is_temp_name(d) and d.parent == tmp_path
        (d / "a").write_text("first")
    assert (target / "a").read_text() == "first"
    with pytest.raises(Crash), atomic_dir(target) as d:
        (d / "a").write_text("second")
        raise Crash
    assert [p.name for p in target.iterdir()] == ["a"] and (target / "a").read_text() == "first"
    with atomic_dir(target) as d:
        (d / "b").write_text("third")
    assert [p.name for p in target.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_one_temp_name_rule(tmp_path):
    assert temp_name(tmp_path / "x.arrow") == tmp_path / f".x.arrow.tmp{os.getpid()}"
    for name in (".x.arrow.tmp123", ".ckpt-0000010.pt.tmp9", ".export.tmpa1b_c9z2", ".pkg-1.0.tar.gz.tmpk3j"):
        assert is_temp_name(tmp_path / name), name
    for name in ("x.arrow", ".prepare-progress.json", ".hidden", "a.tmp1", ".tmp", "..tmp", ".x.tmp.json"):
        assert not is_temp_name(tmp_path / name), name
    for name in (".a.tmp1", "keep.json", ".prepare-progress.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".d.tmpab12").mkdir()
    (tmp_path / ".d.tmpab12" / "inner").write_text("x")
    remove_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepare-progress.json", "keep.json"]


def test_file_sha256_reads_in_chunks(tmp_path):
    data = os.urandom((1 << 20) * 2 + 12345)  # crosses the 1 MiB read size twice
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GEB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GEB_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "geb"


def test_fetch_pinned_uses_a_verified_cache_and_names_the_file_on_failure(tmp_path, monkeypatch):
    # No package index: any download fails at once.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    content = os.urandom(1000)
    sha = hashlib.sha256(content).hexdigest()
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(content)
    assert fetch_pinned("pkg==1.0", "pkg-1.0.tar.gz", sha, tmp_path) == tmp_path / "pkg-1.0.tar.gz"

    (tmp_path / "pkg-1.0.tar.gz").write_bytes(content[:-1])  # a damaged cached copy is fetched again
    with pytest.raises(FetchError, match=r"pkg-1\.0\.tar\.gz: `pip download pkg==1\.0` failed .*by hand"):
        fetch_pinned("pkg==1.0", "pkg-1.0.tar.gz", sha, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["pkg-1.0.tar.gz"]  # no download directory left behind
