"""`edgemm compress`: prune, recover, export, quantize, validate and package in one run.

Every intermediate file lives in a scratch folder. The package folder appears only after
validation has passed, so a run that fails (bad input, accuracy drop over the limit, a stage
error) leaves no partial package behind. The input checkpoint is only read.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemm.compression.recipe import Recipe
from edgemm.compression.validate import Limits
from edgemm.data.records import Record
from edgemm.errors import ConfigError, DataError, EdgemmError

logger = logging.getLogger(__name__)

VALIDATION_SPLITS = ("dev", "val", "validation", "test")
GRAPHS_BY_ARCHITECTURE = {
    "concat_fusion": ("model",),
    "cross_attention": ("model",),
    "dual_encoder": ("model", "text_encoder", "image_encoder"),
}
# Graphs that the runtime runs, and so the ones whose latency counts.
RUNTIME_GRAPHS = {
    "concat_fusion": ("model",),
    "cross_attention": ("model",),
    "dual_encoder": ("text_encoder", "image_encoder"),
}

StageCallback = Callable[[str], None]


@dataclass
class CompressSettings:
    checkpoint: Path
    out: Path
    recipe: Recipe
    dataset: Path | None = None
    calibration: Path | None = None
    overwrite: bool = False
    keep_work: Path | None = None
    # Folder of pruned and recovered models, one per set of inputs that makes them (see
    # `recovery_key`), and of the original's FP32 export. A matching entry is loaded, not rebuilt.
    recovery_cache: Path | None = None
    latency_threads: int = 1
    latency_runs: int = 30
    max_validation_pairs: int | None = None


@dataclass
class CompressResult:
    package: Path
    manifest: dict[str, Any]
    summary: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def compress(settings: CompressSettings, on_stage: StageCallback | None = None) -> CompressResult:
    """Run the whole pipeline on a checkpoint folder and return the validated package.

    Raises `ConfigError`/`DataError`/`CheckpointError` for invalid inputs, `CompressionError`
    when a stage fails and `AccuracyError` when the package loses more accuracy than the
    recipe's `[validate]` limits allow.
    """
    stage = on_stage or (lambda name: None)
    started = time.perf_counter()
    out = Path(settings.out)
    if out.exists() and not settings.overwrite:
        raise EdgemmError(f"Output folder {out} already exists.", "Choose another --out or pass --overwrite.")
    if out.resolve() == Path(settings.checkpoint).resolve():
        raise ConfigError(f"--out {out} is the checkpoint folder.", "Write the package to another folder.")
    from edgemm.compression.export_onnx import check_opset

    check_opset(int(settings.recipe.get("export", "opset", 18)))

    if settings.keep_work is not None:
        Path(settings.keep_work).mkdir(parents=True, exist_ok=True)
        return _compress_in(Path(settings.keep_work), settings, stage, started)
    with tempfile.TemporaryDirectory(prefix="edgemm-compress-") as scratch:
        return _compress_in(Path(scratch), settings, stage, started)


def _compress_in(work: Path, settings: CompressSettings, stage: StageCallback, started: float) -> CompressResult:
    from edgemm.compression import validate as validation
    from edgemm.compression.profile import profile_model
    from edgemm.models.checkpoint import load_checkpoint
    from edgemm.runtime.preprocess import Preprocessor

    recipe = settings.recipe
    stage("load checkpoint")
    checkpoint = load_checkpoint(settings.checkpoint)
    teacher = checkpoint.model.eval()
    architecture = teacher.architecture
    kind = "dual_encoder" if architecture == "dual_encoder" else "fusion_classifier"
    threshold = float(checkpoint.extra.get("decision_threshold", 0.5))
    preprocessor = Preprocessor(checkpoint.input_spec, checkpoint.vocab_path)
    student_spec = student_input_spec(checkpoint.input_spec, recipe)
    student_preprocessor = preprocessor if student_spec == checkpoint.input_spec else Preprocessor(student_spec, checkpoint.vocab_path)

    stage("load data")
    dataset = _resolve_dataset(settings.dataset, checkpoint.extra)
    train_records, val_records, val_split = _split_records(dataset, recipe.get("validate", "split"))
    val_set = validation.build_validation_set(
        val_records, kind, max_pairs=settings.max_validation_pairs or recipe.get("validate", "max_pairs")
    )
    example_inputs = _example_inputs(preprocessor, val_records)
    student_inputs = _example_inputs(student_preprocessor, val_records)
    logger.info("Validation: %d samples from split %r of %s", val_set.size, val_split, dataset)

    checkpoint_hash = _checkpoint_hash(Path(settings.checkpoint)) if settings.recovery_cache is not None else None
    original = None
    if checkpoint_hash is not None:
        original = Path(settings.recovery_cache) / original_key(checkpoint_hash, recipe, checkpoint.input_spec, val_set)
    if original is not None and (original / "reference.npz").is_file():
        stage(f"load the original model's outputs and FP32 export from {original}")
        reference = _load_outputs(original / "reference.npz")
        baseline_graphs = {graph: original / name for graph, name in _graph_files(architecture).items()}
    else:
        stage("measure the original model")
        reference = validation.run_torch_model(teacher, preprocessor, val_set)
        stage("export the original model (FP32 baseline)")
        baseline_graphs = _export_graphs(teacher, work / "baseline", example_inputs, recipe)
        if original is not None:
            _store_original(original, baseline_graphs, reference)
    profile_before = profile_model(teacher, example_inputs)

    student = teacher
    records: dict[str, Any] = {"recipe": recipe.to_dict()}
    if student_spec != checkpoint.input_spec:
        records["input"] = _input_record(checkpoint.input_spec, student_spec)
    recovered = None
    if checkpoint_hash is not None and recipe.get("prune", "enabled", True) and _has_prune_ratio(recipe):
        recovered = Path(settings.recovery_cache) / recovery_key(checkpoint_hash, recipe, train_records)
    cached = _load_recovered(recovered)
    if cached is not None:
        stage(f"load the recovered model from {cached.folder}")
        student = cached.model.eval()
        for key in ("prune", "recover"):
            records[key] = cached.extra["compression"][key]
        records["recover"]["reused_from"] = str(cached.folder)
    elif recipe.get("prune", "enabled", True) and _has_prune_ratio(recipe):
        student, records["prune"], records["recover"] = _prune_and_recover(
            teacher, recipe, student_inputs, train_records, student_preprocessor, stage, preprocessor
        )
    elif student_spec != checkpoint.input_spec and recipe.get("recover", "enabled", True):
        records["prune"] = {"enabled": False}
        student, records["recover"] = _recover_only(teacher, recipe, train_records, student_preprocessor, stage, preprocessor)
    else:
        records["prune"] = {"enabled": False}
        records["recover"] = {"enabled": False}

    profile_after = profile_model(student, student_inputs)
    records["size"] = _profile_record(profile_before, profile_after)
    if settings.keep_work is not None and student is not teacher:
        _save_student(student, checkpoint, student_spec, Path(settings.keep_work) / "pruned-checkpoint", records)
    if recovered is not None and cached is None:
        _save_student(student, checkpoint, student_spec, recovered, records)

    stage("export the compressed model")
    student_graphs = _export_graphs(student, work / "student", student_inputs, recipe)

    limits = Limits(
        max_accuracy_drop=float(recipe.get("validate", "max_accuracy_drop", 1.0)),
        max_auc_drop=float(recipe.get("validate", "max_auc_drop", 0.01)),
        max_recall_drop=float(recipe.get("validate", "max_recall_drop", 2.0)),
    )
    package_args = dict(
        architecture=architecture,
        input_spec=student_spec,
        vocab_path=checkpoint.vocab_path,
        labels=list(checkpoint.labels),
        opset=int(recipe.get("export", "opset", 18)),
        precision="fp32",
        decision_threshold=None if kind == "dual_encoder" else threshold,
        logit_scale=_logit_scale(student),
        samples=_samples(val_records),
        source={"checkpoint": str(Path(settings.checkpoint).resolve()), "history": checkpoint.history},
    )

    stage("quantize")
    calibration_set = _calibration_set(settings, recipe, dataset)
    fallback = None
    if recipe.get("quantize", "accuracy_fallback", False):
        fallback = _FallbackCheck(work / "fallback", student_graphs, package_args, val_set, reference, threshold, limits)
    final_graphs, records["quantization"] = _quantize_graphs(
        student_graphs, work / "quantized", recipe, calibration_set, student_spec, checkpoint.vocab_path, fallback
    )
    if calibration_set is not None and recipe.get("quantize", "mode") == "int8-static":
        records["calibration"] = calibration_set.to_dict()
    records["export"] = {"opset": int(recipe.get("export", "opset", 18)), "exporter": recipe.get("export", "exporter", "dynamo")}

    stage("validate")
    package_args["precision"] = _precision(records["quantization"])
    candidate = _write_package(work / "candidate", final_graphs, package_args, records, None)
    candidate_outputs = validation.run_package(candidate, val_set)
    report = validation.compare(val_set, reference, candidate_outputs, threshold, limits)
    logger.info("Validation before %s after %s", report.before, report.after)
    validation.raise_if_failed(report)

    stage("measure latency")
    latency = _latency_record(
        baseline_graphs, final_graphs, architecture, (preprocessor, student_preprocessor), val_records, settings
    )

    stage("write package")
    validation_record = {
        "split": val_split,
        "dataset": str(dataset),
        "decision_threshold": package_args["decision_threshold"],
        **report.to_dict(),
        "latency": latency,
    }
    package = _write_package(settings.out, final_graphs, package_args, records, validation_record, overwrite=settings.overwrite)

    manifest = json.loads((package / "manifest.json").read_text(encoding="utf-8"))
    summary = _summary_rows(records["size"], baseline_graphs, final_graphs, report, latency, architecture)
    return CompressResult(
        package=package,
        manifest=manifest,
        summary=summary,
        validation=validation_record,
        seconds=time.perf_counter() - started,
    )


def _checkpoint_hash(folder: Path) -> str:
    """Return the SHA-256 of a checkpoint's config and weights, the base of every cache key."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(folder / name, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cache_key(prefix: str, *parts: Any) -> str:
    import hashlib

    from edgemm import __version__

    text = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return prefix + hashlib.sha256(text.encode()).hexdigest()[:16]


