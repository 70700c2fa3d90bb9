"""`edgemm train` under torchrun: two CPU processes (gloo, loopback only) train one checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgemm.data.synthetic import generate_scenes
from edgemm.models.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp") / "scenes"
    generate_scenes(folder, 60, seed=1, image_size=64)
    return folder


def test_two_ranks_write_one_checkpoint(scenes, tmp_path):
    out = tmp_path / "checkpoint"
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "EDGEMM_CACHE_DIR": str(tmp_path / "cache"),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "--module", "edgemm.cli.main",
        "train", str(scenes), "--arch", "dual_encoder", "--text-tower", "tiny", "--image-tower", "tiny",
        "--epochs", "2", "--batch-size", "8", "--out", str(out),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log

    # Both ranks joined the gloo group.
    assert "rank 0 of 2" in log
    assert "rank 1 of 2" in log
    # Only rank 0 saved, and no temporary folder is left beside the checkpoint.
    assert log.count("Saved checkpoint to") == 1
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "cache") == ["checkpoint"]

    checkpoint = load_checkpoint(out)
    assert checkpoint.extra["training"]["world_size"] == 2
    assert len(checkpoint.history) == 2
    # Features were computed in two shards and gathered; rank 0 alone wrote the cache file.
    assert len(list((tmp_path / "cache" / "features").glob("features-*.pt"))) == 1
