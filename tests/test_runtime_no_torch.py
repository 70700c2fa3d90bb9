"""`edgemm.runtime` and `edgemm run` work in a process where torch and onnx cannot be imported.

The package is built here with torch, then loaded in a subprocess whose import system
rejects torch, onnx, onnxscript, torch_pruning, transformers and tokenizers, as on a device
that has only onnxruntime, numpy and Pillow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_runtime import build_dual_package, build_fusion_package

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "onnx", "onnxscript", "torch_pruning", "transformers", "tokenizers")

BLOCKER = f"""
import importlib.abc, sys

class BlockHostPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked in this test", name=name)
        return None

sys.meta_path.insert(0, BlockHostPackages())
for name in {BLOCKED!r}:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the import blocker let {{name}} through")
"""

DEVICE_SCRIPT = BLOCKER + """
import json
import edgemm.runtime

fusion_dir, dual_dir, image_path = sys.argv[1:4]
fusion = edgemm.runtime.load(fusion_dir, threads=1)
prediction = fusion.predict(["a dog runs on the beach", "the red ball"], [image_path, image_path])
dual = edgemm.runtime.load(dual_dir, threads=1)
similarity = dual.similarity(["a dog", "a cat"], [image_path])
loaded = sorted(name for name in sys.modules if name.split(".")[0] in {blocked!r})
print(json.dumps({{"scores": prediction.scores.tolist(), "similarity": similarity.tolist(), "loaded": loaded}}))
""".format(blocked=BLOCKED)

CLI_SCRIPT = BLOCKER + """
from edgemm.cli.main import app

app(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    fusion_dir, _ = build_fusion_package(root / "fusion")
    dual_dir, _, _ = build_dual_package(root / "dual")
    image_path = root / "photo.png"
    pixels = np.random.default_rng(5).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path)
    return fusion_dir, dual_dir, image_path


def _run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_load_and_predict_without_torch(packages):
    import edgemm.runtime

    fusion_dir, dual_dir, image_path = packages
    result = _run_python(DEVICE_SCRIPT, fusion_dir, dual_dir, image_path)

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["loaded"] == []
    expected = edgemm.runtime.load(fusion_dir).predict(["a dog runs on the beach", "the red ball"], [image_path, image_path])
    np.testing.assert_allclose(data["scores"], expected.scores, atol=1e-6)
    assert np.asarray(data["similarity"]).shape == (2, 1)


def test_blocker_rejects_torch():
    result = _run_python(BLOCKER + "\nimport torch\n")

    assert result.returncode != 0
    assert "torch is blocked in this test" in result.stderr


def test_cli_run_without_torch(packages):
    fusion_dir, _, image_path = packages
    result = _run_python(CLI_SCRIPT, "run", fusion_dir, "--text", "a dog", "--image", image_path, "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["predictions"][0]["label"] in ("match", "mismatch")