def original_key(checkpoint_hash: str, recipe: Recipe, input_spec, val_set) -> str:
    """Return the cache folder name of the original model's FP32 export and validation outputs.

    The key covers the checkpoint, the [export] section, the input spec, the validation set and
    the edgemm version, so a change to any of them exports and measures again.
    """
    import dataclasses

    data = [val_set.kind, [str(image) for image in val_set.images], val_set.texts, val_set.labels, val_set.text_to_image]
    return _cache_key("original-", checkpoint_hash, recipe.section("export"), dataclasses.asdict(input_spec), data)


def recovery_key(checkpoint_hash: str, recipe: Recipe, train_records: list[Record]) -> str:
    """Return the cache folder name of a pruned and recovered model.

    The key covers the checkpoint, the training records, the recipe's [input], [prune] and
    [recover] sections and the edgemm version. Quantization, export and validation settings are
    left out, because changing them needs no new recovery.
    """
    sections = {name: recipe.section(name) for name in ("input", "prune", "recover")}
    inputs = [[str(record.image), record.text, record.label] for record in train_records]
    return _cache_key("", checkpoint_hash, sections, inputs)


def _graph_files(architecture: str) -> dict[str, str]:
    from edgemm.compression.package import GRAPH_FILES

    return {graph: GRAPH_FILES[graph] for graph in GRAPHS_BY_ARCHITECTURE[architecture]}


