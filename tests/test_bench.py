"""Tests of `edgemm bench`: real tiny ONNX packages, real onnxruntime sessions, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemm.bench.machine import parse_proc_cpuinfo, parse_sysctl
from edgemm.bench.runner import BenchConfig, run_benchmark
from edgemm.cli.main import app
from edgemm.runtime.spec import ImageSpec, InputSpec, TextSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "the", "dog", "cat", "red", "blue", "ball", "runs", "on", "grass", "sky", "in", "green", "square", "circle", "sits"]
SAMPLE_TEXTS = ["a red ball on the grass", "the dog runs in the green grass", "a blue square", "the cat sits on a red square"]
SAMPLE_COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 200), (220, 220, 40)]
TINY_SPEC = InputSpec(text=TextSpec(max_length=16), image=ImageSpec(resize=36, crop=32))


def build_tiny_package(folder: Path, precision: str = "fp32", accuracy: float = 80.0, width: int = 16) -> Path:
    """Export a tiny concat-fusion model to ONNX and write a model package around it.

    precision "int8-dynamic" quantizes the exported graph with onnxruntime's quantize_dynamic.
    `accuracy` (percent) is recorded as validation results in the layout `edgemm compress` writes.
    """
    import torch
    from torch import nn

    from edgemm.runtime.manifest import build_manifest, write_manifest

    class TinyFusion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(len(VOCAB), width)
            self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.head = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, 2))

        def forward(self, input_ids, attention_mask, pixel_values):
            mask = attention_mask.unsqueeze(-1).float()
            text = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            image = torch.relu(self.conv(pixel_values)).mean(dim=(2, 3))
            return self.head(torch.cat([text, image], dim=1))

    image_names = _write_vocab_and_samples(folder)
    torch.manual_seed(0)
    fp32_path = folder / ("model.onnx" if precision == "fp32" else "model-fp32.onnx")
    _export(TinyFusion().eval(), fp32_path, ["input_ids", "attention_mask", "pixel_values"], "logits")
    if precision != "fp32":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32_path), str(folder / "model.onnx"), weight_type=QuantType.QInt8)
        fp32_path.unlink()

    manifest = build_manifest(
        folder,
        kind="fusion_classifier",
        architecture="concat_fusion",
        graphs={"model": "model.onnx"},
        input_spec=TINY_SPEC,
        opset=18,
        labels=["mismatch", "match"],
        precision=precision,
        validation={"before": {"accuracy": 80.0, "roc_auc": 0.9}, "after": {"accuracy": accuracy, "roc_auc": 0.9}, "passed": True},
        samples={"texts": SAMPLE_TEXTS, "images": image_names},
    )
    write_manifest(folder, manifest)
    return folder


def build_tiny_dual_encoder(folder: Path, width: int = 16) -> Path:
    """Export tiny text and image encoders to ONNX and write a dual encoder package around them."""
    import torch
    from torch import nn

    from edgemm.runtime.manifest import build_manifest, write_manifest

    class TinyTextEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(len(VOCAB), width)
            self.projection = nn.Linear(width, 8)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).float()
            return self.projection((self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    class TinyImageEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.projection = nn.Linear(width, 8)

        def forward(self, pixel_values):
            return self.projection(torch.relu(self.conv(pixel_values)).mean(dim=(2, 3)))

    image_names = _write_vocab_and_samples(folder)
    torch.manual_seed(0)
    _export(TinyTextEncoder().eval(), folder / "text_encoder.onnx", ["input_ids", "attention_mask"], "text_embeds")
    _export(TinyImageEncoder().eval(), folder / "image_encoder.onnx", ["pixel_values"], "image_embeds")
    manifest = build_manifest(
        folder,
        kind="dual_encoder",
        architecture="dual_encoder",
        graphs={"text_encoder": "text_encoder.onnx", "image_encoder": "image_encoder.onnx"},
        input_spec=TINY_SPEC,
        opset=18,
        logit_scale=20.0,
        samples={"texts": SAMPLE_TEXTS, "images": image_names},
    )
    write_manifest(folder, manifest)
    return folder


def _write_vocab_and_samples(folder: Path) -> list[str]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (folder / "samples").mkdir()
    image_names = []
    for index, colour in enumerate(SAMPLE_COLOURS):
        image = Image.new("RGB", (64, 48), (250, 250, 250))
        ImageDraw.Draw(image).ellipse((10 + 4 * index, 8, 40 + 4 * index, 40), fill=colour)
        name = f"samples/{index}.jpg"
        image.save(folder / name, quality=90)
        image_names.append(name)
    return image_names


def _export(module, path: Path, input_names: list[str], output_name: str) -> None:
    import torch

    examples = {
        "input_ids": torch.ones(2, 6, dtype=torch.long),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
        "pixel_values": torch.zeros(2, 3, TINY_SPEC.image.crop, TINY_SPEC.image.crop),
    }
    dynamic_axes = {name: {0: "batch", 1: "sequence"} if name != "pixel_values" else {0: "batch"} for name in input_names}
    dynamic_axes[output_name] = {0: "batch"}
    torch.onnx.export(
        module,
        tuple(examples[name] for name in input_names),
        str(path),
        input_names=input_names,
        output_names=[output_name],
        dynamic_axes=dynamic_axes,
        opset_version=18,
        dynamo=False,
    )


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    return {
        "fp32": build_tiny_package(root / "tiny-fp32"),
        "int8": build_tiny_package(root / "tiny-int8", precision="int8-dynamic", accuracy=78.0),
        "dual": build_tiny_dual_encoder(root / "tiny-dual"),
    }


def _invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def _write_blocker(folder: Path, blocked: tuple[str, ...]) -> Path:
    """Write a sitecustomize.py that makes `blocked` top-level modules unimportable.

    Put `folder` on PYTHONPATH and every Python process started with it, children included,
    raises ImportError on those imports and prints which of them ended up in sys.modules.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import atexit
            import sys

            BLOCKED = {blocked!r}

            class BlockHeavyImports:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in BLOCKED:
                        raise ImportError(f"{{name}} is blocked in this test")
                    return None

            sys.meta_path.insert(0, BlockHeavyImports())

            def report_loaded():
                loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
                sys.stderr.write("blocked modules loaded: " + (",".join(loaded) or "none") + "\\n")

            atexit.register(report_loaded)
            """
        ),
        encoding="utf-8",
    )
    return folder


def _blocked_env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO_ROOT)])
    env["COLUMNS"] = "160"
    return env


def test_bench_writes_full_result(packages, tmp_path):
    out = tmp_path / "results.json"
    outcome = _invoke(
        "bench", packages["int8"], "--baseline", packages["fp32"], "--threads", "1,2", "--batch-sizes", "1,8",
        "--runs", "4", "--warmup", "1", "--cold-starts", "2", "--out", out,
    )
    assert outcome.exit_code == 0, outcome.output

    result = json.loads(out.read_text())
    assert result["format"] == "edgemm-bench"
    assert result["schema_version"] == 1
    machine = result["machine"]
    for key in ("cpu_model", "cores_physical", "cores_logical", "simd", "os", "python", "onnxruntime", "edgemm_version"):
        assert machine[key], key
    assert "avx2" in machine["simd"]
    assert "asimddp" in machine["simd"]

    names = [package["name"] for package in result["packages"]]
    assert names == ["tiny-fp32", "tiny-int8"]
    fp32, int8 = result["packages"]
    assert fp32["baseline"]
    assert not int8["baseline"]
    assert int8["precision"] == "int8-dynamic"
    assert int8["manifest"]["validation"]["after"]["accuracy"] == 78.0
    assert int8["size"]["model_bytes"] > 0

    settings = {(r["threads"], r["batch_size"], r["mode"]) for r in int8["results"]}
    assert settings == {(t, b, m) for t in (1, 2) for b in (1, 8) for m in ("end_to_end", "inference")}
    for row in int8["results"]:
        latency = row["latency_ms"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert row["runs"] == 4
        assert len(row["samples_ms"]) == 4
        assert row["throughput_per_s"] > 0
        assert row["speedup_vs_baseline"] > 0
    end_to_end = [row for row in int8["results"] if row["mode"] == "end_to_end"]
    assert all(0 <= row["preprocess_share"] <= 1 for row in end_to_end)
    assert all(row["speedup_vs_baseline"] == 1.0 for row in fp32["results"])

    cold = int8["cold_start"]
    assert len(cold["runs"]) == 2
    for phase in ("interpreter_ms", "input_read_ms", "import_ms", "load_ms", "first_result_ms", "total_ms"):
        assert cold["summary"][phase]["median"] > 0, phase
    for run in cold["runs"]:
        phases = run["interpreter_ms"] + run["import_ms"] + run["load_ms"] + run["first_result_ms"]
        assert run["total_ms"] == pytest.approx(phases, abs=0.01)
    assert cold["thread_environment"]["OMP_NUM_THREADS"] == "1"
    assert cold["peak_rss_bytes"] > 10_000_000
    assert "p50" in outcome.output
    assert "tiny-int8" in outcome.output


def test_dual_encoder_package(packages):
    config = BenchConfig(packages=[packages["dual"]], batch_sizes=[1, 4], runs=3, warmup=1, cold_starts=1)
    result = run_benchmark(config)

    package = result["packages"][0]
    assert package["kind"] == "dual_encoder"
    assert package["size"]["model_bytes"] == sum(
        (packages["dual"] / name).stat().st_size for name in ("text_encoder.onnx", "image_encoder.onnx")
    )
    assert len(package["results"]) == 4
    assert package["cold_start"]["summary"]["first_result_ms"]["median"] > 0


@pytest.mark.parametrize("name", ["fp32", "int8", "dual"])
def test_end_to_end_matches_runtime(packages, name):
    import numpy as np

    import edgemm.runtime
    from edgemm.bench.harness import PackageHarness
    from edgemm.bench.inputs import load_sample_inputs

    model = edgemm.runtime.load(packages[name], threads=1)
    harness = PackageHarness.open(packages[name], threads=1)
    inputs = load_sample_inputs(model.manifest)

    measured = harness.end_to_end(inputs.texts, inputs.images)
    if name == "dual":
        expected = model.similarity(inputs.texts, inputs.images, scale=True)
    else:
        expected = model.predict(inputs.texts, inputs.images).scores
    np.testing.assert_allclose(measured, expected, rtol=1e-5, atol=1e-6)


def test_cold_start_memory_excludes_parent(packages):
    import numpy as np

    from edgemm.bench._cold import measure_cold_starts

    # 400 MB touched in this process: a child that inherited the parent's peak would report more.
    ballast = np.ones(50_000_000)
    cold = measure_cold_starts(packages["fp32"], threads=1, runs=1)

    assert ballast.nbytes == 400_000_000
    assert 10_000_000 < cold["peak_rss_bytes"] < 300_000_000


def test_single_thread_uses_one_core(packages):
    config = BenchConfig(packages=[packages["fp32"]], threads=[1], batch_sizes=[8], runs=30, warmup=2, cold_starts=0)
    result = run_benchmark(config)

    for row in result["packages"][0]["results"]:
        # Other processes can only lower this ratio; above 1.2 means a second busy thread.
        assert row["cpu_time_ratio"] <= 1.2, row["mode"]
        assert row["library_thread_limit"] == "threadpoolctl"


def test_module_runs_without_torch(packages, tmp_path):
    blocker = _write_blocker(tmp_path / "blocker", ("torch", "onnx", "onnxscript", "torch_pruning"))
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "-m", "edgemm.bench", str(packages["fp32"]), "--runs", "2", "--warmup", "0",
         "--cold-starts", "1", "--out", str(out)],
        capture_output=True, text=True, env=_blocked_env(blocker), timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    assert "blocked modules loaded: none" in completed.stderr
    result = json.loads(out.read_text())
    assert result["packages"][0]["cold_start"]["summary"]["total_ms"]["median"] > 0


def _write_dataset(folder: Path, package: Path, layout: str) -> Path:
    (folder / "images").mkdir(parents=True)
    for index in range(3):
        (folder / "images" / f"{index}.jpg").write_bytes((package / "samples" / f"{index}.jpg").read_bytes())
    texts = ["a red ball", "the green grass", "a blue square"]
    if layout == "records.jsonl":
        lines = [json.dumps({"image": f"images/{i}.jpg", "text": text, "label": 1}) for i, text in enumerate(texts)]
        (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    else:
        rows = ["image,caption,split"] + [f"{i}.jpg,{text},dev" for i, text in enumerate(texts)]
        (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("layout", ["records.jsonl", "captions.csv"])
def test_dataset_inputs(packages, tmp_path, layout):
    dataset = _write_dataset(tmp_path / "data", packages["fp32"], layout)
    config = BenchConfig(packages=[packages["fp32"]], batch_sizes=[2], runs=2, warmup=0, cold_starts=1, dataset=dataset)
    result = run_benchmark(config)

    assert result["settings"]["inputs"] == {"kind": "dataset", "path": str(dataset), "pairs": 3}
    assert result["packages"][0]["inputs"]["kind"] == "dataset"
    assert result["packages"][0]["cold_start"]["summary"] is not None


def test_flickr_photos_as_inputs(packages, flickr_dir, tmp_path):
    out = tmp_path / "results.json"
    outcome = _invoke("bench", packages["fp32"], "--dataset", flickr_dir, "--batch-sizes", "4", "--runs", "3",
                      "--warmup", "1", "--cold-starts", "0", "--out", out)

    assert outcome.exit_code == 0, outcome.output
    result = json.loads(out.read_text())
    assert result["settings"]["inputs"]["pairs"] == 64
    assert result["packages"][0]["cold_start"]["summary"] is None


def test_time_budget_replaces_runs(packages):
    config = BenchConfig(packages=[packages["fp32"]], runs=5, warmup=0, time_budget_s=0.05, cold_starts=0, preprocess=False)
    result = run_benchmark(config)

    rows = result["packages"][0]["results"]
    assert [row["mode"] for row in rows] == ["inference"]
    samples = rows[0]["samples_ms"]
    assert rows[0]["runs"] == len(samples) > 5  # --runs 5 is ignored under a budget
    # Runs start only while the 50 ms budget lasts, so all but the last run fit in it.
    assert sum(samples[:-1]) < 50.0
    assert result["settings"]["runs"] is None


def test_missing_package_is_one_error_line(tmp_path):
    outcome = _invoke("bench", tmp_path / "no-such-package", "--cold-starts", "0", "--out", tmp_path / "r.json")

    assert outcome.exit_code != 0
    assert "error:" in outcome.output
    assert "not found" in outcome.output
    assert "Traceback" not in outcome.output
    assert not (tmp_path / "r.json").exists()


def test_damaged_graph_is_one_error_line(packages, tmp_path):
    from edgemm.runtime.manifest import build_manifest, read_manifest, write_manifest

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("vocab.txt", "manifest.json"):
        (damaged / name).write_bytes((packages["fp32"] / name).read_bytes())
    (damaged / "model.onnx").write_bytes(b"this is not an onnx graph")
    original = read_manifest(packages["fp32"])
    manifest = build_manifest(damaged, kind="fusion_classifier", architecture="concat_fusion", graphs={"model": "model.onnx"},
                              input_spec=original.input_spec, opset=18, labels=["mismatch", "match"])
    write_manifest(damaged, manifest)

    outcome = _invoke("bench", damaged, "--cold-starts", "0", "--out", tmp_path / "r.json")

    assert outcome.exit_code != 0
    assert "not a valid ONNX model" in outcome.output
    assert "Traceback" not in outcome.output


def test_package_without_samples_needs_dataset(packages, tmp_path):
    from edgemm.runtime.manifest import read_manifest, write_manifest

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("vocab.txt", "model.onnx"):
        (bare / name).write_bytes((packages["fp32"] / name).read_bytes())
    data = dict(read_manifest(packages["fp32"]).data)
    data["samples"] = {}
    data["files"] = {name: entry for name, entry in data["files"].items() if not name.startswith("samples/")}
    write_manifest(bare, data)

    outcome = _invoke("bench", bare, "--cold-starts", "0", "--out", tmp_path / "r.json")

    assert outcome.exit_code != 0
    assert "--dataset" in outcome.output


@pytest.mark.parametrize("value", ["0", "-1", "1,0", "eight"])
def test_invalid_batch_size_rejected(packages, tmp_path, value):
    outcome = _invoke("bench", packages["fp32"], "--batch-sizes", value, "--out", tmp_path / "r.json")

    assert outcome.exit_code != 0
    assert "error:" in outcome.output
    assert "--batch-sizes" in outcome.output
    assert "Traceback" not in outcome.output


def test_threads_above_cores_warns_and_runs(packages, tmp_path):
    from edgemm.bench.machine import usable_core_count

    too_many = usable_core_count() + 1
    out = tmp_path / "r.json"
    outcome = _invoke("bench", packages["fp32"], "--threads", str(too_many), "--runs", "2", "--warmup", "0",
                      "--cold-starts", "0", "--no-preprocess", "--out", out)

    assert outcome.exit_code == 0, outcome.output
    assert "warning:" in outcome.output
    assert f"--threads {too_many}" in outcome.output
    result = json.loads(out.read_text())
    assert result["warnings"]
    assert result["packages"][0]["results"][0]["threads"] == too_many


def test_unwritable_output_fails_before_measuring(tmp_path):
    blocker_file = tmp_path / "a-file"
    blocker_file.write_text("not a folder")
    # The package does not exist either: the output check must come first.
    outcome = _invoke("bench", tmp_path / "no-such-package", "--out", blocker_file / "results.json")

    assert outcome.exit_code != 0
    assert "output folder" in outcome.output
    assert "Traceback" not in outcome.output


def test_parse_arm_cpuinfo():
    text = "processor\t: 0\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
    model, simd, source = parse_proc_cpuinfo(text)

    assert source == "/proc/cpuinfo"
    assert [name for name in ("neon", "asimddp", "fp16") if not simd[name]] == []
    assert [name for name in ("avx2", "i8mm") if simd[name]] == []
    assert model


def test_parse_x86_cpuinfo():
    text = "model name\t: Example CPU @ 2.0GHz\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512_vnni avx_vnni amx_int8\n"
    model, simd, _ = parse_proc_cpuinfo(text)

    assert model == "Example CPU @ 2.0GHz"
    assert [name for name in ("avx512_vnni", "avx_vnni", "amx_int8") if not simd[name]] == []
    assert [name for name in ("neon", "amx_tile") if simd[name]] == []


def test_parse_macos_sysctl():
    text = "machdep.cpu.brand_string: Apple M2\nhw.optional.neon: 1\nhw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_FP16: 1\nhw.optional.arm.FEAT_I8MM: 0\n"
    model, simd, source = parse_sysctl(text)

    assert (model, source) == ("Apple M2", "sysctl")
    assert [name for name in ("neon", "asimddp", "fp16") if not simd[name]] == []
    assert [name for name in ("i8mm", "avx2") if simd[name]] == []


def test_contention_warnings():
    from edgemm.bench.machine import usable_core_count
    from edgemm.bench.runner import _contention_warnings

    def packages_with(ratio: float) -> list[dict]:
        return [{"results": [{"threads": 1, "cpu_time_ratio": ratio}, {"threads": 2, "cpu_time_ratio": 0.1}]}]

    assert _contention_warnings([0.0, 0.0, 0.0], packages_with(0.95)) == []
    starved = _contention_warnings([0.0, 0.0, 0.0], packages_with(0.5))
    assert len(starved) == 1
    assert "50% of a core" in starved[0]
    busy = _contention_warnings([usable_core_count() + 0.5, 0.0, 0.0], packages_with(0.95))
    assert len(busy) == 1
    assert "load average" in busy[0]


def test_baseline_listed_twice_measured_once(packages, monkeypatch):
    monkeypatch.chdir(packages["fp32"].parent)
    config = BenchConfig(packages=[Path("./tiny-fp32")], baseline=packages["fp32"], runs=2, warmup=0, cold_starts=0, preprocess=False)
    result = run_benchmark(config)

    assert [package["name"] for package in result["packages"]] == ["tiny-fp32"]
    assert result["packages"][0]["baseline"]
    assert result["packages"][0]["results"][0]["speedup_vs_baseline"] == 1.0


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where no file can be created")
def test_output_in_proc_fails_before_measuring(tmp_path):
    # os.access reports /proc writable for root, so only a probe file shows the truth.
    outcome = _invoke("bench", tmp_path / "no-such-package", "--out", "/proc/results.json")

    assert outcome.exit_code != 0
    assert "Output folder /proc is not writable" in outcome.output
    assert "Traceback" not in outcome.output
