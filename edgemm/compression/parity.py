"""Compare an exported ONNX model with the PyTorch model it came from, on real inputs.

Parity is measured on batches that `edgemm.runtime.preprocess.Preprocessor` built from dataset
records, the same arrays the device will see. Fusion models are compared on logits (maximum
absolute difference) and decisions (the predicted label, with the matching threshold for
["mismatch", "match"] models). Dual encoders are compared on embeddings (minimum cosine
similarity per row) and on retrieval decisions (the best image for each text in a batch).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from edgemm.errors import CompressionError, ConfigError

logger = logging.getLogger(__name__)

MATCH_LABELS = ["mismatch", "match"]


@dataclass(frozen=True)
class ParityLimits:
    """Limits an FP32 export must meet; a quantized model needs looser ones."""

    max_abs_logit_diff: float = 1e-4
    min_embedding_cosine: float = 0.9999
    min_decision_agreement: float = 1.0


@dataclass(frozen=True)
class ParityResult:
    """Parity figures over `num_samples` inputs; None marks a figure the model kind has no use for."""

    kind: str
    num_samples: int
    num_batches: int
    max_abs_logit_diff: float | None
    min_embedding_cosine: float | None
    decision_agreement: float
    limits: ParityLimits
    inputs: str = "validation"
    failures: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """Return the figures for the manifest's `validation.parity`."""
        return {
            "inputs": self.inputs,
            "num_samples": self.num_samples,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "min_embedding_cosine": self.min_embedding_cosine,
            "decision_agreement": self.decision_agreement,
            "limits": asdict(self.limits),
            "passed": self.passed,
        }


class OnnxRunner:
    """The ONNX side of a parity check: one session per graph, run by output name."""

    def __init__(self, onnx: Any):
        import onnxruntime as ort

        if isinstance(onnx, Mapping):
            items = dict(onnx)
        else:
            items = {"model": onnx}
        self.sessions: dict[str, Any] = {}
        for graph, source in items.items():
            if isinstance(source, (str, Path)):
                source = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
            self.sessions[graph] = source
        self.outputs = {
            output.name: graph for graph, session in self.sessions.items() for output in session.get_outputs()
        }

    @property
    def kind(self) -> str:
        if "logits" in self.outputs:
            return "fusion_classifier"
        if "text_embeds" in self.outputs and "image_embeds" in self.outputs:
            return "dual_encoder"
        raise CompressionError(
            f"The ONNX graphs return {sorted(self.outputs)}, but parity needs 'logits' or "
            "'text_embeds' and 'image_embeds'.",
            "Pass the graphs of one model package (model.onnx, or text_encoder.onnx and image_encoder.onnx).",
        )

    def run(self, output: str, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        session = self.sessions[self.outputs[output]]
        names = [entry.name for entry in session.get_inputs()]
        return session.run([output], {name: feed[name] for name in names})[0]


def measure_parity(
    torch_model: nn.Module,
    onnx_path_or_session: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    limits: ParityLimits = ParityLimits(),
    labels: Sequence[str] = MATCH_LABELS,
    decision_threshold: float | None = None,
    inputs: str = "validation",
) -> ParityResult:
    """Run `torch_model` and the ONNX graphs on the same `batches` and compare their outputs.

    `onnx_path_or_session` is a path or `onnxruntime.InferenceSession` of one graph, or a
    mapping from graph name to either (for a dual encoder's `text_encoder` and
    `image_encoder`). Each batch maps `input_ids`, `attention_mask` and `pixel_values` to
    arrays. `decision_threshold` is the probability of "match" at which a matching model
    predicts "match" (default 0.5). `inputs` names where the batches came from, for the report.

    Returns a `ParityResult` whose `failures` list each limit that is not met; this function
    does not raise for a failed limit. Raises `ConfigError` when there are no batches.
    """
    runner = OnnxRunner(onnx_path_or_session)
    kind = runner.kind
    threshold = 0.5 if decision_threshold is None else decision_threshold
    was_training = torch_model.training
    torch_model.eval()

    logit_diff = 0.0
    cosine = 1.0
    agreements = 0
    num_samples = 0
    num_batches = 0
    try:
        for batch in batches:
            tensors = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in batch.items()}
            with torch.no_grad():
                if kind == "fusion_classifier":
                    expected = _torch_logits(torch_model, tensors)
                    actual = runner.run("logits", batch)
                    logit_diff = max(logit_diff, _max_abs_diff(expected, actual))
                    agree = _fusion_decisions(expected, labels, threshold) == _fusion_decisions(actual, labels, threshold)
                else:
                    text_expected, image_expected = _torch_embeddings(torch_model, tensors)
                    text_actual = runner.run("text_embeds", batch)
                    image_actual = runner.run("image_embeds", batch)
                    cosine = min(cosine, _min_cosine(text_expected, text_actual), _min_cosine(image_expected, image_actual))
                    groups = _image_groups(batch["pixel_values"])
                    agree = _retrieval_decisions(text_expected, image_expected, groups) == _retrieval_decisions(
                        text_actual, image_actual, groups
                    )
            agreements += int(np.sum(agree))
            num_samples += len(agree)
            num_batches += 1
    finally:
        torch_model.train(was_training)

    if num_samples == 0:
        raise ConfigError("measure_parity got no batches.", "Pass at least one batch of preprocessed inputs.")

    agreement = agreements / num_samples
    result = ParityResult(
        kind=kind,
        num_samples=num_samples,
        num_batches=num_batches,
        max_abs_logit_diff=logit_diff if kind == "fusion_classifier" else None,
        min_embedding_cosine=cosine if kind == "dual_encoder" else None,
        decision_agreement=agreement,
        limits=limits,
        inputs=inputs,
        failures=tuple(_failures(kind, logit_diff, cosine, agreement, limits)),
    )
    logger.info(
        "Parity on %d %s samples: max |logit diff| %s, min cosine %s, decision agreement %.4f",
        num_samples,
        inputs,
        result.max_abs_logit_diff,
        result.min_embedding_cosine,
        agreement,
    )
    return result


