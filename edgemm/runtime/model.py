"""Load a model package and run it: `load(path)` returns a `FusionModel` or a `DualEncoderModel`.

Loading checks everything the manifest promises before the first input is accepted. It
checks the schema and every file's size and SHA-256. It compares the opset of every graph
with the manifest and with the installed onnxruntime, and every graph's input and output
names, element types and ranks with the manifest. Any mismatch raises `PackageError` naming
the file and the fix.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from edgemm.errors import ConfigError, InputError, PackageError
from edgemm.runtime.image import ImageSource, image_batch
from edgemm.runtime.manifest import Manifest, read_manifest
from edgemm.runtime.onnx_file import read_opset_imports
from edgemm.runtime.preprocess import Preprocessor

logger = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
_ELEMENT_TYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}
# Every exception type onnxruntime's Python binding defines; each derives from Exception directly.
_ORT_ERRORS = tuple(
    value
    for value in vars(_ort_state).values()
    if isinstance(value, type) and issubclass(value, Exception)
) + (RuntimeError,)
_SUPPORTED_OPSET = re.compile(r"official support for domain ai\.onnx is till opset (\d+)")


@dataclass(frozen=True)
class GraphInput:
    """An input of an ONNX graph as the session reports it."""

    name: str
    dtype: type
    shape: tuple[int | str | None, ...]

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if isinstance(self.shape[0], int) else None


@dataclass
class Prediction:
    """Result of `FusionModel.predict` for N text-image pairs.

    `scores` are softmax probabilities [N, num_labels] in the order of `label_names`, and
    `labels` is the predicted label of each pair. For matching models (labels ["mismatch",
    "match"]), `match_score` is the probability of "match" [N] and a pair is predicted
    "match" when it reaches `threshold`, the manifest's decision threshold.
    """

    scores: np.ndarray
    labels: list[str]
    label_names: list[str]
    logits: np.ndarray
    match_score: np.ndarray | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the prediction as JSON-ready lists, one entry per pair."""
        items = []
        for index, label in enumerate(self.labels):
            item: dict[str, Any] = {
                "label": label,
                "scores": {name: float(score) for name, score in zip(self.label_names, self.scores[index])},
            }
            if self.match_score is not None:
                item["match_score"] = float(self.match_score[index])
            items.append(item)
        return {"threshold": self.threshold, "predictions": items}


def load(
    path: str | Path,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    max_pixels: int | None = None,
    verify_checksums: bool = True,
) -> "FusionModel | DualEncoderModel":
    """Load and verify the model package in folder `path`.

    `threads` sets onnxruntime's intra-op thread count (None: onnxruntime's default, which
    is one thread per physical core). `providers` lists onnxruntime execution providers in order of
    preference (default: CPU). `max_pixels` overrides the image size limit of
    `edgemm.runtime.image.DEFAULT_MAX_PIXELS`. With `verify_checksums=False` the SHA-256 of
    each file is not computed, which saves reading every file once more; sizes are still
    checked.

    Raises `PackageError` for an invalid package and `ConfigError` for invalid options.
    """
    manifest = read_manifest(Path(path), verify_checksums=verify_checksums)
    options = _session_options(threads)
    providers = _check_providers(providers)
    preprocessor_options = {} if max_pixels is None else {"max_pixels": max_pixels}
    preprocessor = Preprocessor(manifest.input_spec, manifest.vocab_path, **preprocessor_options)

    if manifest.kind == "dual_encoder":
        graph_names = ("text_encoder", "image_encoder")
    else:
        graph_names = ("model",)
    sessions = {name: _create_session(manifest, name, options, providers) for name in graph_names}

    model_class = DualEncoderModel if manifest.kind == "dual_encoder" else FusionModel
    model = model_class(manifest, preprocessor, sessions)
    logger.debug("Loaded %s package %s (%s, opset %d)", manifest.kind, manifest.package_dir, manifest.precision, manifest.opset)
    return model


def _session_options(threads: int | None) -> ort.SessionOptions:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} is invalid.", "Pass a positive number of threads, or None for the default.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _check_providers(providers: Sequence[str] | None) -> list[str]:
    if providers is None:
        return list(DEFAULT_PROVIDERS)
    available = ort.get_available_providers()
    missing = [provider for provider in providers if provider not in available]
    if missing or not providers:
        raise ConfigError(
            f"onnxruntime execution providers {missing or list(providers)} are not available.",
            f"This onnxruntime {ort.__version__} build offers {available}.",
        )
    return list(providers)


