"""Smoke test of benchmarks/sidebyside.py on a tiny fusion model, plus its acceptance and ranking helpers.

The suite runs as a user runs it: as a script, with real `edgemm export` and `edgemm compress`
subprocesses, real ONNX Runtime quantization and sessions, and files in a temporary folder.
Latency values are only checked for presence, never for speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemm.data.synthetic import generate_scenes
from edgemm.training.train import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "sidebyside.py"
RECIPE = REPO / "export" / "x86-avx512-vnni.toml"


def load_suite_module():
    spec = importlib.util.spec_from_file_location("sidebyside", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sidebyside"] = module
    spec.loader.exec_module(module)
    return module


sidebyside = load_suite_module()


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    """Run the suite once on a tiny concat-fusion checkpoint trained on synthetic scenes."""
    root = tmp_path_factory.mktemp("sidebyside")
    dataset = root / "scenes"
    generate_scenes(dataset, 40, seed=0, image_size=64)
    # The project recipe with the accuracy limits lifted: a one-epoch tiny model is not accurate
    # enough to survive pruning, and this test is about the suite, not about the recipe.
    recipe_text = RECIPE.read_text(encoding="utf-8")
    lifted = recipe_text.replace("max_accuracy_drop = 1.0", "max_accuracy_drop = 100.0").replace("max_auc_drop = 0.01", "max_auc_drop = 1.0")
    assert lifted.count("max_accuracy_drop = 100.0") == 1
    assert lifted.count("max_auc_drop = 1.0") == 1
    recipe = root / RECIPE.name
    recipe.write_text(lifted, encoding="utf-8")

    checkpoint = root / "checkpoint"
    config = TrainConfig(architecture="concat_fusion", text_tower="tiny", image_tower="tiny", epochs=1, batch_size=32, lr=3e-3)
    train(config, dataset, checkpoint)

    out = root / "result"
    command = [
        sys.executable, str(SCRIPT),
        "--models", "fusion",
        "--fusion-checkpoint", str(checkpoint),
        "--dataset", str(dataset),
        "--recipes", str(recipe),
        "--work-dir", str(root / "work"),
        "--rounds", "2", "--runs-per-round", "3", "--warmup", "1",
        "--latency-samples", "2", "--calibration-size", "4", "--max-pairs", "16",
        "--out", str(out),
    ]
    env = {key: value for key, value in os.environ.items() if key != "EDGEMM_OPENVINO_PYTHON"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    return result, out


def rows_by_name(result):
    return {row["name"]: row for row in result["models"]["fusion"]["rows"]}


def test_suite_runs_every_onnx_row(fusion_run):
    result, _ = fusion_run
    rows = rows_by_name(result)
    recipe_row = f"edgemm-{RECIPE.stem}"
    for name in ("pytorch-fp32", "ort-fp32", recipe_row, "ort-dynamic-default", "ort-static-default"):
        assert rows[name]["status"] == "ok", rows[name]["reason"]
        assert rows[name]["size_bytes"] > 0
        assert rows[name]["latency"]["pair"]["runs"] == 6
        assert rows[name]["latency"]["pair"]["p50_ms"] > 0
        assert len(rows[name]["round_p50_ms"]["pair"]) == 2
        assert 0.0 <= rows[name]["metrics"]["accuracy"] <= 100.0
        assert 0.0 <= rows[name]["metrics"]["roc_auc"] <= 1.0


def test_suite_skips_openvino_with_reason(fusion_run):
    result, _ = fusion_run
    rows = rows_by_name(result)
    for name in ("openvino-fp32", "openvino-int8-nncf"):
        assert rows[name]["status"] == "skipped"
        assert "--openvino-python" in rows[name]["reason"]


def test_fp32_rows_agree_on_accuracy(fusion_run):
    result, _ = fusion_run
    rows = rows_by_name(result)
    assert rows["ort-fp32"]["metrics"]["accuracy"] == pytest.approx(rows["pytorch-fp32"]["metrics"]["accuracy"])
    assert rows["ort-fp32"]["metrics"]["roc_auc"] == pytest.approx(rows["pytorch-fp32"]["metrics"]["roc_auc"], abs=1e-3)


def test_ratios_are_against_ort_fp32(fusion_run):
    result, _ = fusion_run
    ratios = {item["name"]: item for item in result["models"]["fusion"]["summary"]["ratios"]}
    assert ratios["ort-fp32"]["size_ratio"] == pytest.approx(1.0)
    assert ratios["ort-fp32"]["speedup"]["pair"] == pytest.approx(1.0)
    assert ratios["ort-dynamic-default"]["size_ratio"] < 1.0


def test_result_records_machine_and_command(fusion_run):
    result, out = fusion_run
    assert result["machine"]["cpu_model"]
    assert result["machine"]["cores_logical"] >= 1
    assert "onnxruntime" in result["versions"]
    assert "--recipes" in result["command"]
    markdown = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| ort-static-default |" in markdown
    assert "openvino-fp32 (skipped)" in markdown
    assert result["models"]["fusion"]["summary"]["acceptance"]["best"] == f"edgemm-{RECIPE.stem}"


def make_row(name, family, size, p50, metrics):
    row = sidebyside.Row(name, family, name)
    row.files = {"model.onnx": size}
    row.latency = {"pair": {"p50_ms": p50, "p90_ms": p50}}
    row.round_p50_ms = {"pair": [p50, p50]}
    row.metrics = metrics
    return row


ORIGINAL = {"accuracy": 90.0, "roc_auc": 0.95}


def test_acceptance_picks_fastest_accurate_recipe():
    rows = [
        make_row("pytorch-fp32", "pytorch", 100, 30.0, ORIGINAL),
        make_row("ort-fp32", "onnxruntime", 100, 20.0, ORIGINAL),
        make_row("edgemm-fast", "edgemm", 20, 4.0, {"accuracy": 80.0, "roc_auc": 0.90}),
        make_row("edgemm-good", "edgemm", 25, 7.0, {"accuracy": 89.5, "roc_auc": 0.945}),
    ]
    acceptance = sidebyside.summarize_model(sidebyside.FUSION, rows)["acceptance"]
    assert acceptance["best"] == "edgemm-good"
    assert acceptance["passed"] is True
    assert acceptance["speedup"] == pytest.approx(20.0 / 7.0)


def test_speedup_is_median_of_round_ratios():
    reference = make_row("ort-fp32", "onnxruntime", 100, 20.0, ORIGINAL)
    reference.round_p50_ms = {"pair": [10.0, 40.0, 20.0]}
    row = make_row("edgemm-a", "edgemm", 20, 12.0, ORIGINAL)
    row.round_p50_ms = {"pair": [5.0, 10.0, 10.0]}
    ratios = sidebyside.summarize_model(sidebyside.FUSION, [reference, row])["ratios"]
    assert ratios[1]["speedup"]["pair"] == pytest.approx(2.0)
    assert ratios[1]["speedup_pooled"]["pair"] == pytest.approx(20.0 / 12.0)


def test_acceptance_fails_on_size():
    rows = [
        make_row("pytorch-fp32", "pytorch", 100, 30.0, ORIGINAL),
        make_row("ort-fp32", "onnxruntime", 100, 20.0, ORIGINAL),
        make_row("edgemm-big", "edgemm", 31, 5.0, ORIGINAL),
    ]
    acceptance = sidebyside.summarize_model(sidebyside.FUSION, rows)["acceptance"]
    assert acceptance["passed"] is False
    assert acceptance["checks"]["size_at_most_30_percent"] is False
    assert acceptance["checks"]["speedup_at_least_2_5x"] is True


def test_acceptance_checks_recall_for_dual_encoder():
    original = {"text_to_image_recall@5": 70.0}
    rows = [make_row("pytorch-fp32", "pytorch", 100, 30.0, original), make_row("ort-fp32", "onnxruntime", 100, 20.0, original)]
    rows.append(make_row("edgemm-dual", "edgemm", 25, 5.0, {"text_to_image_recall@5": 67.5}))
    for row in rows:
        row.latency = {"query": row.latency["pair"]}
        row.round_p50_ms = {"query": row.round_p50_ms["pair"]}
    acceptance = sidebyside.summarize_model(sidebyside.DUAL, rows)["acceptance"]
    assert acceptance["checks"]["recall_at_5_drop_at_most_2_points"] is False
    assert acceptance["passed"] is False


def test_top_k_rows_orders_best_first():
    similarity = np.array([[0.1, 0.9, 0.3, 0.5, 0.7, 0.2], [0.6, 0.0, 0.8, 0.1, 0.2, 0.3]])
    assert sidebyside.top_k_rows(similarity, 3).tolist() == [[1, 4, 3], [2, 0, 5]]


def test_feed_archive_round_trip(tmp_path):
    feeds = {"text": [{"input_ids": np.arange(4, dtype=np.int64).reshape(1, 4)}, {"input_ids": np.ones((1, 2), dtype=np.int64)}]}
    loaded = sidebyside.load_feed_archive(sidebyside.save_feed_archive(tmp_path / "feeds.npz", feeds))
    assert len(loaded["text"]) == 2
    assert loaded["text"][0]["input_ids"].tolist() == [[0, 1, 2, 3]]
    assert loaded["text"][1]["input_ids"].shape == (1, 2)


@pytest.mark.skipif(not os.environ.get("EDGEMM_OPENVINO_PYTHON"), reason="set EDGEMM_OPENVINO_PYTHON to a Python with openvino and nncf")
def test_openvino_probe_reports_versions():
    versions, reason = sidebyside.probe_openvino(Path(os.environ["EDGEMM_OPENVINO_PYTHON"]))
    assert reason is None
    assert versions["openvino"]
    assert versions["nncf"]


def test_openvino_probe_explains_missing_python(tmp_path):
    versions, reason = sidebyside.probe_openvino(tmp_path / "no-python")
    assert versions is None
    assert "does not exist" in reason