def _store_original(folder: Path, graphs: dict[str, Path], reference) -> None:
    """Write the FP32 graphs and the reference outputs into `folder`, which appears complete or not at all."""
    import shutil

    from edgemm.io import atomic_directory

    with atomic_directory(folder, overwrite=True) as scratch:
        for path in graphs.values():
            shutil.copy2(path, scratch / Path(path).name)
        arrays = {name: value for name, value in vars(reference).items() if value is not None}
        np.savez(scratch / "reference.npz", **arrays)


def _load_outputs(path: Path):
    from edgemm.compression.validate import ModelOutputs

    with np.load(path, allow_pickle=False) as arrays:
        return ModelOutputs(**{name: arrays[name] for name in arrays.files})


def _load_recovered(folder: Path | None):
    """Load the pruned and recovered model stored in `folder`, or return None when there is none."""
    from edgemm.models.checkpoint import load_checkpoint

    if folder is None or not (folder / "config.json").is_file():
        return None
    logger.info("Reusing the pruned and recovered model in %s", folder)
    cached = load_checkpoint(folder)
    cached.folder = folder
    return cached


def _save_student(student, checkpoint, input_spec, folder: Path, records: dict[str, Any]) -> None:
    """Save the pruned and recovered model as an edgemm checkpoint (for --keep-work)."""
    from edgemm.models.checkpoint import save_checkpoint

    save_checkpoint(
        student,
        folder,
        labels=list(checkpoint.labels),
        input_spec=input_spec,
        vocab_path=checkpoint.vocab_path,
        history=checkpoint.history,
        extra={**checkpoint.extra, "compression": {key: records[key] for key in ("input", "prune", "recover") if key in records}},
        overwrite=True,
    )
    logger.info("Saved the pruned model as a checkpoint in %s", folder)


