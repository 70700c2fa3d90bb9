"""Load a model package with pinned thread settings and run it end to end or inference only.

The benchmark needs two things the plain runtime call hides: the ONNX run on arrays prepared in
advance (to time inference without preprocessing), and full control of the onnxruntime session
options (intra-op threads, inter-op threads and spinning). Preprocessing uses the runtime's own
tokenizer and image transform, so end-to-end latency covers the same steps a device runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from edgemm.errors import ConfigError, PackageError

logger = logging.getLogger(__name__)


class PackageHarness:
    """One package opened with fixed thread settings: `prepare`, `infer` and `end_to_end`."""

    def __init__(self, manifest: Any, sessions: dict[str, Any], tokenizer: Any, transform: Any):
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.transform = transform
        self._input_names = {name: {item.name for item in session.get_inputs()} for name, session in sessions.items()}

    @staticmethod
    def import_runtime() -> None:
        """Import everything a device needs to run a package (timed as the cold-start import phase)."""
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401
        import PIL.Image  # noqa: F401

        import edgemm.runtime.image  # noqa: F401
        import edgemm.runtime.manifest  # noqa: F401
        import edgemm.runtime.tokenizer  # noqa: F401

    @classmethod
    def open(
        cls,
        package_dir: Path,
        threads: int,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        allow_spinning: bool = False,
        verify_checksums: bool = True,
    ) -> "PackageHarness":
        """Read and check the package, then create one onnxruntime session per graph.

        Raises `PackageError` when the manifest is invalid, a checksum differs or onnxruntime
        cannot load a graph.
        """
        from edgemm.runtime.image import ImageTransform
        from edgemm.runtime.manifest import read_manifest
        from edgemm.runtime.tokenizer import WordPieceTokenizer

        manifest = read_manifest(Path(package_dir), verify_checksums=verify_checksums)
        options = session_options(threads, allow_spinning)
        graphs = ("text_encoder", "image_encoder") if manifest.kind == "dual_encoder" else ("model",)
        sessions = {name: _create_session(manifest.graph_path(name), options, providers) for name in graphs}
        tokenizer = WordPieceTokenizer.from_spec(manifest.input_spec.text, manifest.vocab_path)
        transform = ImageTransform(manifest.input_spec.image)
        return cls(manifest, sessions, tokenizer, transform)

    def prepare(self, texts: Sequence[str], images: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Tokenize and transform a batch into one feed dict per graph."""
        arrays = dict(self.tokenizer(list(texts), padding="longest"))
        arrays["pixel_values"] = self.transform(list(images))
        return {
            graph: {name: array for name, array in arrays.items() if name in self._input_names[graph]}
            for graph in self.sessions
        }

    def infer(self, prepared: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Run every graph on prepared feeds and return the outputs by name."""
        outputs: dict[str, Any] = {}
        for graph, session in self.sessions.items():
            names = [item.name for item in session.get_outputs()]
            outputs.update(zip(names, session.run(names, prepared[graph])))
        return outputs

    def end_to_end(self, texts: Sequence[str], images: Sequence[Any]) -> Any:
        """Decode, preprocess, run and postprocess a batch, as a device does for each request.

        Returns class probabilities [batch, labels] for a fusion classifier, and the
        text-image similarity matrix [batch, batch] for a dual encoder.
        """
        return self.postprocess(self.infer(self.prepare(texts, images)))

    def postprocess(self, outputs: dict[str, Any]) -> Any:
        import numpy as np

        if self.manifest.kind == "dual_encoder":
            text = outputs["text_embeds"]
            image = outputs["image_embeds"]
            scale = self.manifest.logit_scale if self.manifest.logit_scale is not None else 1.0
            return scale * (text @ image.T)
        logits = outputs["logits"]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def close(self) -> None:
        self.sessions.clear()


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