def random_batches(
    examples: Mapping[str, np.ndarray], num_batches: int = 2, batch_size: int = 4, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Build batches of random inputs shaped like `examples`, an extra check beside real inputs.

    Token ids are drawn from the ids in `examples`, so they stay inside the vocabulary.
    """
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_batches):
        batch = {}
        if "input_ids" in examples:
            ids = examples["input_ids"]
            pool = ids.reshape(-1)
            input_ids = rng.choice(pool, size=(batch_size, ids.shape[1])).astype(ids.dtype)
            input_ids[:, 0] = ids[0, 0]
            mask = np.ones_like(input_ids, dtype=examples["attention_mask"].dtype)
            mask[-1, max(1, ids.shape[1] // 2) :] = 0
            batch["input_ids"] = input_ids
            batch["attention_mask"] = mask
        if "pixel_values" in examples:
            pixels = examples["pixel_values"]
            shape = (batch_size,) + pixels.shape[1:]
            batch["pixel_values"] = rng.normal(pixels.mean(), max(float(pixels.std()), 1e-3), size=shape).astype(pixels.dtype)
        batches.append(batch)
    return batches


def _torch_logits(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    output = model(tensors["input_ids"], tensors["attention_mask"], tensors["pixel_values"])
    return output.float().numpy()


def _torch_embeddings(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    text = model.encode_text(tensors["input_ids"], tensors["attention_mask"])
    image = model.encode_image(tensors["pixel_values"])
    return text.float().numpy(), image.float().numpy()


def _check_same_shape(expected: np.ndarray, actual: np.ndarray) -> None:
    if expected.shape != actual.shape:
        raise CompressionError(
            f"The ONNX graph returns shape {list(actual.shape)} where PyTorch returns {list(expected.shape)}.",
            "Export the model again; the graph does not belong to this model.",
        )


def _max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    _check_same_shape(expected, actual)
    return float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64)), initial=0.0))


def _min_cosine(expected: np.ndarray, actual: np.ndarray) -> float:
    _check_same_shape(expected, actual)
    expected = expected.astype(np.float64)
    actual = actual.astype(np.float64)
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
    cosines = np.sum(expected * actual, axis=1) / np.maximum(norms, 1e-12)
    return float(np.min(cosines))


def _fusion_decisions(logits: np.ndarray, labels: Sequence[str], threshold: float) -> np.ndarray:
    """Predicted class index per row, as `edgemm.runtime` decides it."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    scores = shifted / shifted.sum(axis=1, keepdims=True)
    if list(labels) == MATCH_LABELS:
        return (scores[:, 1] >= threshold).astype(np.int64)
    return scores.argmax(axis=1)


def _image_groups(pixel_values: np.ndarray) -> np.ndarray:
    """Map each image of a batch to the first image with identical pixels.

    Matching pairs repeat an image (its true and its mismatched caption), and the two copies
    have embeddings equal up to rounding, so the best image for a text is compared by content.
    """
    flat = pixel_values.reshape(len(pixel_values), -1)
    groups = np.arange(len(flat))
    for index in range(len(flat)):
        for earlier in range(index):
            if groups[earlier] == earlier and np.array_equal(flat[earlier], flat[index]):
                groups[index] = earlier
                break
    return groups


def _retrieval_decisions(text_embeds: np.ndarray, image_embeds: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Return the most similar image in the batch for each text, as the first image with its pixels."""
    return groups[(text_embeds @ image_embeds.T).argmax(axis=1)]


def _failures(kind: str, logit_diff: float, cosine: float, agreement: float, limits: ParityLimits) -> list[str]:
    failures = []
    if kind == "fusion_classifier" and not logit_diff <= limits.max_abs_logit_diff:
        failures.append(f"max |logit diff| {logit_diff:.3g} is above the limit {limits.max_abs_logit_diff:g}")
    if kind == "dual_encoder" and not cosine >= limits.min_embedding_cosine:
        failures.append(f"min embedding cosine {cosine:.6f} is below the limit {limits.min_embedding_cosine:g}")
    if not agreement >= limits.min_decision_agreement:
        failures.append(f"decision agreement {agreement:.4f} is below the limit {limits.min_decision_agreement:g}")
    return failures
