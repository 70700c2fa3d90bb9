"""Write model packages, and export a checkpoint to a checked FP32 model package.

`write_package` only assembles files (graphs, vocabulary, sample inputs, manifest.json); it is
shared by `edgemm export` and `edgemm compress`. `export_checkpoint` is the whole FP32 path:
load the checkpoint, export its graphs (`export_onnx`), measure parity on validation pairs
(`measure_parity`), then write the package with the parity figures in its manifest.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from edgemm.errors import CompressionError, ConfigError, DataError, EdgemmError, PackageError
from edgemm.io import atomic_directory
from edgemm.runtime.manifest import build_manifest, write_manifest
from edgemm.runtime.spec import InputSpec

logger = logging.getLogger(__name__)

GRAPH_FILES = {"model": "model.onnx", "text_encoder": "text_encoder.onnx", "image_encoder": "image_encoder.onnx"}
SAMPLES_DIR = "samples"
# Splits tried, in order, as the validation split of a dataset.
VALIDATION_SPLITS = ("dev", "val", "validation", "test")
# The same seed as `edgemm evaluate`, so parity and evaluation see the same dev pairs.
PAIRS_SEED = 0
DEFAULT_PARITY_PAIRS = 512
PARITY_BATCH_SIZE = 16
NUM_SAMPLES = 3
# Synthetic scenes used for parity when no dataset is given.
SYNTHETIC_SCENES = 24

# Called as stage(name) when a stage of export_checkpoint starts.
StageCallback = Callable[[str], None]


@dataclass(frozen=True)
class Sample:
    """A text-image pair copied into the package as a real input for `edgemm run` and benchmarks."""

    image: Path
    text: str


def write_package(
    out_dir: Path | str,
    *,
    graphs: Mapping[str, Path | str],
    architecture: str,
    input_spec: InputSpec | Mapping[str, Any],
    vocab_path: Path | str,
    labels: Sequence[str],
    opset: int,
    precision: str = "fp32",
    decision_threshold: float | None = None,
    logit_scale: float | None = None,
    compression: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    samples: Sequence[Sample] = (),
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model package to `out_dir` atomically and return `out_dir`.

    `graphs` maps graph names ("model", "text_encoder", "image_encoder") to ONNX files, which
    are copied as `<graph>.onnx`. `vocab_path` is copied as the spec's `vocab_file`. Each of
    `samples` (at most a few) has its image copied to `samples/` and its text listed in the
    manifest. `source` (e.g. the checkpoint folder and its history) is recorded under
    `compression.source`. The manifest lists every file with its SHA-256 and size.

    The folder appears complete or not at all. Raises `EdgemmError` when `out_dir` exists and
    `overwrite` is false, and `PackageError` for a missing input file or an invalid field.
    """
    out_dir = Path(out_dir)
    spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec.from_dict(dict(input_spec))
    kind = "dual_encoder" if architecture == "dual_encoder" else "fusion_classifier"
    unknown = sorted(set(graphs) - set(GRAPH_FILES))
    if unknown:
        raise PackageError(f"Unknown graph names {unknown}.", f"Use some of {list(GRAPH_FILES)}.")
    for path in list(graphs.values()) + [vocab_path] + [sample.image for sample in samples]:
        if not Path(path).is_file():
            raise PackageError(f"Cannot write the package: {path} not found.", "Pass existing graph, vocabulary and sample files.")

    compression = dict(compression or {})
    if source:
        compression["source"] = dict(source)

    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        graph_names = {}
        for graph, path in graphs.items():
            shutil.copyfile(path, staging / GRAPH_FILES[graph])
            graph_names[graph] = GRAPH_FILES[graph]
        shutil.copyfile(vocab_path, staging / spec.text.vocab_file)
        sample_data = _copy_samples(staging, samples)

        manifest = build_manifest(
            staging,
            kind=kind,
            architecture=architecture,
            graphs=graph_names,
            input_spec=spec,
            opset=opset,
            labels=labels,
            precision=precision,
            decision_threshold=decision_threshold,
            logit_scale=logit_scale,
            compression=compression,
            validation=validation,
            samples=sample_data,
        )
        write_manifest(staging, manifest)
    logger.info("Wrote %s model package %s (%s, graphs %s)", architecture, out_dir, precision, sorted(graphs))
    return out_dir


