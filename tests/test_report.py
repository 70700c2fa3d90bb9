"""Tests of `edgemm report`: merging real benchmark results into Markdown, CSV and PNG plots."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from edgemm.bench.runner import BenchConfig, run_benchmark
from edgemm.cli.common import write_json
from edgemm.cli.main import app
from test_bench import REPO_ROOT, _write_blocker, build_tiny_package


@pytest.fixture(scope="module")
def result_files(tmp_path_factory) -> list[Path]:
    """Two result files: both packages at 1 thread, then the FP32 package alone at 2 threads."""
    root = tmp_path_factory.mktemp("report")
    fp32 = build_tiny_package(root / "tiny-fp32")
    int8 = build_tiny_package(root / "tiny-int8", precision="int8-dynamic", accuracy=78.0)

    first = run_benchmark(BenchConfig(packages=[int8], baseline=fp32, threads=[1], batch_sizes=[1, 2], runs=3, warmup=1, cold_starts=1))
    second = run_benchmark(BenchConfig(packages=[fp32], threads=[2], batch_sizes=[1, 2], runs=3, warmup=1, cold_starts=1))
    paths = [root / "one-thread.json", root / "two-threads.json"]
    write_json(paths[0], first)
    write_json(paths[1], second)
    return paths


def _invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_report_writes_markdown_csv_and_plots(result_files, tmp_path):
    out = tmp_path / "report"
    outcome = _invoke("report", *result_files, "--out", out)

    assert outcome.exit_code == 0, outcome.output
    markdown = (out / "report.md").read_text()
    assert "## Machines" in markdown
    assert "## Latency" in markdown
    assert "Plots were skipped" not in markdown

    plots = sorted(out.glob("*.png"))
    assert len(plots) >= 3
    for plot in plots:
        assert f"]({plot.name})" in markdown
        with Image.open(plot) as image:
            assert image.width > 300
            assert image.height > 150

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # File one: 2 packages x 2 batch sizes x 2 modes; file two: 1 package x 2 x 2.
    assert len(rows) == 12
    assert {row["source"] for row in rows} == {"one-thread.json", "two-threads.json"}
    assert {row["threads"] for row in rows} == {"1", "2"}
    int8_rows = [row for row in rows if row["package"] == "tiny-int8"]
    assert {row["accuracy"] for row in int8_rows} == {"78"}
    assert {row["accuracy_metric"] for row in int8_rows} == {"accuracy"}
    assert all(float(row["speedup_vs_baseline"]) > 0 for row in int8_rows)
    for row in rows:
        assert f"| {row['label']} |" in markdown


def test_report_lists_bench_warnings(result_files, tmp_path):
    data = json.loads(result_files[0].read_text())
    data["warnings"] = ["--threads 64 is above the 2 cores this process may use"]
    warned = tmp_path / "warned.json"
    warned.write_text(json.dumps(data))

    outcome = _invoke("report", warned, "--out", tmp_path / "report")

    assert outcome.exit_code == 0, outcome.output
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "- warned.json: --threads 64 is above the 2 cores" in markdown


def test_report_labels_repeated_packages(result_files, tmp_path):
    outcome = _invoke("report", *result_files, "--out", tmp_path)

    assert outcome.exit_code == 0, outcome.output
    markdown = (tmp_path / "report.md").read_text()
    # tiny-fp32 was measured in both files, so its label names the file.
    assert "tiny-fp32 [one-thread.json]" in markdown
    assert "tiny-fp32 [two-threads.json]" in markdown
    assert "| tiny-int8 |" in markdown


def test_report_without_matplotlib(result_files, tmp_path):
    blocker = _write_blocker(tmp_path / "blocker", ("matplotlib",))
    out = tmp_path / "report"
    # Plots from an earlier report in the same folder must not survive into a tables-only report.
    assert _invoke("report", *result_files, "--out", out).exit_code == 0
    assert list(out.glob("*.png"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO_ROOT)]))
    completed = subprocess.run(
        [sys.executable, "-m", "edgemm.cli.main", "report", *map(str, result_files), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    assert "plots skipped" in completed.stderr
    markdown = (out / "report.md").read_text()
    assert "Plots were skipped" in markdown
    assert "pip install 'edgemm[plots]'" in markdown
    assert list(out.glob("*.png")) == []
    assert (out / "results.csv").is_file()


def test_report_rejects_other_schema_version(result_files, tmp_path):
    data = json.loads(result_files[0].read_text())
    data["schema_version"] = 2
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(data))

    outcome = _invoke("report", newer, "--out", tmp_path / "report")

    assert outcome.exit_code != 0
    assert "schema version 2" in outcome.output
    assert "Traceback" not in outcome.output
    assert not (tmp_path / "report" / "report.md").exists()


@pytest.mark.parametrize("content", ['{"results": []}', "not json", "[1, 2]"])
def test_report_rejects_other_files(tmp_path, content):
    path = tmp_path / "other.json"
    path.write_text(content)

    outcome = _invoke("report", path, "--out", tmp_path / "report")

    assert outcome.exit_code != 0
    assert "error:" in outcome.output
    assert "Traceback" not in outcome.output


def test_report_missing_file(tmp_path):
    outcome = _invoke("report", tmp_path / "absent.json", "--out", tmp_path / "report")

    assert outcome.exit_code != 0
    assert "not found" in outcome.output


def test_report_same_file_names(result_files, tmp_path):
    copies = []
    for folder in ("machine-a", "machine-b"):
        (tmp_path / folder).mkdir()
        copy = tmp_path / folder / "results.json"
        copy.write_bytes(result_files[0].read_bytes())
        copies.append(copy)

    outcome = _invoke("report", *copies, "--out", tmp_path / "report")

    assert outcome.exit_code == 0, outcome.output
    with open(tmp_path / "report" / "results.csv", newline="") as handle:
        sources = {row["source"] for row in csv.DictReader(handle)}
    assert sources == {str(copy) for copy in copies}
