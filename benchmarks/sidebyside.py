"""Side-by-side benchmark of edgemm packages against what a user would pick instead.

One run compares, on the same preprocessed real inputs:

- PyTorch eager FP32 (the checkpoint),
- ONNX Runtime FP32 (the `edgemm export` package),
- one package per edgemm recipe (`edgemm compress CHECKPOINT --recipe export/NAME.toml`),
- ONNX Runtime `quantize_dynamic` and `quantize_static` with default settings,
- OpenVINO FP32 and OpenVINO INT8 from `nncf.quantize` with default settings, run by a worker
  process under another Python (`--openvino-python`) because OpenVINO is not in edgemm's venv.

Latency is batch 1 on one thread, inference only: the inputs are preprocessed once before the
clock starts. Repetitions are interleaved: every round gives each contender the same number of
runs in turn, so a load change on a shared machine affects all contenders alike. The headline is
the ratio of each contender's p50 to ONNX Runtime FP32's p50 from the same run.

Accuracy comes from `edgemm.compression.validate` on the validation split: matching accuracy and
ROC-AUC for fusion models, recall@k for dual encoders. Size is the bytes on disk of the files a
device loads: ONNX graphs, OpenVINO IR files, or the PyTorch weights file.

The OpenVINO worker mode (`--openvino-worker`) imports only the standard library, numpy,
openvino and nncf, so this file must not import edgemm or torch at module level.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

logger = logging.getLogger("sidebyside")

REPO = Path(__file__).resolve().parent.parent
# The shared data folder sits beside the repository clone.
DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"

# Graphs a device runs, per model kind, and the latency tasks measured on them.
FUSION = "fusion_classifier"
DUAL = "dual_encoder"
TASK_GRAPHS = {"pair": "model", "text": "text_encoder", "image": "image_encoder"}
KIND_TASKS = {FUSION: ("pair",), DUAL: ("text", "image", "query")}
KIND_GRAPHS = {FUSION: ("model",), DUAL: ("text_encoder", "image_encoder")}
OUTPUT_NAMES = {"model": "logits", "text_encoder": "text_embeds", "image_encoder": "image_embeds"}
# The headline latency task of each kind: one text-image decision, or one text query against
# the precomputed image gallery (text encode, similarity and top-k).
HEADLINE_TASK = {FUSION: "pair", DUAL: "query"}
REFERENCE_ROW = "ort-fp32"
QUERY_TOP_K = 5
ACCURACY_BATCH = 32

# Acceptance limits for the best recipe, against the FP32 original on the validation split.
MAX_SIZE_FRACTION = 0.30
MIN_SPEEDUP = 2.5
MAX_ACCURACY_DROP = 1.0  # points
MAX_AUC_DROP = 0.01
MAX_RECALL_DROP = 2.0  # points of text-to-image recall@5


# ---------------------------------------------------------------------------------------------
# Timing, shared by the main process and the OpenVINO worker
# ---------------------------------------------------------------------------------------------


def time_calls(call: Callable[[Any], Any], feeds: list[Any], count: int, start: int = 0) -> list[float]:
    """Call `call` on `count` feeds taken in turn from `feeds` and return each call's seconds."""
    samples = []
    for index in range(count):
        feed = feeds[(start + index) % len(feeds)]
        began = time.perf_counter()
        call(feed)
        samples.append(time.perf_counter() - began)
    return samples