def _resolve_dataset(dataset: Path | None, extra: dict[str, Any]) -> Path:
    if dataset is not None:
        return Path(dataset)
    recorded = extra.get("dataset") or extra.get("training", {}).get("dataset")
    if recorded and Path(recorded).exists():
        logger.info("Using the dataset the checkpoint was trained on: %s", recorded)
        return Path(recorded)
    raise DataError(
        "No dataset for recovery, calibration and validation.",
        "Pass --dataset DIR (a dataset folder or a captions folder with train and dev splits).",
    )


def _split_records(dataset: Path, split: str | None) -> tuple[list[Record], list[Record], str]:
    from edgemm.data.records import load_dataset

    records = load_dataset(dataset)
    splits = {record.split for record in records}
    if split is None:
        split = next((name for name in VALIDATION_SPLITS if name in splits), None)
    if split is None or split not in splits:
        raise DataError(
            f"Dataset {dataset} has no validation split {split!r} (splits found: {sorted(str(s) for s in splits)}).",
            "Set [validate] split in the recipe or mark validation records with split 'dev'.",
        )
    val = [record for record in records if record.split == split and record.label != 0]
    train = [record for record in records if record.split not in (split, "test") and record.label != 0]
    if not train:
        raise DataError(
            f"Dataset {dataset} has no training records besides the {split!r} split.",
            "Recovery and calibration need a 'train' split.",
        )
    return train, val, split


def _example_inputs(preprocessor: Any, records: list[Record]) -> dict[str, Any]:
    import torch

    chosen = records[:2] if len(records) >= 2 else records * 2
    feed = preprocessor([r.text for r in chosen], [r.image for r in chosen])
    return {name: torch.from_numpy(array) for name, array in feed.items()}


def _has_prune_ratio(recipe: Recipe) -> bool:
    return any(recipe.get("prune", key) is not None for key in ("ratio", "text_ratio", "image_ratio", "head_ratio"))


def student_input_spec(spec: Any, recipe: Recipe) -> Any:
    """Return the input spec the compressed model is served with: `spec`, or a smaller image size.

    `input.image_size` is the largest crop edge to serve, so one recipe fits models trained at
    different sizes: a model trained at that size or smaller keeps its own. The resize edge keeps
    the original resize/crop ratio (256/224 for an ImageNet-style spec), so the crop covers the
    same part of each photo.
    """
    import dataclasses

    size = recipe.get("input", "image_size")
    if size is None or int(size) >= spec.image.crop:
        if size is not None and int(size) > spec.image.crop:
            logger.info("input.image_size=%s: the model was trained at %d pixels and keeps that size", size, spec.image.crop)
        return spec
    size = int(size)
    resize = max(size, round(size * spec.image.resize / spec.image.crop))
    return dataclasses.replace(spec, image=dataclasses.replace(spec.image, crop=size, resize=resize))


def _input_record(before: Any, after: Any) -> dict[str, Any]:
    return {
        "image_size_before": before.image.crop,
        "image_size_after": after.image.crop,
        "resize_before": before.image.resize,
        "resize_after": after.image.resize,
    }


