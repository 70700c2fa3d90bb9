"""Open a model package with pinned thread settings and run it end to end or inference only.

The benchmark needs two things `edgemm.runtime.load` does not offer: the ONNX run on arrays
prepared in advance (to time inference without preprocessing), and control of onnxruntime's
thread spinning. So the harness creates its own sessions and preprocesses with the runtime's
`Preprocessor`, then runs the same steps as `FusionModel.predict` and
`DualEncoderModel.similarity`. Packages are checked with `edgemm.runtime.load` first (see
`check_package`), and cold starts run the real runtime.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from edgemm.errors import ConfigError, PackageError

logger = logging.getLogger(__name__)

# onnxruntime input type -> numpy dtype name, for the inputs edgemm graphs declare.
ELEMENT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32", "tensor(float16)": "float16"}


def check_package(package_dir: Path, providers: Sequence[str]) -> Any:
    """Load the package with `edgemm.runtime.load` (every check the runtime makes) and return its manifest.

    Raises `PackageError` for an invalid package, as `edgemm run` would.
    """
    import edgemm.runtime

    model = edgemm.runtime.load(Path(package_dir), threads=1, providers=list(providers))
    return model.manifest


class PackageHarness:
    """One package opened with fixed thread settings: `prepare`, `infer` and `end_to_end`."""

    def __init__(self, manifest: Any, sessions: dict[str, Any], preprocessor: Any):
        self.manifest = manifest
        self.sessions = sessions
        self.preprocessor = preprocessor
        self._inputs = {graph: {item.name: item for item in session.get_inputs()} for graph, session in sessions.items()}
        self._outputs = {graph: [item.name for item in session.get_outputs()] for graph, session in sessions.items()}
        ids_name = manifest.input_spec.text.input_names[0]
        # As in the runtime: graphs exported with a fixed sequence length need rows padded to max_length.
        fixed_length = any(isinstance(inputs[ids_name].shape[1], int) for inputs in self._inputs.values() if ids_name in inputs)
        self._padding = "max_length" if fixed_length else "longest"

    @classmethod
    def open(
        cls,
        package_dir: Path,
        threads: int,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        allow_spinning: bool = False,
    ) -> "PackageHarness":
        """Read the manifest and create one onnxruntime session per graph with `session_options`.

        Checksums are not verified here because `check_package` did that once. Raises
        `PackageError` when onnxruntime cannot load a graph.
        """
        from edgemm.runtime.manifest import read_manifest
        from edgemm.runtime.preprocess import Preprocessor

        manifest = read_manifest(Path(package_dir), verify_checksums=False)
        options = session_options(threads, allow_spinning)
        graphs = ("text_encoder", "image_encoder") if manifest.kind == "dual_encoder" else ("model",)
        sessions = {name: _create_session(manifest.graph_path(name), options, providers) for name in graphs}
        return cls(manifest, sessions, Preprocessor(manifest.input_spec, manifest.vocab_path))

    def prepare(self, texts: Sequence[str], images: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Tokenize and transform a batch into one feed dict per graph, in each input's element type."""
        for graph, inputs in self._inputs.items():
            fixed = {item.shape[0] for item in inputs.values() if isinstance(item.shape[0], int)}
            if fixed and fixed != {len(texts)}:
                raise ConfigError(
                    f"{self.manifest.graph_path(graph)} was exported with a fixed batch size of {sorted(fixed)[0]}, "
                    f"so it cannot be benchmarked at batch size {len(texts)}.",
                    f"Pass --batch-sizes {sorted(fixed)[0]}, or export the package with a dynamic batch axis.",
                )
        arrays = self.preprocessor(list(texts), list(images), padding=self._padding)
        feeds = {}
        for graph, inputs in self._inputs.items():
            feeds[graph] = {name: arrays[name].astype(ELEMENT_TYPES[item.type], copy=False) for name, item in inputs.items()}
        return feeds

    def infer(self, prepared: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Run every graph on prepared feeds and return the outputs by name."""
        outputs: dict[str, Any] = {}
        for graph, session in self.sessions.items():
            names = self._outputs[graph]
            outputs.update(zip(names, session.run(names, prepared[graph])))
        return outputs

    def end_to_end(self, texts: Sequence[str], images: Sequence[Any]) -> Any:
        """Decode, preprocess, run and postprocess a batch, as a device does for each request.

        Returns class probabilities [batch, labels] for a fusion classifier, and the scaled
        text-image similarity matrix [batch, batch] for a dual encoder.
        """
        return self.postprocess(self.infer(self.prepare(texts, images)))

    def postprocess(self, outputs: dict[str, Any]) -> Any:
        import numpy as np

        if self.manifest.kind == "dual_encoder":
            text = _l2_normalize(outputs["text_embeds"].astype(np.float32))
            image = _l2_normalize(outputs["image_embeds"].astype(np.float32))
            scale = self.manifest.logit_scale if self.manifest.logit_scale is not None else 1.0
            return scale * (text @ image.T)
        logits = outputs["logits"].astype(np.float32)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def close(self) -> None:
        self.sessions.clear()


def _l2_normalize(array: Any) -> Any:
    import numpy as np

    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def session_options(threads: int, allow_spinning: bool) -> Any:
    """Build onnxruntime session options that pin the thread count (see docs/bench-schema.md)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


def _create_session(path: Path, options: Any, providers: Sequence[str]) -> Any:
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    load_errors = (
        ort_errors.Fail,
        ort_errors.InvalidArgument,
        ort_errors.InvalidGraph,
        ort_errors.InvalidProtobuf,
        ort_errors.NoSuchFile,
        ort_errors.NotImplemented,
        ort_errors.RuntimeException,
    )
    available = onnxruntime.get_available_providers()
    missing = [provider for provider in providers if provider not in available]
    if missing:
        raise ConfigError(
            f"onnxruntime provider(s) {missing} are not available in this onnxruntime build.",
            f"Use some of {available}.",
        )
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except load_errors as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PackageError(
            f"onnxruntime cannot load {path}: {first_line}",
            "The graph is damaged or uses operators this onnxruntime lacks; export the package again or upgrade onnxruntime.",
        ) from error