def export_checkpoint(
    checkpoint_dir: Path | str,
    out_dir: Path | str,
    *,
    dataset: Path | str | None = None,
    opset: int = 18,
    overwrite: bool = False,
    parity_pairs: int | None = DEFAULT_PARITY_PAIRS,
    limits: Any = None,
    on_stage: StageCallback | None = None,
) -> Path:
    """Export a checkpoint folder to an FP32 model package in `out_dir` and return `out_dir`.

    Graphs: `model` for fusion classifiers; `model`, `text_encoder` and `image_encoder` for dual
    encoders. Parity is measured on matching pairs of the dataset's validation split, which is
    the first of `VALIDATION_SPLITS` the dataset has. At most `parity_pairs` pairs are used
    (None for all). Without `dataset`, synthetic scenes are used instead, and random inputs are
    always compared as an extra check. `limits` is a `ParityLimits` (default: the FP32 limits).
    The checkpoint folder is only read.

    Raises `CompressionError` when export or parity fails, `EdgemmError` when `out_dir` exists
    and `overwrite` is false, and `CheckpointError` / `DataError` for invalid inputs.
    """
    from edgemm.compression.export_onnx import check_opset, require_onnxscript
    from edgemm.models.checkpoint import load_checkpoint
    from edgemm.runtime.preprocess import Preprocessor

    checkpoint_dir = Path(checkpoint_dir)
    out_dir = Path(out_dir)
    check_opset(opset)
    require_onnxscript()
    if out_dir.exists() and not overwrite:
        raise EdgemmError(f"Output folder {out_dir} already exists.", "Choose another --out or pass --overwrite.")
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ConfigError(f"--out {out_dir} is the checkpoint folder.", "Write the package to another folder.")
    stage = on_stage or (lambda name: None)

    stage("load checkpoint")
    checkpoint = load_checkpoint(checkpoint_dir)
    threshold = checkpoint.extra.get("decision_threshold")

    with tempfile.TemporaryDirectory(prefix="edgemm-export-") as scratch:
        scratch = Path(scratch)
        stage("load validation pairs")
        pairs, pairs_source = _validation_pairs(dataset, scratch, checkpoint.input_spec, parity_pairs)
        batches = PairBatches(Preprocessor(checkpoint.input_spec, checkpoint.vocab_path), pairs)

        results = export_graphs(checkpoint.model, scratch, _example_inputs(batches[0]), opset=opset, on_stage=stage)

        stage("measure parity")
        parity = check_export_parity(
            checkpoint.model,
            results,
            batches,
            inputs=pairs_source,
            labels=checkpoint.labels,
            decision_threshold=threshold,
            limits=limits,
        )

        stage("write package")
        return write_package(
            out_dir,
            graphs={graph: result.path for graph, result in results.items()},
            architecture=checkpoint.model.architecture,
            input_spec=checkpoint.input_spec,
            vocab_path=checkpoint.vocab_path,
            labels=checkpoint.labels,
            opset=opset,
            precision="fp32",
            decision_threshold=None if checkpoint.model.architecture == "dual_encoder" or threshold is None else float(threshold),
            logit_scale=_logit_scale(checkpoint.model),
            compression={"export": {graph: result.to_dict() for graph, result in results.items()}},
            validation={"parity": parity},
            samples=[Sample(image=record.image, text=record.text) for record in _pick_samples(pairs)],
            source={"checkpoint": str(checkpoint_dir.resolve()), "history": checkpoint.history},
            overwrite=overwrite,
        )


def export_graphs(
    model: Any,
    folder: Path,
    example_inputs: Mapping[str, Any],
    *,
    opset: int = 18,
    on_stage: StageCallback | None = None,
) -> dict[str, Any]:
    """Export every graph a package of `model` ships into `folder`; return `ExportResult`s by graph name.

    Fusion models get "model"; dual encoders get "model", "text_encoder" and "image_encoder".
    """
    from edgemm.compression.export_onnx import export_onnx

    graphs = ["model"]
    if model.architecture == "dual_encoder":
        graphs += ["text_encoder", "image_encoder"]
    results = {}
    for graph in graphs:
        if on_stage is not None:
            on_stage(f"export {graph}")
        path = Path(folder) / GRAPH_FILES[graph]
        results[graph] = export_onnx(model, path, graph=graph, example_inputs=example_inputs, opset=opset)
    return results


