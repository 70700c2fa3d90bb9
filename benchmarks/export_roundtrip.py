"""Round trip of a trained fusion checkpoint: `edgemm export`, then `edgemm run` on every dev pair.

The script runs the two commands a user would run, as subprocesses. It compares the decision of
`edgemm run` with the decision of the PyTorch checkpoint on every matching pair of the dataset's
dev split, which are the pairs that `edgemm export` and `edgemm evaluate` build (seed 0). It also
checks that the parity figures in the manifest meet the FP32 limits.

    .venv/bin/python benchmarks/export_roundtrip.py runs/flickr-concat \\
        --dataset ../shared/data/flickr8k-1k --report benchmarks/results/export_roundtrip.md

Exit code 0 when every decision agrees and the manifest's parity passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
EDGEMM = [sys.executable, "-m", "edgemm.cli.main"]
# Pairs per `edgemm run` call, so each command line stays far below the OS argument limit.
RUN_CHUNK = 96
TORCH_BATCH = 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="Trained fusion checkpoint folder.")
    parser.add_argument("--dataset", type=Path, required=True, help="Dataset folder with a dev split.")
    parser.add_argument("--out", type=Path, default=None, help="Package folder to write (default: a temp folder).")
    parser.add_argument("--report", type=Path, default=None, help="Markdown file to write the results to.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgemm-roundtrip-") as scratch:
        package = args.out or Path(scratch) / "package"
        export_command = EDGEMM + ["export", str(args.checkpoint), "--out", str(package), "--dataset", str(args.dataset), "--parity-pairs", "0"]
        if args.out is not None and args.out.exists():
            export_command.append("--overwrite")
        started = time.perf_counter()
        subprocess.run(export_command, check=True, cwd=REPO_ROOT)
        export_seconds = time.perf_counter() - started

        pairs = dev_pairs(args.dataset)
        started = time.perf_counter()
        run_labels, run_scores = run_cli(package, pairs)
        run_seconds = time.perf_counter() - started
        torch_labels, torch_scores = run_torch(args.checkpoint, pairs)
        manifest = json.loads((package / "manifest.json").read_text())

    agree = sum(a == b for a, b in zip(run_labels, torch_labels))
    score_diff = float(np.max(np.abs(np.array(run_scores) - np.array(torch_scores))))
    parity = manifest["validation"]["parity"]
    passed = agree == len(pairs) and parity["passed"]
    lines = report_lines(args, pairs, agree, score_diff, parity, export_seconds, run_seconds, export_command, passed)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
    return 0 if passed else 1


def dev_pairs(dataset: Path):
    from edgemm.compression.package import PAIRS_SEED
    from edgemm.data.matching import make_matching_pairs
    from edgemm.data.records import load_dataset

    return make_matching_pairs(load_dataset(dataset, split="dev"), seed=PAIRS_SEED)


def run_cli(package: Path, pairs) -> tuple[list[str], list[float]]:
    """Return the label and p(match) that `edgemm run --json` gives for each pair."""
    labels, scores = [], []
    for start in range(0, len(pairs), RUN_CHUNK):
        command = EDGEMM + ["run", str(package), "--json"]
        for pair in pairs[start : start + RUN_CHUNK]:
            command += ["--text", pair.text, "--image", str(pair.image)]
        completed = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
        for item in json.loads(completed.stdout)["predictions"]:
            labels.append(item["label"])
            scores.append(item["match_score"])
    return labels, scores


def run_torch(checkpoint_dir: Path, pairs) -> tuple[list[str], list[float]]:
    """Return the label and p(match) of the PyTorch checkpoint for each pair."""
    import torch

    from edgemm.models.checkpoint import load_checkpoint
    from edgemm.runtime.preprocess import Preprocessor

    checkpoint = load_checkpoint(checkpoint_dir)
    threshold = float(checkpoint.extra.get("decision_threshold") or 0.5)
    preprocessor = Preprocessor(checkpoint.input_spec, checkpoint.vocab_path)
    labels, scores = [], []
    for start in range(0, len(pairs), TORCH_BATCH):
        chunk = pairs[start : start + TORCH_BATCH]
        feed = preprocessor([pair.text for pair in chunk], [pair.image for pair in chunk])
        with torch.no_grad():
            logits = checkpoint.model(*(torch.from_numpy(feed[name]) for name in ("input_ids", "attention_mask", "pixel_values")))
        match = torch.softmax(logits, dim=1)[:, checkpoint.labels.index("match")].tolist()
        scores += match
        labels += ["match" if score >= threshold else "mismatch" for score in match]
    return labels, scores


def report_lines(args, pairs, agree, score_diff, parity, export_seconds, run_seconds, export_command, passed) -> list[str]:
    import onnxruntime
    import torch

    positives = sum(1 for pair in pairs if pair.label == 1)
    displayed_command = [part if part != sys.executable else "python" for part in export_command]
    return [
        "# Export round trip: `edgemm export`, then `edgemm run` on every dev pair",
        "",
        f"- checkpoint: `{args.checkpoint}` (model.safetensors SHA-256 {weights_sha256(args.checkpoint)[:16]}...); "
        f"dataset: `{args.dataset}` (dev split)",
        f"- pairs: {len(pairs)} ({positives} true captions, {len(pairs) - positives} mismatched; seed 0)",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
        f"- export command: `{shlex.join(displayed_command)}` ({export_seconds:.0f} s wall, machine shared with other jobs)",
        f"- `edgemm run --json` in chunks of {RUN_CHUNK} pairs: {run_seconds:.0f} s wall",
        "",
        "| check | result |",
        "|---|---|",
        f"| same decision as PyTorch (`edgemm run` vs checkpoint) | {agree} / {len(pairs)} |",
        f"| max abs diff of p(match) | {score_diff:.2e} |",
        f"| manifest parity: samples | {parity['num_samples']} |",
        f"| manifest parity: max abs logit diff (limit {parity['limits']['max_abs_logit_diff']:g}) | {parity['max_abs_logit_diff']:.2e} |",
        f"| manifest parity: decision agreement (limit {parity['limits']['min_decision_agreement']:g}) | {parity['decision_agreement']:.4f} |",
        f"| manifest parity passed | {parity['passed']} |",
        "",
        f"Result: {'PASS' if passed else 'FAIL'}.",
    ]


def weights_sha256(checkpoint: Path) -> str:
    from edgemm.runtime.manifest import file_sha256

    return file_sha256(checkpoint / "model.safetensors")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