def _create_session(manifest: Manifest, graph: str, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    path = manifest.graph_path(graph)
    opsets = read_opset_imports(path)
    if opsets[""] != manifest.opset:
        raise PackageError(
            f"{path} uses opset {opsets['']}, but the manifest records opset {manifest.opset}.",
            "The package is inconsistent; export it again.",
        )

    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except _ORT_ERRORS as error:
        raise _session_error(path, opsets[""], error) from error

    _check_graph_io(manifest, graph, session)
    return session


def _session_error(path: Path, opset: int, error: Exception) -> PackageError:
    message = str(error)
    supported = _SUPPORTED_OPSET.search(message)
    if supported:
        return PackageError(
            f"{path} uses opset {opset}, but onnxruntime {ort.__version__} supports opsets up to {supported.group(1)}.",
            f"Upgrade onnxruntime (pip install --upgrade onnxruntime), or export the package again with opset {supported.group(1)} or lower.",
        )
    if "INVALID_PROTOBUF" in message or "Protobuf parsing failed" in message:
        return PackageError(
            f"{path} is not a valid ONNX model (onnxruntime could not parse it).",
            "The file is truncated or is not an ONNX file; export the package again.",
        )
    if "No Op registered" in message or "NOT_IMPLEMENTED" in message:
        return PackageError(
            f"onnxruntime {ort.__version__} cannot run {path} (opset {opset}): {_first_line(message)}",
            "Upgrade onnxruntime, or export the package again with a lower opset or without that operator.",
        )
    return PackageError(
        f"onnxruntime {ort.__version__} failed to load {path}: {_first_line(message)}",
        "Export the package again; if that fails too, report the message above.",
    )


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "no message"


def _expected_inputs(manifest: Manifest, graph: str) -> dict[str, tuple[int, tuple[type, ...]]]:
    """Return {input name: (rank, allowed element types)} that `graph` must declare."""
    ids_name, mask_name = manifest.input_spec.text.input_names
    text = {ids_name: (2, (np.int64, np.int32)), mask_name: (2, (np.int64, np.int32))}
    image = {manifest.input_spec.image.input_name: (4, (np.float32, np.float16))}
    if graph == "text_encoder":
        return text
    if graph == "image_encoder":
        return image
    return {**text, **image}


def _expected_outputs(manifest: Manifest, graph: str) -> dict[str, int]:
    """Return {output name: rank} that `graph` must produce, from the manifest's outputs."""
    if graph == "text_encoder":
        names = ["text_embeds"]
    elif graph == "image_encoder":
        names = ["image_embeds"]
    else:
        names = [name for name in manifest.outputs if name not in ("text_embeds", "image_embeds")]
    return {name: len(manifest.outputs[name]["shape"]) for name in names}


def _check_graph_io(manifest: Manifest, graph: str, session: ort.InferenceSession) -> None:
    path = manifest.graph_path(graph)
    expected_inputs = _expected_inputs(manifest, graph)
    actual_inputs = {item.name: item for item in session.get_inputs()}
    if set(actual_inputs) != set(expected_inputs):
        raise PackageError(
            f"{path} has inputs {sorted(actual_inputs)}, but the manifest describes {sorted(expected_inputs)}.",
            "The graph does not belong to this manifest; export the package again.",
        )
    for name, (rank, dtypes) in expected_inputs.items():
        item = actual_inputs[name]
        if len(item.shape) != rank or _ELEMENT_TYPES.get(item.type) not in dtypes:
            raise PackageError(
                f"{path} input {name} is {item.type} with shape {item.shape}, but the manifest needs rank {rank} "
                f"of {[np.dtype(dtype).name for dtype in dtypes]}.",
                "The graph does not belong to this manifest; export the package again.",
            )

    actual_outputs = {item.name: item for item in session.get_outputs()}
    for name, rank in _expected_outputs(manifest, graph).items():
        item = actual_outputs.get(name)
        if item is None:
            raise PackageError(
                f"{path} has no output {name!r} (it has {sorted(actual_outputs)}), but the manifest describes it.",
                "The graph does not belong to this manifest; export the package again.",
            )
        if len(item.shape) != rank:
            raise PackageError(
                f"{path} output {name} has shape {item.shape}, but the manifest describes rank {rank}.",
                "The graph does not belong to this manifest; export the package again.",
            )

    if graph == "model" and "logits" in actual_outputs:
        width = actual_outputs["logits"].shape[-1]
        if isinstance(width, int) and width != len(manifest.labels):
            raise PackageError(
                f"{path} returns {width} logits per pair, but the manifest lists {len(manifest.labels)} labels.",
                "The graph does not belong to this manifest; export the package again.",
            )


class _PackageModel:
    """Base of both model kinds, with the manifest, the preprocessor and the graph sessions."""

    def __init__(self, manifest: Manifest, preprocessor: Preprocessor, sessions: dict[str, ort.InferenceSession]):
        self.manifest = manifest
        self.preprocessor = preprocessor
        self._sessions = sessions
        self._inputs = {
            graph: {item.name: _graph_input(item) for item in session.get_inputs()}
            for graph, session in sessions.items()
        }
        self._check_fixed_dims()

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def describe_graphs(self) -> dict[str, dict[str, Any]]:
        """Return each loaded graph's file, opset per domain, and inputs and outputs (element type and shape)."""
        described = {}
        for graph, session in self._sessions.items():
            described[graph] = {
                "file": self.manifest.graphs[graph],
                "opsets": read_opset_imports(self.manifest.graph_path(graph)),
                "inputs": {item.name: {"type": item.type, "shape": list(item.shape)} for item in session.get_inputs()},
                "outputs": {item.name: {"type": item.type, "shape": list(item.shape)} for item in session.get_outputs()},
                "providers": session.get_providers(),
            }
        return described

    def _check_fixed_dims(self) -> None:
        """Reject graphs whose fixed sequence or image size disagrees with the input spec."""
        spec = self.manifest.input_spec
        for graph, inputs in self._inputs.items():
            for item in inputs.values():
                if item.name == spec.image.input_name:
                    fixed = [dim for dim in item.shape[2:] if isinstance(dim, int)]
                    if any(dim != spec.image.crop for dim in fixed):
                        raise PackageError(
                            f"{self.manifest.graph_path(graph)} takes images of {item.shape[2:]}, "
                            f"but the manifest crops to {spec.image.crop}.",
                            "The graph does not belong to this manifest; export the package again.",
                        )
                elif isinstance(item.shape[1], int) and item.shape[1] != spec.text.max_length:
                    raise PackageError(
                        f"{self.manifest.graph_path(graph)} takes sequences of exactly {item.shape[1]} tokens, "
                        f"but the manifest's max_length is {spec.text.max_length}.",
                        "The graph does not belong to this manifest; export the package again.",
                    )

    def _text_padding(self, graph: str) -> str:
        ids_name = self.manifest.input_spec.text.input_names[0]
        return "max_length" if isinstance(self._inputs[graph][ids_name].shape[1], int) else "longest"

    def _batch_limit(self, graph: str, batch_size: int) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is invalid.", "Pass a positive integer.")
        fixed = {item.fixed_batch for item in self._inputs[graph].values()} - {None}
        return fixed.pop() if fixed else batch_size

    def _run(self, graph: str, feed: dict[str, np.ndarray], output: str) -> np.ndarray:
        """Run one graph on a feed, padding the batch when the graph has a fixed batch size."""
        inputs = self._inputs[graph]
        count = next(iter(feed.values())).shape[0]
        fixed = next((item.fixed_batch for item in inputs.values() if item.fixed_batch), None)
        if fixed and count < fixed:
            feed = {name: np.concatenate([array, np.repeat(array[-1:], fixed - count, axis=0)]) for name, array in feed.items()}
        typed = {name: feed[name].astype(inputs[name].dtype, copy=False) for name in inputs}
        try:
            result = self._sessions[graph].run([output], typed)[0]
        except _ORT_ERRORS as error:
            shapes = {name: list(array.shape) for name, array in typed.items()}
            raise PackageError(
                f"onnxruntime failed to run {self.manifest.graph_path(graph)} on inputs of shapes {shapes}: "
                f"{_first_line(str(error))}",
                "The graph does not accept these batch or sequence sizes; export the package again with dynamic axes.",
            ) from error
        return np.asarray(result[:count], dtype=np.float32)


class FusionModel(_PackageModel):
    """A fusion classifier package: one graph from (text, image) pairs to `logits`."""

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    def predict(
        self,
        texts: str | Sequence[str],
        images: ImageSource | Sequence[ImageSource],
        batch_size: int = 32,
    ) -> Prediction:
        """Classify text-image pairs: `texts[i]` goes with `images[i]`.

        Accepts one text and one image, or two lists of the same length. Images may be
        paths, bytes, PIL images or HWC uint8 arrays. Raises `InputError` for lists of
        different lengths, an empty or non-string text and an unreadable image.
        """
        text_list = _text_batch(texts)
        image_list = image_batch(images)
        if len(text_list) != len(image_list):
            raise InputError(
                f"Got {len(text_list)} texts but {len(image_list)} images.",
                "predict pairs texts[i] with images[i], so pass lists of the same length.",
            )
        if not text_list:
            raise InputError("Got no text-image pairs.", "Pass at least one text and one image.")

        step = self._batch_limit("model", batch_size)
        padding = self._text_padding("model")
        chunks = []
        for start in range(0, len(text_list), step):
            feed = self.preprocessor.texts(text_list[start : start + step], padding=padding, first_position=start)
            feed.update(self.preprocessor.images(image_list[start : start + step], first_position=start))
            chunks.append(self._run("model", feed, "logits"))
        return self._prediction(np.concatenate(chunks))

    def _prediction(self, logits: np.ndarray) -> Prediction:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
        names = self.labels
        if self.manifest.is_matching:
            threshold = self.manifest.decision_threshold if self.manifest.decision_threshold is not None else 0.5
            match_score = scores[:, names.index("match")]
            labels = ["match" if score >= threshold else "mismatch" for score in match_score]
            return Prediction(scores, labels, names, logits, match_score=match_score, threshold=threshold)
        labels = [names[index] for index in scores.argmax(axis=1)]
        return Prediction(scores, labels, names, logits, threshold=self.manifest.decision_threshold)


class DualEncoderModel(_PackageModel):
    """A dual encoder package: separate text and image graphs to L2-normalised embeddings."""

    @property
    def logit_scale(self) -> float | None:
        """Multiplier of cosine similarities learned in training (exp of the model's parameter)."""
        return self.manifest.logit_scale

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts: float32 [N, D], each row L2-normalised."""
        text_list = _text_batch(texts)
        if not text_list:
            raise InputError("Got no texts to encode.", "Pass at least one text.")
        step = self._batch_limit("text_encoder", batch_size)
        padding = self._text_padding("text_encoder")
        chunks = []
        for start in range(0, len(text_list), step):
            feed = self.preprocessor.texts(text_list[start : start + step], padding=padding, first_position=start)
            chunks.append(self._run("text_encoder", feed, "text_embeds"))
        return _l2_normalize(np.concatenate(chunks))

    def encode_image(self, images: ImageSource | Sequence[ImageSource], batch_size: int = 32) -> np.ndarray:
        """Embed images: float32 [N, D], each row L2-normalised."""
        image_list = image_batch(images)
        if not image_list:
            raise InputError("Got no images to encode.", "Pass at least one image.")
        step = self._batch_limit("image_encoder", batch_size)
        chunks = []
        for start in range(0, len(image_list), step):
            feed = self.preprocessor.images(image_list[start : start + step], first_position=start)
            chunks.append(self._run("image_encoder", feed, "image_embeds"))
        return _l2_normalize(np.concatenate(chunks))

    def similarity(
        self,
        texts: str | Sequence[str] | np.ndarray,
        images: ImageSource | Sequence[ImageSource] | np.ndarray,
        scale: bool = False,
    ) -> np.ndarray:
        """Return the cosine similarity matrix [num_texts, num_images].

        `texts` and `images` may be raw inputs or embeddings from `encode_text` and
        `encode_image` (float arrays [N, D]). With `scale`, the matrix is multiplied by
        `logit_scale`, which gives the logits the model was trained on.
        """
        text_embeds = _as_embeddings(texts, self.encode_text)
        image_embeds = _as_embeddings(images, self.encode_image)
        if text_embeds.shape[1] != image_embeds.shape[1]:
            raise InputError(
                f"Text embeddings have {text_embeds.shape[1]} dimensions but image embeddings have {image_embeds.shape[1]}.",
                "Pass embeddings from this model's encode_text and encode_image.",
            )
        matrix = _l2_normalize(text_embeds) @ _l2_normalize(image_embeds).T
        if scale:
            matrix = matrix * (self.logit_scale if self.logit_scale is not None else 1.0)
        return matrix


def _graph_input(item: Any) -> GraphInput:
    return GraphInput(name=item.name, dtype=_ELEMENT_TYPES[item.type], shape=tuple(item.shape))


def _text_batch(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray) and texts.dtype.kind != "U":
        raise InputError(f"Texts must be strings, got an array of {texts.dtype}.", "Pass a str or a list of str.")
    return list(texts)


def _as_embeddings(values: Any, encode) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.ndim == 2 and values.dtype.kind == "f":
        return values.astype(np.float32, copy=False)
    return encode(values)


def _l2_normalize(array: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return (array / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