def _frozen_parts(prune_config: Any) -> tuple[str, ...]:
    """Towers with no prune ratio keep their weights, so recovery leaves them frozen."""
    return tuple(
        part for part, key in (("text_tower", "text_ratio"), ("image_tower", "image_ratio"))
        if prune_config is None or (prune_config.ratio is None and getattr(prune_config, key) is None)
    )


def _recover_only(teacher, recipe, train_records, preprocessor, stage, teacher_preprocessor):
    """Distil an unpruned copy served at a smaller image size. Both towers stay frozen."""
    import copy

    from edgemm.compression import recover as recovery

    section = recipe.section("recover")
    section.pop("enabled", None)
    section["frozen_parts"] = _frozen_parts(None)
    config = recovery.RecoverConfig.from_recipe(section)
    stage("recover")
    student = copy.deepcopy(teacher)
    result = recovery.recover(student, teacher, train_records, preprocessor, config, teacher_preprocessor=teacher_preprocessor)
    steps = [result.to_dict()] if result is not None else []
    return student.eval(), {"enabled": True, "config": config.to_dict(), "steps": steps}


def _prune_and_recover(teacher, recipe, example_inputs, train_records, preprocessor, stage, teacher_preprocessor=None):
    """Prune (in `prune.iterative_steps` steps) and distil from the unpruned teacher after each step.

    `preprocessor` prepares the student's inputs; `teacher_preprocessor` the teacher's, when the
    student is served at a smaller image size.
    """
    from edgemm.compression import recover as recovery
    from edgemm.compression.prune import PruneConfig, prune_model

    prune_section = recipe.section("prune")
    prune_section.pop("enabled", None)
    batches = prune_section.pop("calibration_batches", None)
    if batches:
        prune_section["taylor_batches"] = batches
    if prune_section.pop("keep_residual", False):
        from edgemm.compression.prune import residual_layers

        prune_section["ignored_layers"] = residual_layers(teacher)
    prune_config = PruneConfig.from_dict(prune_section)

    calibration_batches = None
    if prune_config.importance == "taylor":
        calibration_batches = recovery.calibration_batches(teacher, train_records, preprocessor, prune_config.taylor_batches)

    if not recipe.get("recover", "enabled", True):
        stage("prune")
        result = prune_model(teacher, prune_config, example_inputs, calibration_batches)
        return result.model.eval(), {"enabled": True, **result.to_dict()}, {"enabled": False}

    recover_section = recipe.section("recover")
    recover_section["frozen_parts"] = _frozen_parts(prune_config)
    recover_config = recovery.RecoverConfig.from_recipe(recover_section)
    stage(f"prune and recover ({prune_config.iterative_steps} step(s))")
    result = recovery.prune_and_recover(
        teacher, prune_config, recover_config, example_inputs, train_records, preprocessor, calibration_batches,
        teacher_preprocessor=teacher_preprocessor,
    )
    recover_record = {"enabled": True, "config": recover_config.to_dict()}
    recover_record["steps"] = [step.to_dict() for step in result.recoveries]
    return result.model.eval(), {"enabled": True, **result.prune.to_dict()}, recover_record


def _export_graphs(model, folder: Path, example_inputs, recipe: Recipe) -> dict[str, Path]:
    from edgemm.compression.export_onnx import export_onnx
    from edgemm.compression.package import GRAPH_FILES

    folder.mkdir(parents=True, exist_ok=True)
    opset = int(recipe.get("export", "opset", 18))
    exporter = recipe.get("export", "exporter", "dynamo")
    graphs = {}
    for graph in GRAPHS_BY_ARCHITECTURE[model.architecture]:
        result = export_onnx(
            model, folder / GRAPH_FILES[graph], graph=graph, example_inputs=example_inputs, opset=opset, exporter=exporter
        )
        graphs[graph] = result.path
    return graphs


def _calibration_set(settings: CompressSettings, recipe: Recipe, dataset: Path):
    from edgemm.compression.calibration import CalibrationSet

    modes = {recipe.get("quantize", "mode"), recipe.get("quantize", "text_mode"), recipe.get("quantize", "image_mode")}
    if "int8-static" not in modes:
        return None
    definition = settings.calibration or recipe.get("calibration", "definition")
    if definition is not None:
        path = Path(definition)
        if not path.is_absolute() and recipe.source is not None and not path.exists():
            path = recipe.source.parent.parent / path
        return CalibrationSet.from_toml(path)
    return CalibrationSet(source="dataset", path=dataset, split="train", size=128, selection="random", seed=0)


