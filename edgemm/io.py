"""Atomic file writes and safe path handling. Torch-free."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgemm.errors import EdgemmError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and an atomic rename.

    The file gets the permissions of a plain `open()` (0666 less the umask), not the 0600 that
    `mkstemp` uses, so a package copied to a device stays readable by other users.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise EdgemmError(f"Cannot write {path}: {error.strerror}.", "Choose a writable output path.") from error
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target`, on error it is removed.

    A reader never sees a half-written folder, and a failed run leaves no partial output.
    Raises `EdgemmError` when `target` exists and `overwrite` is false.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise EdgemmError(
            f"Output folder {target} already exists.",
            "Choose another --out or pass --overwrite.",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    # mkdtemp creates 0700; give the folder the permissions of a plain mkdir.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_inside(root: Path, relative: str) -> Path:
    """Resolve `relative` under `root`, rejecting absolute paths and `..` that escape `root`."""
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or not candidate.is_relative_to(root):
        raise EdgemmError(
            f"Path {relative!r} points outside {root}.",
            "Files referenced by a package or dataset must stay inside its folder.",
        )
    return candidate
