"""Metrics against hand-computed values, evaluation of trained checkpoints and the `edgemm eval` CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgemm.cli.main import app
from edgemm.data.synthetic import generate_scenes
from edgemm.training import metrics
from edgemm.training.evaluate import evaluate_checkpoint, evaluate_imagenet
from edgemm.training.train import TrainConfig, train


# ---- metrics -------------------------------------------------------------------------------------


def test_accuracy_counts_matches():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_accuracy_rejects_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([1, 0], [1])


def test_top1_accuracy_uses_argmax():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    assert metrics.top1_accuracy(logits, [1, 0, 1, 1]) == 0.75


def test_roc_auc_hand_computed():
    # Pairs (positive, negative): (0.35,0.1) win, (0.35,0.4) loss, (0.8,0.1) win, (0.8,0.4) win.
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_roc_auc_ties_count_half():
    # Pairs: (0.5,0.5) tie = 0.5, (0.5,0.2) win, (0.9,0.5) win, (0.9,0.2) win -> 3.5 / 4.
    assert metrics.roc_auc([0.5, 0.9, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert metrics.roc_auc([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0]) == pytest.approx(0.5)


def test_roc_auc_perfect_and_inverted():
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0


def test_roc_auc_one_class_raises():
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.roc_auc([0.1, 0.2], [1, 1])


def test_roc_auc_rejects_non_binary_labels():
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.roc_auc([0.1, 0.2], [0, 2])


def test_fit_threshold_separable():
    fit = metrics.fit_threshold([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1])
    assert fit.threshold == pytest.approx(0.25)
    assert fit.accuracy == 1.0


def test_fit_threshold_overlapping():
    # Sorted: 0.1(n) 0.2(p) 0.3(n) 0.4(p) 0.5(p). Thresholds 0.15 and 0.35 both get 4 of 5 right.
    scores = [0.3, 0.1, 0.4, 0.2, 0.5]
    labels = [0, 0, 1, 1, 1]
    fit = metrics.fit_threshold(scores, labels)
    assert fit.accuracy == pytest.approx(0.8)
    assert metrics.accuracy_at_threshold(scores, labels, fit.threshold) == pytest.approx(0.8)
    assert fit.threshold in (pytest.approx(0.15), pytest.approx(0.35))


def test_fit_threshold_all_positive_goes_below_minimum():
    fit = metrics.fit_threshold([0.2, 0.7, 0.4], [1, 1, 1])
    assert fit.accuracy == 1.0
    assert fit.threshold < 0.2


def test_accuracy_at_threshold_inclusive():
    assert metrics.accuracy_at_threshold([0.5, 0.4], [1, 0], 0.5) == 1.0


def test_recall_at_k_hand_computed():
    similarity = np.array(
        [
            [0.9, 0.1, 0.0],  # relevant 0 ranks first
            [0.9, 0.5, 0.1],  # relevant 1 ranks second
            [0.9, 0.8, 0.1],  # relevant 2 ranks third
        ]
    )
    recalls = metrics.recall_at_k(similarity, [0, 1, 2], ks=(1, 2, 3))
    assert recalls == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(1.0)}


def test_recall_at_k_ties_count_against_query():
    recalls = metrics.recall_at_k(np.zeros((2, 4)), [0, 3], ks=(1, 4))
    assert recalls[1] == 0.0
    assert recalls[4] == 1.0


def test_recall_at_k_any_relevant_item_counts():
    similarity = np.array([[0.1, 0.9, 0.5, 0.7]])
    assert metrics.recall_at_k(similarity, [{0, 2}], ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_retrieval_recalls_both_directions():
    # Texts 0 and 1 describe image 0, and text 2 describes image 1.
    similarity = np.array(
        [
            [0.2, 0.8],  # text 0: wrong image first
            [0.9, 0.1],  # text 1: right image first
            [0.1, 0.7],  # text 2: right image first
        ]
    )
    recalls = metrics.retrieval_recalls(similarity, [0, 0, 1], ks=(1, 2))
    assert recalls["text_to_image"] == {1: pytest.approx(2 / 3), 2: 1.0}
    # Image 0: best relevant text is 1 (0.9), ahead of text 2 (0.1) -> rank 0.
    # Image 1: relevant text 2 scores 0.7, text 0 scores 0.8 -> rank 1.
    assert recalls["image_to_text"] == {1: 0.5, 2: 1.0}


def test_retrieval_recalls_rejects_image_without_text():
    with pytest.raises(ValueError, match="have no text"):
        metrics.retrieval_recalls(np.zeros((2, 3)), [0, 1])


# ---- evaluation of checkpoints -------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the tiny models on one thread: on a busy 2-core machine two threads wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval") / "scenes"
    generate_scenes(folder, 80, seed=2, image_size=64)
    return folder


@pytest.fixture(scope="module")
def fusion_checkpoint(scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fusion") / "checkpoint"
    train(TrainConfig(text_tower="tiny", image_tower="tiny", epochs=2, batch_size=32), scenes, out)
    return out


@pytest.fixture(scope="module")
def dual_checkpoint(scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dual") / "checkpoint"
    train(TrainConfig(architecture="dual_encoder", text_tower="tiny", image_tower="tiny", epochs=2, batch_size=16), scenes, out)
    return out


def test_fusion_evaluation_uses_stored_threshold(fusion_checkpoint, scenes):
    result = evaluate_checkpoint(fusion_checkpoint, scenes, split="dev")
    stored = json.loads((fusion_checkpoint / "config.json").read_text())["extra"]["decision_threshold"]
    dev_metrics = result["metrics"]
    assert result["decision_threshold"] == pytest.approx(stored)
    assert dev_metrics["threshold"] == pytest.approx(stored)
    # 16 dev scenes, one caption each, one mismatched caption per caption.
    assert dev_metrics["pairs"] == 32
    assert dev_metrics["positives"] == 16
    assert dev_metrics["oracle_accuracy"] >= dev_metrics["accuracy"]
    assert 0.0 <= dev_metrics["roc_auc"] <= 1.0


def test_evaluation_pairs_are_fixed(fusion_checkpoint, scenes):
    first = evaluate_checkpoint(fusion_checkpoint, scenes, split="dev")["metrics"]
    second = evaluate_checkpoint(fusion_checkpoint, scenes, split="dev")["metrics"]
    assert first == second


def test_dual_encoder_evaluation_reports_recalls(dual_checkpoint, scenes):
    dev_metrics = evaluate_checkpoint(dual_checkpoint, scenes, split="dev")["metrics"]
    assert dev_metrics["images"] == 16
    for direction in ("text_to_image", "image_to_text"):
        recalls = [dev_metrics[f"{direction}_recall@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls)
        assert all(0.0 <= value <= 1.0 for value in recalls)


def test_cli_eval_writes_json(fusion_checkpoint, scenes, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "metrics.json"
    result = runner.invoke(app, ["eval", str(fusion_checkpoint), str(scenes), "--split", "dev", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "ROC-AUC" in result.output
    assert "oracle accuracy" in result.output
    saved = json.loads(out.read_text())
    assert saved["split"] == "dev"
    assert "roc_auc" in saved["metrics"]


def _assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code != 0
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output
    assert "Traceback" not in result.output


def test_cli_eval_checkpoint_missing_weights(fusion_checkpoint, scenes, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fusion_checkpoint, broken)
    (broken / "model.safetensors").unlink()
    result = runner.invoke(app, ["eval", str(broken), str(scenes)])
    _assert_one_error_line(result, "model.safetensors")


def test_cli_eval_checkpoint_missing_vocab(fusion_checkpoint, scenes, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fusion_checkpoint, broken)
    (broken / "vocab.txt").unlink()
    result = runner.invoke(app, ["eval", str(broken), str(scenes)])
    _assert_one_error_line(result, "vocab.txt")


def test_cli_eval_unknown_split(fusion_checkpoint, scenes):
    result = runner.invoke(app, ["eval", str(fusion_checkpoint), str(scenes), "--split", "test"])
    _assert_one_error_line(result, "'test'")


def test_cli_eval_needs_arguments():
    result = runner.invoke(app, ["eval"])
    _assert_one_error_line(result, "CHECKPOINT or DATASET")


# ---- ImageNet top-1 ------------------------------------------------------------------------------

IMAGENET_SUBSET = 24


def _imagenet_subset(imagenet_dir: Path, folder: Path, count: int) -> Path:
    """Copy the first `count` rows of labels.csv and their images into `folder`."""
    lines = (imagenet_dir / "labels.csv").read_text(encoding="utf-8").splitlines()
    (folder / "images").mkdir(parents=True)
    for line in lines[1 : count + 1]:
        name = line.split(",")[0]
        shutil.copyfile(imagenet_dir / "images" / name, folder / "images" / name)
    (folder / "labels.csv").write_text("\n".join(lines[: count + 1]) + "\n", encoding="utf-8")
    return folder


@pytest.mark.shared_data
@pytest.mark.towers
def test_imagenet_top1_on_subset(imagenet_dir, tmp_path):
    folder = _imagenet_subset(imagenet_dir, tmp_path / "imagenet", IMAGENET_SUBSET)
    result = evaluate_imagenet(folder)
    assert result["images"] == IMAGENET_SUBSET
    # The tower scores 88.6 % on all 500 photos, and 24 photos leave room for a few misses.
    assert result["top1"] >= 0.7
    assert result["image_spec"]["mean"] == [127.0, 127.0, 127.0]


def test_cli_imagenet_labels_missing_column(tmp_path):
    folder = tmp_path / "imagenet"
    (folder / "images").mkdir(parents=True)
    (folder / "labels.csv").write_text("image,wnid\na.JPEG,n01440764\n", encoding="utf-8")
    result = runner.invoke(app, ["eval-imagenet", str(folder)])
    _assert_one_error_line(result, "'class_index'", "missing")


def test_cli_imagenet_missing_labels(tmp_path):
    result = runner.invoke(app, ["eval", "--imagenet", str(tmp_path)])
    _assert_one_error_line(result, "labels.csv")