class _FallbackCheck:
    """Scorer of quantized candidates for `quantize.accuracy_fallback`.

    `evaluate(graph, candidate)` puts the candidate in place of one graph and measures the task
    metric through the runtime on the validation split: accuracy for fusion classifiers,
    text-to-image recall@5 for dual encoders. `baseline` is the original model's value. The other graphs of a dual encoder stay FP32
    while one graph is tried. Graphs the runtime does not run (a dual encoder's model.onnx)
    get no fallback.
    """

    def __init__(self, folder: Path, float_graphs, package_args, val_set, reference, threshold: float, limits: Limits):
        from edgemm.compression import validate as validation

        self.folder = folder
        self.float_graphs = dict(float_graphs)
        self.package_args = package_args
        self.val_set = val_set
        self.threshold = threshold
        dual = package_args["architecture"] == "dual_encoder"
        self.metric = "text_to_image_recall@5" if dual else "accuracy"
        self.max_drop = limits.max_recall_drop if dual else limits.max_accuracy_drop
        self.baseline = validation.task_metrics(val_set, reference, threshold)[self.metric]
        self.graphs = RUNTIME_GRAPHS[package_args["architecture"]]
        self._count = 0

    def evaluate(self, graph: str, candidate: Path) -> float:
        from edgemm.compression import validate as validation

        self._count += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        folder = self.folder / f"candidate-{self._count}"
        package = _write_package(folder, {**self.float_graphs, graph: Path(candidate)}, self.package_args, {}, None)
        outputs = validation.run_package(package, self.val_set)
        return validation.task_metrics(self.val_set, outputs, self.threshold)[self.metric]


def _quantize_graphs(graphs, folder: Path, recipe: Recipe, calibration_set, input_spec, vocab_path, fallback=None):
    """Quantize every graph and return the quantized paths with the manifest's record.

    With `fallback` (a _FallbackCheck), nodes that cost accuracy are kept in float until the
    metric of each graph the runtime runs is within the limit.
    """
    from edgemm.compression.calibration import EdgemmCalibrationReader, graph_input_names
    from edgemm.compression.quantize import QuantizeConfig, quantize_model
    from edgemm.compression.sensitivity import quantize_with_fallback

    section = recipe.section("quantize")
    section.pop("accuracy_fallback", None)
    config = QuantizeConfig.from_recipe(section) if section else QuantizeConfig(mode="none")
    folder.mkdir(parents=True, exist_ok=True)
    if config.mode == "none" and not (config.text_mode or config.image_mode):
        return dict(graphs), {"mode": "none"}

    quantized, results = {}, {}
    for graph, path in graphs.items():
        reader = None
        if calibration_set is not None:
            reader = EdgemmCalibrationReader.from_spec(
                calibration_set, graph_input_names(path), input_spec, vocab_path
            )
        target = folder / path.name
        if fallback is not None and graph in fallback.graphs:
            result = quantize_with_fallback(
                path, target, config, reader, lambda candidate, graph=graph: fallback.evaluate(graph, candidate),
                max_drop=fallback.max_drop, baseline=fallback.baseline,
            )
            result.fallback["metric"] = fallback.metric
        else:
            result = quantize_model(path, target, config, reader)
        results[graph] = result.to_dict()
        quantized[graph] = target
    first = next(iter(results.values()))
    keys = ("mode", "precision", "towers", "per_channel", "activation_type", "op_types", "nodes_excluded", "calibration", "reduce_range", "weight_only")
    record = {key: first[key] for key in keys}
    if fallback is not None:
        kept_float = sorted(
            {node for result in results.values() for node in (result.get("fallback") or {}).get("nodes_kept_float", [])}
        )
        record["accuracy_fallback"] = {
            "metric": fallback.metric,
            "baseline": fallback.baseline,
            "max_drop": fallback.max_drop,
            "nodes_kept_float": kept_float,
        }
        logger.info("Accuracy fallback: %d nodes kept in float: %s", len(kept_float), ", ".join(kept_float) or "none needed")
    record["graphs"] = results
    return quantized, record


