"""Tests of atomic writes: complete files or none, with ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgemm.errors import EdgemmError
from edgemm.io import atomic_directory, atomic_write_bytes, atomic_write_text, resolve_inside


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_file_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "manifest.json", "{}")
    finally:
        os.umask(previous)

    assert mode_of(tmp_path / "manifest.json") == 0o644
    assert (tmp_path / "manifest.json").read_text() == "{}"
    assert [path.name for path in tmp_path.iterdir()] == ["manifest.json"]


def test_atomic_directory_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "pkg") as staging:
            (staging / "a.txt").write_text("a")
    finally:
        os.umask(previous)

    assert mode_of(tmp_path / "pkg") == 0o755
    assert (tmp_path / "pkg" / "a.txt").read_text() == "a"


def test_failed_directory_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "pkg") as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("stage failed")

    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_overwrite(tmp_path):
    (tmp_path / "pkg").mkdir()
    with pytest.raises(EdgemmError, match="already exists"):
        with atomic_directory(tmp_path / "pkg"):
            pass


def test_resolve_inside_rejects_escape(tmp_path):
    assert resolve_inside(tmp_path, "a/b.txt") == (tmp_path / "a" / "b.txt").resolve()
    with pytest.raises(EdgemmError, match="outside"):
        resolve_inside(tmp_path, "../etc/passwd")
    with pytest.raises(EdgemmError, match="outside"):
        resolve_inside(tmp_path, "/etc/passwd")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where no file can be created")
def test_write_into_unwritable_folder_names_path():
    with pytest.raises(EdgemmError, match="Cannot write /proc/results.json"):
        atomic_write_bytes(Path("/proc/results.json"), b"{}")
