"""Fixtures shared by the whole suite.

Tests that need the real photos in ../shared/data skip with a message when the folder is absent:
the product never requires that data, only the project's own tests and benchmarks use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EDGEMM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"{path} is absent: this test needs the real photos from ../shared/data "
            "(set EDGEMM_SHARED_DATA to their folder to run it)."
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    return _require(SHARED_DATA / "flickr8k-1k")


@pytest.fixture(scope="session")
def imagenet_dir() -> Path:
    return _require(SHARED_DATA / "imagenet-sample")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Run torch on one thread: tiny models gain nothing from two, and a busy machine slows them."""
    try:
        import torch
    except ImportError:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