def check_export_parity(
    model: Any,
    results: Mapping[str, Any],
    batches: Sequence[Mapping[str, Any]],
    *,
    inputs: str,
    labels: Sequence[str],
    decision_threshold: float | None = None,
    limits: Any = None,
) -> dict[str, Any]:
    """Measure parity of the graphs the runtime uses on `batches` and on random inputs.

    Returns the figures for the manifest's `validation.parity`, with the random-input figures
    under "random". Raises `CompressionError` listing every limit that is not met.
    """
    from edgemm.compression.parity import ParityLimits, measure_parity, random_batches

    limits = limits or ParityLimits()
    if "text_encoder" in results:
        runtime_graphs = {graph: results[graph].path for graph in ("text_encoder", "image_encoder")}
    else:
        runtime_graphs = {"model": results["model"].path}
    options = {"limits": limits, "labels": list(labels), "decision_threshold": decision_threshold}

    parity = measure_parity(model, runtime_graphs, batches, inputs=inputs, **options)
    random_parity = measure_parity(model, runtime_graphs, random_batches(dict(batches[0])), inputs="random tensors", **options)

    failures = [f"{parity.inputs}: {text}" for text in parity.failures]
    failures += [f"random tensors: {text}" for text in random_parity.failures]
    if failures:
        raise CompressionError(
            f"The ONNX export does not match PyTorch: {'; '.join(failures)}.",
            "Export with another --opset, or report the model: in this project's measurements, FP32 "
            "exports of edgemm models differ from PyTorch by less than 1e-4.",
        )
    figures = parity.to_dict()
    figures["random"] = random_parity.to_dict()
    return figures


def _logit_scale(model: Any) -> float | None:
    """Return exp(logit_scale) of a dual encoder, capped as in training, or None for other models."""
    from edgemm.training.modeling import MAX_LOGIT_SCALE

    if model.architecture != "dual_encoder":
        return None
    return float(model.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))


def _validation_pairs(dataset, scratch: Path, spec: InputSpec, limit: int | None) -> tuple[list, str]:
    from edgemm.data.matching import make_matching_pairs
    from edgemm.data.records import load_dataset

    if dataset is None:
        from edgemm.data.synthetic import generate_scenes

        size = max(32, spec.image.resize)
        records = generate_scenes(scratch / "scenes", SYNTHETIC_SCENES, seed=0, image_size=size, splits=(("dev", 1.0),))
        source = f"synthetic scenes (seed 0, {SYNTHETIC_SCENES} images)"
    else:
        all_records = load_dataset(dataset)
        splits = {record.split for record in all_records}
        split = next((name for name in VALIDATION_SPLITS if name in splits), None)
        if split is None:
            raise DataError(
                f"Dataset {dataset} has no validation split (splits found: {sorted(str(s) for s in splits)}).",
                f"Mark validation records with one of the splits {list(VALIDATION_SPLITS)}.",
            )
        records = [record for record in all_records if record.split == split]
        source = f"{dataset} split {split!r}"

    if any(record.label == 0 for record in records):
        pairs = list(records)
    else:
        pairs = make_matching_pairs(records, seed=PAIRS_SEED)
        source += f", 1:1 matching pairs (seed {PAIRS_SEED})"
    if limit is not None and len(pairs) > limit:
        pairs = pairs[:limit]
    logger.info("Parity inputs: %d pairs from %s", len(pairs), source)
    return pairs, source


class PairBatches:
    """Preprocessed batches of text-image pairs, built on each iteration to bound memory.

    1000 pairs of 224x224 images take about 600 MB as float32, so batches are not kept.
    """

    def __init__(self, preprocessor: Any, pairs: Sequence, batch_size: int = PARITY_BATCH_SIZE):
        if not pairs:
            raise DataError("The validation split has no pairs.", "Add validation records to the dataset.")
        self.preprocessor = preprocessor
        self.pairs = list(pairs)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self.pairs), self.batch_size):
            yield self.batch(start)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index * self.batch_size < len(self.pairs):
            raise IndexError(index)
        return self.batch(index * self.batch_size)

    def batch(self, start: int) -> dict:
        chunk = self.pairs[start : start + self.batch_size]
        return self.preprocessor([record.text for record in chunk], [record.image for record in chunk])


def _example_inputs(batch: Mapping[str, Any]) -> dict:
    import torch

    return {name: torch.from_numpy(array[:2].copy()) for name, array in batch.items()}


def _pick_samples(pairs: Sequence) -> list:
    """Pick the first few pairs with distinct images, true ones (label 1 or None) first."""
    ordered = [record for record in pairs if record.label != 0] + [record for record in pairs if record.label == 0]
    picked, seen = [], set()
    for record in ordered:
        if record.image in seen:
            continue
        seen.add(record.image)
        picked.append(record)
        if len(picked) == NUM_SAMPLES:
            break
    return picked


def _copy_samples(staging: Path, samples: Sequence[Sample]) -> dict[str, list[str]]:
    if not samples:
        return {}
    (staging / SAMPLES_DIR).mkdir()
    images = []
    for index, sample in enumerate(samples):
        relative = f"{SAMPLES_DIR}/{index}{Path(sample.image).suffix.lower()}"
        shutil.copyfile(sample.image, staging / relative)
        images.append(relative)
    return {"texts": [sample.text for sample in samples], "images": images}