def _precision(quantization: dict[str, Any]) -> str:
    return str(quantization.get("precision", "fp32")) if quantization.get("mode") != "none" else "fp32"


def _logit_scale(model) -> float | None:
    if getattr(model, "architecture", None) != "dual_encoder":
        return None
    return float(model.logit_scale.detach().exp().clamp(max=100.0))


def _samples(records: list[Record]):
    from edgemm.compression.package import Sample

    picked, seen = [], set()
    for record in records:
        if record.image in seen:
            continue
        seen.add(record.image)
        picked.append(Sample(image=record.image, text=record.text))
        if len(picked) == 3:
            break
    return picked


def _write_package(out: Path, graphs, package_args, records, validation_record, overwrite: bool = False) -> Path:
    from edgemm.compression.package import write_package

    return write_package(
        out,
        graphs=graphs,
        compression=records,
        validation=validation_record,
        overwrite=overwrite,
        **package_args,
    )


def _profile_record(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    record = {}
    for part in before:
        b, a = before[part], after.get(part)
        if a is None:
            continue
        record[part] = {
            "params_before": int(b.params),
            "params_after": int(a.params),
            "macs_before": int(b.macs),
            "macs_after": int(a.macs),
        }
    return record


def _graph_feeds(path: Path, preprocessor, records: list[Record]) -> dict[str, np.ndarray]:
    from edgemm.compression.calibration import graph_input_names

    record = records[0]
    feed = preprocessor([record.text], [record.image])
    return {name: feed[name] for name in graph_input_names(path)}


def _latency_record(baseline_graphs, final_graphs, architecture, preprocessors, records, settings) -> dict[str, Any]:
    """p50 latency (ms) of one inference at batch 1 for the FP32 original and the package, graph by graph.

    `preprocessors` contains the original's and the package's preprocessing, which differ when the
    package is served at a smaller image size.
    """
    original, compressed = preprocessors
    from edgemm.compression.quantize import measure_latency

    result: dict[str, Any] = {"threads": settings.latency_threads, "batch_size": 1, "runs": settings.latency_runs, "graphs": {}}
    total_before = total_after = 0.0
    for graph in RUNTIME_GRAPHS[architecture]:
        feeds = _graph_feeds(baseline_graphs[graph], original, records)
        before = measure_latency(baseline_graphs[graph], feeds, threads=settings.latency_threads, runs=settings.latency_runs)
        feeds = _graph_feeds(final_graphs[graph], compressed, records)
        after = measure_latency(final_graphs[graph], feeds, threads=settings.latency_threads, runs=settings.latency_runs)
        result["graphs"][graph] = {"p50_ms_before": before, "p50_ms_after": after}
        total_before += before
        total_after += after
    result["p50_ms_before"] = total_before
    result["p50_ms_after"] = total_after
    result["speedup"] = total_before / total_after if total_after > 0 else None
    result["note"] = "inference only, measured during compress; use edgemm bench for full reports"
    return result


def _summary_rows(size, baseline_graphs, final_graphs, report, latency, architecture) -> list[dict[str, Any]]:
    total = size.get("total", {})
    runtime_graphs = RUNTIME_GRAPHS[architecture]
    size_before = sum(Path(path).stat().st_size for graph, path in baseline_graphs.items() if graph in runtime_graphs)
    size_after = sum(Path(path).stat().st_size for graph, path in final_graphs.items() if graph in runtime_graphs)
    rows = [
        {"metric": "ONNX size (MB)", "before": size_before / 1e6, "after": size_after / 1e6},
        {"metric": "parameters (M)", "before": total.get("params_before", 0) / 1e6, "after": total.get("params_after", 0) / 1e6},
        {"metric": "MACs (G)", "before": total.get("macs_before", 0) / 1e9, "after": total.get("macs_after", 0) / 1e9},
    ]
    for name in report.before:
        rows.append({"metric": name, "before": report.before[name], "after": report.after[name]})
    rows.append({"metric": "p50 latency, batch 1, 1 thread (ms)", "before": latency["p50_ms_before"], "after": latency["p50_ms_after"]})
    return rows