def top_k_rows(similarity: np.ndarray, k: int) -> np.ndarray:
    """Return the indices of the k largest values of each row, best first."""
    k = min(k, similarity.shape[1])
    part = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(similarity, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def query_gallery(text_embeds: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Score text embeddings against an L2-normalised image gallery and return the top-k indices."""
    return top_k_rows(text_embeds.astype(np.float32) @ gallery.T, QUERY_TOP_K)


def latency_summary(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples, dtype=np.float64) * 1000.0
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "runs": int(values.size),
    }


def load_feed_archive(path: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """Read feeds saved by `save_feed_archive`: {group: [feed, ...]}."""
    grouped: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    with np.load(path) as archive:
        for key in archive.files:
            group, index, name = key.split("/")
            grouped.setdefault(group, {}).setdefault(int(index), {})[name] = archive[key]
    return {group: [feeds[i] for i in sorted(feeds)] for group, feeds in grouped.items()}


def save_feed_archive(path: Path, groups: dict[str, list[dict[str, np.ndarray]]]) -> Path:
    arrays = {f"{group}/{index}/{name}": array for group, feeds in groups.items() for index, feed in enumerate(feeds) for name, array in feed.items()}
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
# OpenVINO worker: runs under the OpenVINO venv's Python and serves JSON-line requests on stdin
# ---------------------------------------------------------------------------------------------


class OpenVinoWorker:
    """Convert, quantize, time and run ONNX graphs with OpenVINO on one thread.

    Requests (one JSON object per line) and their replies:
    - {"op": "versions"} -> {"openvino": ..., "nncf": ..., "numpy": ..., "python": ...}
    - {"op": "prepare", "row": R, "graphs": {graph: onnx}, "out_dir": D, "int8": bool,
       "calibration": npz or null} -> {"files": {name: bytes}, "seconds": s}
    - {"op": "feeds", "path": npz} -> {} (latency feeds grouped by task)
    - {"op": "gallery", "row": R, "path": npy} -> {}
    - {"op": "time", "row": R, "task": T, "count": N, "start": i} -> {"samples": [s, ...]}
    - {"op": "infer", "row": R, "graph": G, "inputs": npz, "output": npy} -> {}
    Every reply also has "ok"; a failed request replies {"ok": false, "error": message}.
    """

    def __init__(self) -> None:
        import openvino as ov

        self.ov = ov
        self.core = ov.Core()
        self.requests: dict[str, dict[str, Any]] = {}
        self.galleries: dict[str, np.ndarray] = {}
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {}

    def versions(self, request: dict[str, Any]) -> dict[str, Any]:
        import nncf

        return {"openvino": self.ov.__version__, "nncf": nncf.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}

    def prepare(self, request: dict[str, Any]) -> dict[str, Any]:
        out_dir = Path(request["out_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        calibration = load_feed_archive(Path(request["calibration"])) if request.get("calibration") else {}
        began = time.perf_counter()
        files, compiled = {}, {}
        for graph, onnx_path in request["graphs"].items():
            # read_model uses the ONNX frontend directly; openvino.convert_model would also work
            # but reports usage telemetry unless the user has opted out.
            model = self.core.read_model(onnx_path)
            if request["int8"]:
                import nncf

                dataset = nncf.Dataset(calibration[graph])
                model = nncf.quantize(model, dataset)
            target = out_dir / f"{graph}.xml"
            # FP32 keeps FP32 weights on disk; INT8 is saved with the defaults of save_model.
            self.ov.save_model(model, str(target), compress_to_fp16=bool(request["int8"]))
            for suffix in (".xml", ".bin"):
                files[target.with_suffix(suffix).name] = target.with_suffix(suffix).stat().st_size
            compiled[graph] = self.core.compile_model(
                str(target), "CPU", {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
            )
        self.requests[request["row"]] = {graph: model.create_infer_request() for graph, model in compiled.items()}
        return {"files": files, "seconds": time.perf_counter() - began}

    def load_feeds(self, request: dict[str, Any]) -> dict[str, Any]:
        self.feeds = load_feed_archive(Path(request["path"]))
        return {}

    def gallery(self, request: dict[str, Any]) -> dict[str, Any]:
        self.galleries[request["row"]] = np.load(request["path"])
        return {}

    def _run(self, row: str, graph: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        infer = self.requests[row][graph]
        infer.infer(feed)
        return infer.get_tensor(OUTPUT_NAMES[graph]).data

    def time(self, request: dict[str, Any]) -> dict[str, Any]:
        row, task = request["row"], request["task"]
        if task == "query":
            gallery = self.galleries[row]

            def call(feed):
                return query_gallery(self._run(row, "text_encoder", feed), gallery)

            feeds = self.feeds["text"]
        else:
            graph = TASK_GRAPHS[task]

            def call(feed):
                return self._run(row, graph, feed)

            feeds = self.feeds[task]
        return {"samples": time_calls(call, feeds, int(request["count"]), int(request.get("start", 0)))}

    def infer(self, request: dict[str, Any]) -> dict[str, Any]:
        batches = load_feed_archive(Path(request["inputs"]))["batches"]
        outputs = [np.array(self._run(request["row"], request["graph"], feed), dtype=np.float32) for feed in batches]
        np.save(request["output"], np.concatenate(outputs))
        return {}

    def serve(self, stdin, stdout) -> None:
        handlers = {
            "versions": self.versions,
            "prepare": self.prepare,
            "feeds": self.load_feeds,
            "gallery": self.gallery,
            "time": self.time,
            "infer": self.infer,
        }
        for line in stdin:
            request = json.loads(line)
            if request["op"] == "exit":
                break
            try:
                reply = {"ok": True, **handlers[request["op"]](request)}
            except Exception as error:  # Report every failure to the parent, which records it on the row.
                reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            stdout.write(json.dumps(reply) + "\n")
            stdout.flush()


class OpenVinoClient:
    """The main process's end of an `OpenVinoWorker` running under another Python."""

    def __init__(self, python: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", CI="true")  # CI=true: NNCF sends no telemetry.
        self.process = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--openvino-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def request(self, op: str, **values: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps({"op": op, **values}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the OpenVINO worker exited with code {self.process.wait()}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=30)


def probe_openvino(python: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """Return (versions, None) when `python` can import openvino and nncf, else (None, reason)."""
    if python is None:
        return None, "no --openvino-python given (see benchmarks/README.md to set up the OpenVINO venv)"
    if not Path(python).exists():
        return None, f"--openvino-python {python} does not exist"
    code = "import json, sys, numpy, openvino, nncf; print(json.dumps({'openvino': openvino.__version__, 'nncf': nncf.__version__}))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=dict(os.environ, CI="true"), timeout=300)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{python} cannot import openvino and nncf: {last}"
    return json.loads(result.stdout.strip().splitlines()[-1]), None


# ---------------------------------------------------------------------------------------------
# Rows and their runners (main process)
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One contender of one model: how it was built, its size, accuracy and latency."""

    name: str
    family: str  # pytorch, onnxruntime, edgemm or openvino
    description: str
    status: str = "ok"  # ok, skipped or failed
    reason: str | None = None
    build: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    round_p50_ms: dict[str, list[float]] = field(default_factory=dict)
    runner: Any = None
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int | None:
        return sum(self.files.values()) if self.files else None

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason, self.runner = status, reason, None
        logger.warning("%s: %s (%s)", self.name, status, reason)

    def to_dict(self) -> dict[str, Any]:
        record = {item.name: getattr(self, item.name) for item in fields(self) if item.name not in ("runner", "samples")}
        record["size_bytes"] = self.size_bytes
        return record


class TorchRunner:
    """PyTorch eager FP32 on one thread."""

    def __init__(self, model: Any, latency_feeds: dict[str, list[dict[str, np.ndarray]]]):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.feeds = {task: [{k: torch.from_numpy(v) for k, v in feed.items()} for feed in feeds] for task, feeds in latency_feeds.items()}
        self.gallery: np.ndarray | None = None

    def time(self, task: str, count: int, start: int) -> list[float]:
        model = self.model
        calls = {
            "pair": lambda feed: model(**feed),
            "text": lambda feed: model.encode_text(**feed),
            "image": lambda feed: model.encode_image(**feed),
            "query": lambda feed: query_gallery(model.encode_text(**feed).numpy(), self.gallery),
        }
        feeds = self.feeds["text" if task == "query" else task]
        with self.torch.inference_mode():
            return time_calls(calls[task], feeds, count, start)


class OrtRunner:
    """ONNX Runtime sessions of a package's runtime graphs, with the runtime's session options and one thread."""

    def __init__(self, package: Path, kind: str, latency_feeds: dict[str, list[dict[str, np.ndarray]]]):
        import onnxruntime as ort

        from edgemm.runtime.manifest import read_manifest

        manifest = read_manifest(package)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {
            graph: ort.InferenceSession(str(manifest.graph_path(graph)), sess_options=options, providers=["CPUExecutionProvider"])
            for graph in KIND_GRAPHS[kind]
        }
        self.feeds = latency_feeds
        self.gallery: np.ndarray | None = None

    def _run(self, graph: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[graph].run([OUTPUT_NAMES[graph]], feed)[0]

    def time(self, task: str, count: int, start: int) -> list[float]:
        if task == "query":
            return time_calls(lambda feed: query_gallery(self._run("text_encoder", feed), self.gallery), self.feeds["text"], count, start)
        graph = TASK_GRAPHS[task]
        return time_calls(lambda feed: self._run(graph, feed), self.feeds[task], count, start)


class OpenVinoRunner:
    """A row whose graphs live in the OpenVINO worker process."""

    def __init__(self, client: OpenVinoClient, row: str):
        self.client = client
        self.row = row

    def time(self, task: str, count: int, start: int) -> list[float]:
        return self.client.request("time", row=self.row, task=task, count=count, start=start)["samples"]


def graph_files(package: Path, kind: str) -> dict[str, int]:
    """Bytes of the graphs a device loads from a package (a dual encoder's model.onnx is not loaded)."""
    from edgemm.runtime.manifest import read_manifest

    manifest = read_manifest(package, verify_checksums=False)
    return {manifest.graphs[graph]: manifest.graph_path(graph).stat().st_size for graph in KIND_GRAPHS[kind]}


def gallery_of(data: Any, image_embeds: np.ndarray) -> np.ndarray:
    """Return one embedding per unique validation image, in the order `task_metrics` ranks them."""
    order = sorted(set(data.images), key=str)
    first = {}
    for index, image in enumerate(data.images):
        first.setdefault(image, index)
    return np.stack([image_embeds[first[image]] for image in order]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Building the contenders
# ---------------------------------------------------------------------------------------------


def edgemm_command() -> list[str]:
    script = Path(sys.executable).parent / "edgemm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgemm.cli.main"]


def run_cli(command: list[str], log_path: Path, timeout: float | None) -> tuple[float, str | None]:
    """Run an edgemm command with its output in `log_path`; return (seconds, failure reason or None)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Running %s", shlex.join(command))
    began = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            return time.perf_counter() - began, f"timed out after {timeout:.0f} s (log: {log_path})"
    seconds = time.perf_counter() - began
    if result.returncode == 0:
        return seconds, None
    lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return seconds, f"exit code {result.returncode}: {last} (log: {log_path})"


def build_package(row: Row, command: list[str], out: Path, log_path: Path, timeout: float | None, rebuild: bool) -> Path | None:
    """Build a package with an edgemm command unless `out` already holds one; record the build on `row`."""
    row.build["command"] = shlex.join(command)
    if (out / "manifest.json").is_file() and not rebuild:
        row.build["reused"] = str(out)
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    seconds, failure = run_cli(command, log_path, timeout)
    row.build["seconds"] = round(seconds, 1)
    if failure is not None:
        row.fail("failed", f"`{shlex.join(command[1:])}` failed: {failure}")
        return None
    return out


class CalibrationReader:
    """A plain `CalibrationDataReader` that yields one prepared feed after another, as ORT's examples do."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def quantize_with_ort_defaults(fp32_package: Path, out: Path, kind: str, mode: str, calibration: dict[str, list[dict[str, np.ndarray]]]) -> Path:
    """Quantize a package's runtime graphs with `quantize_dynamic` or `quantize_static`, defaults only, and package them."""
    import shutil

    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    from edgemm.compression.package import write_package
    from edgemm.runtime.manifest import read_manifest

    class Reader(CalibrationReader, CalibrationDataReader):
        pass

    manifest = read_manifest(fp32_package)
    scratch = out.with_name(out.name + "-graphs")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    graphs = {}
    for graph in KIND_GRAPHS[kind]:
        target = scratch / manifest.graphs[graph]
        if mode == "dynamic":
            quantize_dynamic(str(manifest.graph_path(graph)), str(target))
        else:
            quantize_static(str(manifest.graph_path(graph)), str(target), Reader(calibration[graph]))
        graphs[graph] = target
    if out.exists():
        shutil.rmtree(out)
    write_package(
        out,
        graphs=graphs,
        architecture=manifest.architecture,
        input_spec=manifest.input_spec,
        vocab_path=manifest.vocab_path,
        labels=manifest.labels,
        opset=manifest.opset,
        precision=f"int8-{mode}",
        decision_threshold=manifest.decision_threshold,
        logit_scale=manifest.logit_scale,
        compression={"quantization": {"tool": "onnxruntime.quantization", "function": f"quantize_{mode}", "settings": "defaults"}},
    )
    shutil.rmtree(scratch)
    return out


# ---------------------------------------------------------------------------------------------
# One model: inputs, rows, accuracy, interleaved latency
# ---------------------------------------------------------------------------------------------


class ModelSuite:
    """All contenders of one checkpoint, measured on the same inputs."""

    def __init__(self, label: str, checkpoint: Path, settings: argparse.Namespace, openvino: OpenVinoClient | None, openvino_reason: str | None):
        from edgemm.compression.validate import build_validation_set
        from edgemm.data.records import load_dataset
        from edgemm.models.checkpoint import load_checkpoint
        from edgemm.runtime.preprocess import Preprocessor

        self.label = label
        self.checkpoint_dir = Path(checkpoint)
        self.settings = settings
        self.openvino = openvino
        self.openvino_reason = openvino_reason
        self.work = Path(settings.work_dir) / label
        self.work.mkdir(parents=True, exist_ok=True)

        self.checkpoint = load_checkpoint(self.checkpoint_dir)
        self.kind = DUAL if self.checkpoint.model.architecture == DUAL else FUSION
        self.threshold = float(self.checkpoint.extra.get("decision_threshold", 0.5))
        self.preprocessor = Preprocessor(self.checkpoint.input_spec, self.checkpoint.vocab_path)

        records = load_dataset(settings.dataset)
        self.val_records = [r for r in records if r.split == settings.split and r.label != 0]
        train_records = [r for r in records if r.split == "train" and r.label != 0]
        if not self.val_records or not train_records:
            raise SystemExit(f"error: {settings.dataset} needs records in the 'train' and {settings.split!r} splits.")
        self.val_set = build_validation_set(self.val_records, self.kind, max_pairs=settings.max_pairs)
        if self.kind == DUAL and len(self.val_set.images) != self.val_set.size:
            # NOTE: build_validation_set lists each dual-encoder image once, but task_metrics
            # indexes images by caption. Repeating each caption's image satisfies both, and
            # run_torch_model and run_package still encode every unique image once.
            self.val_set.images = [self.val_set.images[index] for index in self.val_set.text_to_image]
            self.val_set.text_to_image = list(range(self.val_set.size))  # Caption i now has its image at images[i].
        self.latency_feeds = self._latency_feeds()
        self.calibration_feeds = self._calibration_feeds(train_records)
        self.rows: list[Row] = []

    # -- inputs ------------------------------------------------------------------------------

    def _latency_records(self) -> list[Any]:
        chosen, seen = [], set()
        for record in self.val_records:
            if record.image not in seen:
                seen.add(record.image)
                chosen.append(record)
            if len(chosen) == self.settings.latency_samples:
                break
        return chosen

    def _latency_feeds(self, preprocessor: Any = None) -> dict[str, list[dict[str, np.ndarray]]]:
        """Batch-1 feeds of real validation inputs, preprocessed once, shared by every row."""
        preprocessor = preprocessor or self.preprocessor
        records = self._latency_records()
        if self.kind == FUSION:
            return {"pair": [preprocessor([r.text], [r.image]) for r in records]}
        return {
            "text": [preprocessor.texts([r.text]) for r in records],
            "image": [preprocessor.images([r.image]) for r in records],
        }

    def _package_feeds(self, package: Path, row: Row) -> dict[str, list[dict[str, np.ndarray]]]:
        """Return the shared latency feeds, or the same records preprocessed with the package's
        own input spec when it differs (a package served at a smaller image size)."""
        from edgemm.runtime.manifest import read_manifest
        from edgemm.runtime.preprocess import Preprocessor

        manifest = read_manifest(package, verify_checksums=False)
        if manifest.input_spec == self.checkpoint.input_spec:
            return self.latency_feeds
        row.build["image_size"] = manifest.input_spec.image.crop
        return self._latency_feeds(Preprocessor(manifest.input_spec, manifest.vocab_path))

    def _calibration_feeds(self, train_records: list[Any]) -> dict[str, list[dict[str, np.ndarray]]]:
        """Batch-1 feeds of the samples edgemm calibrates on by default (128 random train records, seed 0)."""
        from edgemm.compression.calibration import CalibrationSet

        chosen = CalibrationSet(source="dataset", path=Path(self.settings.dataset), split="train", size=self.settings.calibration_size).select_records(train_records)
        if self.kind == FUSION:
            return {"model": [self.preprocessor([r.text], [r.image]) for r in chosen]}
        return {
            "text_encoder": [self.preprocessor.texts([r.text]) for r in chosen],
            "image_encoder": [self.preprocessor.images([r.image]) for r in chosen],
        }

    # -- rows --------------------------------------------------------------------------------

    def build_rows(self) -> None:
        settings = self.settings
        tool = edgemm_command()
        checkpoint = str(self.checkpoint_dir)

        torch_row = Row("pytorch-fp32", "pytorch", "PyTorch eager FP32, the trained checkpoint")
        torch_row.files = {"model.safetensors": (self.checkpoint_dir / "model.safetensors").stat().st_size}
        if self._add(torch_row):
            torch_row.runner = TorchRunner(self.checkpoint.model, self.latency_feeds)

        fp32 = Row(REFERENCE_ROW, "onnxruntime", "ONNX Runtime FP32 (edgemm export)")
        fp32_out = self.work / "ort-fp32"
        command = [*tool, "export", checkpoint, "--out", str(fp32_out), "--dataset", str(settings.dataset)]
        fp32_package = build_package(fp32, command, fp32_out, self.work / "logs" / "ort-fp32.log", settings.build_timeout, settings.rebuild)
        if fp32_package is None:
            # The same FP32 graphs also come out of `edgemm compress` with pruning and quantization
            # turned off; the row records why `edgemm export` was not used.
            export_failure = fp32.reason
            fp32 = Row(REFERENCE_ROW, "onnxruntime", "ONNX Runtime FP32 (edgemm compress --no-prune --quantize none)")
            fp32.build["export_failure"] = export_failure
            command = [*tool, "compress", checkpoint, "--no-prune", "--quantize", "none", "--dataset", str(settings.dataset), "--out", str(fp32_out)]
            fp32_package = build_package(fp32, command, fp32_out, self.work / "logs" / "ort-fp32-compress.log", settings.build_timeout, settings.rebuild)
        self.rows.append(fp32)
        self._attach_package(fp32, fp32_package)

        for recipe in settings.recipes:
            recipe = Path(recipe)
            row = Row(f"edgemm-{recipe.stem}", "edgemm", f"edgemm compress --recipe {recipe.name}")
            out = self.work / f"edgemm-{recipe.stem}"
            command = [*tool, "compress", checkpoint, "--recipe", str(recipe), "--dataset", str(settings.dataset), "--out", str(out)]
            # Recipes with the same prune, recover and input settings share one recovery.
            command += ["--recovery-cache", str(self.work / "recovered")]
            if not self._add(row):
                continue
            package = build_package(row, command, out, self.work / "logs" / f"edgemm-{recipe.stem}.log", settings.build_timeout, settings.rebuild)
            self._attach_package(row, package)

        for mode in ("dynamic", "static"):
            row = Row(f"ort-{mode}-default", "onnxruntime", f"onnxruntime.quantization.quantize_{mode} with default settings")
            if not self._add(row):
                continue
            if fp32_package is None:
                row.fail("skipped", "the ONNX Runtime FP32 package could not be built")
                continue
            out = self.work / f"ort-{mode}-default"
            row.build["command"] = f"quantize_{mode}(model_input, model_output" + (", CalibrationDataReader)" if mode == "static" else ")")
            began = time.perf_counter()
            try:
                package = out if (out / "manifest.json").is_file() and not settings.rebuild else quantize_with_ort_defaults(fp32_package, out, self.kind, mode, self.calibration_feeds)
            except Exception as error:  # onnxruntime.quantization raises many exception types.
                row.fail("failed", f"quantize_{mode} failed: {type(error).__name__}: {error}")
                continue
            row.build["seconds"] = round(time.perf_counter() - began, 1)
            self._attach_package(row, package)

        for int8 in (False, True):
            name = "openvino-int8-nncf" if int8 else "openvino-fp32"
            description = "OpenVINO INT8 from nncf.quantize with default settings" if int8 else "OpenVINO FP32 (ONNX read by openvino.Core.read_model)"
            row = Row(name, "openvino", description)
            if self._add(row):
                self._prepare_openvino(row, fp32_package, int8)

    def _add(self, row: Row) -> bool:
        """Append `row`; return False, with the row marked skipped, when --skip names it."""
        self.rows.append(row)
        if row.name in self.settings.skip:
            row.fail("skipped", "left out with --skip")
            return False
        return True

    def _attach_package(self, row: Row, package: Path | None) -> None:
        if package is None:
            return
        try:
            row.files = graph_files(package, self.kind)
            row.build["package"] = str(package)
            recipe = json.loads((package / "manifest.json").read_text(encoding="utf-8")).get("compression", {}).get("recipe")
            if recipe:
                row.build["recipe"] = recipe  # The recipe as compress read it, so a row from a file outside the repository can be rebuilt.
            row.runner = OrtRunner(package, self.kind, self._package_feeds(package, row))
        except Exception as error:  # A package that fails to load is recorded on its row.
            row.fail("failed", f"{package} does not load in onnxruntime: {type(error).__name__}: {error}")

    def _prepare_openvino(self, row: Row, fp32_package: Path | None, int8: bool) -> None:
        if self.openvino is None:
            row.fail("skipped", self.openvino_reason or "OpenVINO is unavailable")
            return
        if fp32_package is None:
            row.fail("skipped", "the ONNX Runtime FP32 package, which OpenVINO reads, could not be built")
            return
        from edgemm.runtime.manifest import read_manifest

        manifest = read_manifest(fp32_package, verify_checksums=False)
        graphs = {graph: str(manifest.graph_path(graph)) for graph in KIND_GRAPHS[self.kind]}
        calibration = save_feed_archive(self.work / "calibration.npz", self.calibration_feeds) if int8 else None
        row.build["command"] = "nncf.quantize(core.read_model(onnx), nncf.Dataset(feeds))" if int8 else "core.read_model(onnx)"
        try:
            reply = self.openvino.request(
                "prepare", row=row.name, graphs=graphs, out_dir=str(self.work / row.name), int8=int8, calibration=str(calibration) if calibration else None
            )
        except RuntimeError as error:
            row.fail("failed", f"OpenVINO worker: {error}")
            return
        row.files = reply["files"]
        row.build["seconds"] = round(reply["seconds"], 1)
        row.runner = OpenVinoRunner(self.openvino, row.name)

    # -- accuracy ----------------------------------------------------------------------------

    def measure_accuracy(self) -> None:
        """Measure every row's accuracy on the validation split on all cores, because only latency needs one thread."""
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cores)
        try:
            self._measure_accuracy(cores)
        finally:
            torch.set_num_threads(1)

    def _measure_accuracy(self, cores: int) -> None:
        from edgemm.compression.validate import run_package, run_torch_model, task_metrics

        for row in self.rows:
            if row.runner is None:
                continue
            logger.info("%s %s: accuracy on %d validation samples", self.label, row.name, self.val_set.size)
            try:
                if isinstance(row.runner, TorchRunner):
                    outputs = run_torch_model(self.checkpoint.model, self.preprocessor, self.val_set)
                elif isinstance(row.runner, OrtRunner):
                    outputs = run_package(Path(row.build["package"]), self.val_set, threads=cores)
                else:
                    outputs = self._openvino_outputs(row)
            except Exception as error:  # Record the failure on the row and go on with the others.
                row.fail("failed", f"accuracy run failed: {type(error).__name__}: {error}")
                continue
            row.metrics = task_metrics(self.val_set, outputs, self.threshold)
            if self.kind == DUAL:
                self._set_gallery(row, gallery_of(self.val_set, outputs.image_embeds))

    def _set_gallery(self, row: Row, gallery: np.ndarray) -> None:
        if isinstance(row.runner, OpenVinoRunner):
            path = self.work / f"{row.name}-gallery.npy"
            np.save(path, gallery)
            self.openvino.request("gallery", row=row.name, path=str(path))
        else:
            row.runner.gallery = gallery

    def _openvino_run(self, row: Row, graph: str, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        inputs = save_feed_archive(self.work / f"{row.name}-inputs.npz", {"batches": batches})
        output = self.work / f"{row.name}-outputs.npy"
        self.openvino.request("infer", row=row.name, graph=graph, inputs=str(inputs), output=str(output))
        return np.load(output)

    def _openvino_outputs(self, row: Row) -> Any:
        """Run the validation set through OpenVINO in the batches and padding that `run_package` uses."""
        from edgemm.compression.validate import ModelOutputs

        data, size = self.val_set, ACCURACY_BATCH
        if self.kind == FUSION:
            batches = [self.preprocessor(data.texts[i : i + size], data.images[i : i + size]) for i in range(0, data.size, size)]
            logits = self._openvino_run(row, "model", batches).astype(np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            return ModelOutputs(match_scores=probabilities[:, 1])
        unique = sorted(set(data.images), key=str)
        row_of = {image: index for index, image in enumerate(unique)}
        image_batches = [self.preprocessor.images(unique[i : i + size]) for i in range(0, len(unique), size)]
        text_batches = [self.preprocessor.texts(data.texts[i : i + size]) for i in range(0, data.size, size)]
        image_embeds = self._openvino_run(row, "image_encoder", image_batches)
        text_embeds = self._openvino_run(row, "text_encoder", text_batches)
        return ModelOutputs(text_embeds=text_embeds, image_embeds=image_embeds[[row_of[image] for image in data.images]])

    # -- latency -----------------------------------------------------------------------------

    def measure_latency(self) -> None:
        """Time every row round-robin: each round gives each row `runs_per_round` runs of each task."""
        settings = self.settings
        if self.openvino is not None:
            self.openvino.request("feeds", path=str(save_feed_archive(self.work / "latency.npz", self.latency_feeds)))
        tasks = KIND_TASKS[self.kind]
        for row in self._live_rows():
            for task in tasks:
                self._time(row, task, settings.warmup, 0)  # Warm-up runs are discarded.
                row.samples[task] = []
                row.round_p50_ms[task] = []

        for round_index in range(settings.rounds):
            live = self._live_rows()
            # Rotate the order each round so that no row always runs right after the same neighbour.
            shift = round_index % max(len(live), 1)
            for row in live[shift:] + live[:shift]:
                for task in tasks:
                    samples = self._time(row, task, settings.runs_per_round, round_index * settings.runs_per_round)
                    if samples is None:
                        break
                    row.samples[task].extend(samples)
                    row.round_p50_ms[task].append(round(float(np.median(samples)) * 1000.0, 3))
            logger.info("%s: latency round %d of %d done", self.label, round_index + 1, settings.rounds)

        for row in self._live_rows():
            row.latency = {task: latency_summary(samples) for task, samples in row.samples.items() if samples}

    def _time(self, row: Row, task: str, count: int, start: int) -> list[float] | None:
        try:
            return row.runner.time(task, count, start)
        except Exception as error:  # A row that fails to run is recorded and dropped from later rounds.
            row.fail("failed", f"latency run of {task!r} failed: {type(error).__name__}: {error}")
            return None

    def _live_rows(self) -> list[Row]:
        return [row for row in self.rows if row.runner is not None]

    def close(self) -> None:
        for row in self.rows:
            row.runner = None


# ---------------------------------------------------------------------------------------------
# Ratios, acceptance and reports
# ---------------------------------------------------------------------------------------------


def accuracy_drops(kind: str, original: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    names = ("text_to_image_recall@5",) if kind == DUAL else ("accuracy", "roc_auc")
    return {name: original[name] - metrics[name] for name in names if name in original and name in metrics}


def summarize_model(kind: str, rows: list[Row]) -> dict[str, Any]:
    """Add size and speed ratios against ONNX Runtime FP32 to each row and check the acceptance of the best recipe."""
    by_name = {row.name: row for row in rows}
    reference = by_name.get(REFERENCE_ROW)
    original = by_name.get("pytorch-fp32")
    # The original is the PyTorch checkpoint; its FP32 ONNX export stands in when that row is missing.
    original_metrics = {}
    if original is not None and original.metrics:
        original_metrics = original.metrics
    elif reference is not None:
        original_metrics = reference.metrics
    headline = HEADLINE_TASK[kind]

    summaries = []
    for row in rows:
        summary: dict[str, Any] = {"name": row.name}
        if reference is not None and reference.size_bytes and row.size_bytes:
            summary["size_ratio"] = row.size_bytes / reference.size_bytes
        if reference is not None and reference.latency:
            summary["speedup"] = {}
            summary["speedup_pooled"] = {}
            for task, values in row.latency.items():
                if task not in reference.latency:
                    continue
                # The headline ratio is the median over rounds of the ratio within each round, so
                # that a load change between rounds cancels out. The pooled ratio of the p50s over
                # all rounds is kept beside it.
                per_round = [ref / own for ref, own in zip(reference.round_p50_ms[task], row.round_p50_ms[task]) if own > 0]
                summary["speedup"][task] = float(np.median(per_round)) if per_round else None
                summary["speedup_pooled"][task] = reference.latency[task]["p50_ms"] / values["p50_ms"]
        if row.metrics and original_metrics:
            summary["accuracy_drop"] = accuracy_drops(kind, original_metrics, row.metrics)
        summaries.append(summary)

    acceptance = check_acceptance(kind, rows, summaries, headline)
    return {"headline_task": headline, "original_metrics": original_metrics, "ratios": summaries, "acceptance": acceptance}


def check_acceptance(kind: str, rows: list[Row], summaries: list[dict[str, Any]], headline: str) -> dict[str, Any]:
    """Pick the best edgemm recipe (fastest among those within the accuracy limits) and check every limit."""
    candidates = []
    for row, summary in zip(rows, summaries):
        if row.family != "edgemm" or row.status != "ok" or summary.get("speedup", {}).get(headline) is None:
            continue
        drops = summary.get("accuracy_drop", {})
        checks = {
            "size_at_most_30_percent": summary.get("size_ratio", 1.0) <= MAX_SIZE_FRACTION,
            "speedup_at_least_2_5x": summary["speedup"][headline] >= MIN_SPEEDUP,
        }
        if kind == DUAL:
            checks["recall_at_5_drop_at_most_2_points"] = drops.get("text_to_image_recall@5", float("inf")) <= MAX_RECALL_DROP
        else:
            checks["accuracy_drop_at_most_1_point"] = drops.get("accuracy", float("inf")) <= MAX_ACCURACY_DROP
            checks["roc_auc_drop_at_most_0_01"] = drops.get("roc_auc", float("inf")) <= MAX_AUC_DROP
        accurate = all(value for name, value in checks.items() if "drop" in name)
        candidates.append((accurate, summary["speedup"][headline], row.name, summary, checks))
    if not candidates:
        return {"best": None, "passed": False, "reason": "no edgemm recipe row produced a package with latency and accuracy"}
    accurate, speedup, name, summary, checks = max(candidates, key=lambda item: (item[0], item[1]))
    return {
        "best": name,
        "passed": all(checks.values()),
        "checks": checks,
        "size_ratio": summary.get("size_ratio"),
        "speedup": speedup,
        "accuracy_drop": summary.get("accuracy_drop", {}),
    }


def format_number(value: Any, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_report(result: dict[str, Any]) -> str:
    machine = result["machine"]
    simd = ", ".join(name for name, present in machine.get("simd", {}).items() if present)
    lines = [
        "# edgemm side by side",
        "",
        f"Recorded {result['finished_at']} in {result['seconds'] / 60:.1f} min on {machine.get('cpu_model')} "
        f"({machine.get('cores_usable')} usable cores, {machine['os']['platform']}).",
        "",
        f"- SIMD: {simd}",
        f"- Versions: " + ", ".join(f"{name} {version}" for name, version in result["versions"].items()),
        f"- Command: `{result['command']}`",
        f"- Latency: batch 1, one thread, inference only on preprocessed validation inputs; "
        f"{result['settings']['rounds']} interleaved rounds of {result['settings']['runs_per_round']} runs per row and task "
        f"after {result['settings']['warmup']} warm-up runs. Speed-up: the median over rounds of "
        f"(p50 of {REFERENCE_ROW} / p50 of the row) within each round, all from this run.",
        "- Size: bytes on disk of the files a device loads (ONNX graphs, OpenVINO IR, or PyTorch weights).",
        *[f"- Note: {note}" for note in result["settings"].get("note", [])],
        "",
    ]
    for label, model in result["models"].items():
        kind = model["kind"]
        tasks = KIND_TASKS[kind]
        metric_names = ["accuracy", "roc_auc"] if kind == FUSION else ["text_to_image_recall@1", "text_to_image_recall@5", "image_to_text_recall@5"]
        lines += [f"## {label}: {model['checkpoint']}", "", f"Validation: {model['validation_samples']} samples of split {model['split']}.", ""]
        header = ["row", "size MB", "size / ORT FP32", *metric_names]
        for task in tasks:
            header += [f"{task} p50 ms", f"{task} p90 ms", f"{task} speed-up"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        ratios = {item["name"]: item for item in model["summary"]["ratios"]}
        for row in model["rows"]:
            if row["status"] != "ok":
                continue
            ratio = ratios.get(row["name"], {})
            cells = [row["name"], format_number((row["size_bytes"] or 0) / 1e6, 1), format_number(ratio.get("size_ratio"))]
            cells += [format_number(row["metrics"].get(name), 4 if name == "roc_auc" else 2) for name in metric_names]
            for task in tasks:
                values = row["latency"].get(task, {})
                cells += [format_number(values.get("p50_ms")), format_number(values.get("p90_ms")), format_number(ratio.get("speedup", {}).get(task)) + "x" if ratio.get("speedup", {}).get(task) else ""]
            lines.append("| " + " | ".join(cells) + " |")
        missing = [row for row in model["rows"] if row["status"] != "ok"]
        if missing:
            lines += ["", "Rows that did not run:", ""]
            lines += [f"- {row['name']} ({row['status']}): {row['reason']}" for row in missing]
        acceptance = model["summary"]["acceptance"]
        lines += ["", "Acceptance of the best edgemm recipe:", ""]
        if acceptance.get("best") is None:
            lines.append(f"- not checked: {acceptance.get('reason')}")
        else:
            lines.append(f"- best recipe: {acceptance['best']}, {'PASSED' if acceptance['passed'] else 'FAILED'}")
            lines += [f"- {name}: {'yes' if passed else 'no'}" for name, passed in acceptance["checks"].items()]
            drops = ", ".join(f"{name} {value:+.4f}" for name, value in acceptance["accuracy_drop"].items())
            lines.append(f"- size ratio {format_number(acceptance['size_ratio'])}, speed-up {format_number(acceptance['speedup'])}x, drop {drops}")
        lines.append("")
    return "\n".join(lines)


def versions(openvino_versions: dict[str, Any] | None) -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    found = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    if openvino_versions:
        found.update({name: str(value) for name, value in openvino_versions.items() if name in ("openvino", "nncf")})
    return found


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare PyTorch, ONNX Runtime, edgemm recipes, ORT default quantization and OpenVINO side by side.",
    )
    parser.add_argument("--fusion-checkpoint", type=Path, default=REPO / "runs" / "flickr-concat", help="Checkpoint folder of a fusion classifier (default: runs/flickr-concat).")
    parser.add_argument("--dual-checkpoint", type=Path, default=REPO / "runs" / "flickr-dual", help="Checkpoint folder of a dual encoder (default: runs/flickr-dual).")
    parser.add_argument("--models", default="fusion,dual", help="Comma-separated models to measure: fusion, dual or both (default: fusion,dual).")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="Dataset folder with a train split and the validation split.")
    parser.add_argument("--split", default="dev", help="Validation split of the dataset (default: dev).")
    parser.add_argument("--recipes", nargs="*", type=Path, default=None, help="Recipe TOML files to compress with (default: every export/*.toml). Pass no value for none.")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "sidebyside", help="Folder for packages, logs and worker files; packages found there are reused.")
    parser.add_argument("--rebuild", action="store_true", help="Build every package again instead of reusing the ones in --work-dir.")
    parser.add_argument("--build-timeout", type=float, default=1800.0, help="Seconds one edgemm export or compress may take before its row is marked failed.")
    parser.add_argument("--rounds", type=int, default=15, help="Interleaved latency rounds (default: 15).")
    parser.add_argument("--runs-per-round", type=int, default=5, help="Timed runs per row, task and round (default: 5).")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed runs per row and task before the first round (default: 5).")
    parser.add_argument("--latency-samples", type=int, default=8, help="Validation inputs the timed runs cycle through (default: 8).")
    parser.add_argument("--calibration-size", type=int, default=128, help="Train samples for ORT static and NNCF calibration (default: 128, as edgemm's default calibration set).")
    parser.add_argument("--max-pairs", type=int, default=None, help="Cap on fusion validation pairs (default: all pairs of the split).")
    parser.add_argument("--openvino-python", type=Path, default=None, help="Python of a venv with openvino and nncf; without it the OpenVINO rows are skipped.")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "sidebyside", help="Result path without suffix; .json and .md are written (default: benchmarks/results/sidebyside).")
    parser.add_argument("--note", action="append", default=[], help="A sentence to record in the results, e.g. why rows were skipped; may be repeated.")
    parser.add_argument("--skip", nargs="*", default=[], metavar="ROW", help="Row names to leave out, e.g. openvino-fp32 pytorch-fp32; they are recorded as skipped.")
    parser.add_argument("--openvino-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "runs_per_round", "latency_samples", "calibration_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if REFERENCE_ROW in args.skip:
        parser.error(f"--skip: {REFERENCE_ROW} is the reference of every ratio and cannot be left out")
    if args.recipes is None:
        args.recipes = sorted((REPO / "export").glob("*.toml"))
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = set(args.models) - {"fusion", "dual"}
    if unknown:
        parser.error(f"--models: unknown model(s) {sorted(unknown)}; use fusion, dual or both")
    return args


def pin_one_thread() -> None:
    """Keep every library on one thread; set before torch or onnxruntime start their pools."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # Raised when the inter-op pool has already started.
        logger.warning("torch inter-op threads were already started; leaving them as they are")


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    from edgemm.bench.machine import describe_machine, utc_timestamp

    began = time.perf_counter()
    started_at = utc_timestamp()
    pin_one_thread()
    openvino_versions, openvino_reason = probe_openvino(args.openvino_python)
    client = OpenVinoClient(args.openvino_python) if openvino_versions else None
    if openvino_reason:
        logger.warning("OpenVINO rows skipped: %s", openvino_reason)

    checkpoints = {"fusion": args.fusion_checkpoint, "dual": args.dual_checkpoint}
    models: dict[str, Any] = {}
    try:
        for label in args.models:
            checkpoint = checkpoints[label]
            if not (Path(checkpoint) / "config.json").is_file():
                models[label] = {"checkpoint": str(checkpoint), "skipped": f"no checkpoint at {checkpoint} (train one with `edgemm train`)"}
                continue
            suite = ModelSuite(label, checkpoint, args, client, openvino_reason)
            suite.build_rows()
            suite.measure_accuracy()
            suite.measure_latency()
            rows = [row.to_dict() for row in suite.rows]
            models[label] = {
                "checkpoint": str(checkpoint),
                "kind": suite.kind,
                "split": args.split,
                "validation_samples": suite.val_set.size,
                "decision_threshold": suite.threshold if suite.kind == FUSION else None,
                "rows": rows,
                "summary": summarize_model(suite.kind, suite.rows),
            }
            suite.close()
    finally:
        if client is not None:
            client.close()

    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items() if key != "openvino_worker"}
    settings["recipes"] = [str(path) for path in args.recipes]
    settings["threads"] = 1
    settings["batch_size"] = 1
    return {
        "format": "edgemm-sidebyside",
        "format_version": 1,
        "command": shlex.join([sys.executable, *sys.argv]),
        "started_at": started_at,
        "finished_at": utc_timestamp(),
        "seconds": time.perf_counter() - began,
        "machine": describe_machine(),
        "versions": versions(openvino_versions),
        "openvino": openvino_versions or {"skipped": openvino_reason},
        "settings": settings,
        "models": models,
    }


def write_results(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    from edgemm.io import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out.with_suffix(".json"), out.with_suffix(".md")
    measured = {label: model for label, model in result["models"].items() if "rows" in model}
    skipped = {label: model for label, model in result["models"].items() if "rows" not in model}
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    report = markdown_report({**result, "models": measured})
    if skipped:
        report += "\n" + "\n".join(f"- {label} not measured: {model['skipped']}" for label, model in skipped.items()) + "\n"
    atomic_write_text(markdown_path, report)
    return json_path, markdown_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.openvino_worker:
        # Replies go to a private copy of stdout. Whatever the libraries print (NNCF progress
        # bars, OpenVINO messages) goes to stderr, so it cannot corrupt the protocol.
        replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stdout = sys.stderr
        OpenVinoWorker().serve(sys.stdin, replies)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    result = run_suite(args)
    json_path, markdown_path = write_results(result, args.out)
    print(markdown_path.read_text(encoding="utf-8"))
    print(f"Wrote {json_path} and {markdown_path} in {result['seconds'] / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
