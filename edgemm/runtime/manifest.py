"""The model package manifest: build it, write it, read it and validate it.

A model package is a folder with `manifest.json`, one or more ONNX graphs and `vocab.txt`.
The manifest states what the package is (kind, architecture, labels), how to feed it
(`InputSpec`), what its graphs return, how it was compressed and validated, and a SHA-256
checksum and byte size for every file. The runtime trusts nothing in it without checking:
`validate_manifest` checks the schema by hand (no jsonschema dependency), the file list and,
by default, every checksum.

Torch-free: export (host) and the runtime (device) share this module.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgemm import __version__
from edgemm.errors import EdgemmError, PackageError
from edgemm.io import atomic_write_text, resolve_inside
from edgemm.runtime.spec import InputSpec

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "edgemm-package"
FORMAT_VERSION = 1

KINDS = ("fusion_classifier", "dual_encoder")
ARCHITECTURES = ("concat_fusion", "cross_attention", "dual_encoder")
PRECISIONS = ("fp32", "int8-static", "int8-dynamic", "fp16", "mixed")
MIN_OPSET = 7

# Graphs each kind needs. A dual encoder package may also ship the whole model as "model".
REQUIRED_GRAPHS = {
    "fusion_classifier": ("model",),
    "dual_encoder": ("text_encoder", "image_encoder"),
}
KNOWN_GRAPHS = ("model", "text_encoder", "image_encoder")

DEFAULT_OUTPUTS = {
    "fusion_classifier": {
        "logits": {
            "shape": ["batch", "num_labels"],
            "meaning": "unnormalised class scores; softmax gives probabilities",
        },
    },
    "dual_encoder": {
        "text_embeds": {
            "shape": ["batch", "embed_dim"],
            "meaning": "L2-normalised text embeddings",
        },
        "image_embeds": {
            "shape": ["batch", "embed_dim"],
            "meaning": "L2-normalised image embeddings",
        },
    },
}

_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """Checksum and size of one file in a package."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A validated manifest, bound to the package folder it describes.

    `data` is the raw JSON object as read, so fields a later version adds stay available.
    """

    package_dir: Path
    kind: str
    architecture: str
    graphs: dict[str, str]
    input_spec: InputSpec
    outputs: dict[str, dict[str, Any]]
    labels: list[str]
    decision_threshold: float | None
    logit_scale: float | None
    precision: str
    opset: int
    files: dict[str, FileEntry]
    edgemm_version: str
    compression: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    def path(self, relative: str) -> Path:
        """Return the absolute path of a package file, rejecting paths that leave the package."""
        return _resolve_package_path(self.package_dir, relative)

    def graph_path(self, graph: str) -> Path:
        """Return the path of the ONNX graph stored under `graph` ("model", "text_encoder", ...)."""
        return self.path(self.graphs[graph])

    @property
    def vocab_path(self) -> Path:
        return self.path(self.input_spec.text.vocab_file)

    @property
    def is_matching(self) -> bool:
        """True for image-text matching classifiers (labels ["mismatch", "match"])."""
        return self.labels == ["mismatch", "match"]


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(
    package_dir: Path,
    *,
    kind: str,
    architecture: str,
    graphs: Mapping[str, str],
    input_spec: InputSpec | Mapping[str, Any],
    opset: int,
    labels: Sequence[str] = (),
    precision: str = "fp32",
    decision_threshold: float | None = None,
    logit_scale: float | None = None,
    outputs: Mapping[str, Any] | None = None,
    compression: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    samples: Mapping[str, Any] | None = None,
    extra_files: Sequence[str] = (),
) -> dict[str, Any]:
    """Build the manifest of the package whose files are already in `package_dir`.

    Checksums and sizes are computed for every graph, the vocabulary, the sample images
    (`samples["images"]`) and `extra_files`, so those files must exist. `outputs` defaults to
    the standard outputs of `kind`. `decision_threshold` defaults to 0.5 for matching models
    (labels ["mismatch", "match"]). The result is validated before it is returned, and
    `write_manifest(package_dir, result)` stores it.

    Raises `PackageError` when a field is invalid or a listed file is missing.
    """
    package_dir = Path(package_dir)
    spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec.from_dict(dict(input_spec))
    labels = list(labels)
    if decision_threshold is None and labels == ["mismatch", "match"]:
        decision_threshold = 0.5
    samples = dict(samples or {})

    names = list(graphs.values()) + [spec.text.vocab_file]
    names += list(samples.get("images", [])) + list(extra_files)
    files: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        path = _resolve_package_path(package_dir, name)
        if not path.is_file():
            raise PackageError(
                f"Cannot build the manifest: {name} is missing from {package_dir}.",
                "Write every graph, the vocabulary and the sample files into the package folder first.",
            )
        files[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}

    data = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "edgemm_version": __version__,
        "kind": kind,
        "architecture": architecture,
        "graphs": dict(graphs),
        "inputs": spec.to_dict(),
        "outputs": copy.deepcopy(dict(outputs) if outputs is not None else DEFAULT_OUTPUTS.get(kind, {})),
        "labels": labels,
        "decision_threshold": decision_threshold,
        "logit_scale": logit_scale,
        "precision": precision,
        "opset": opset,
        "files": files,
        "compression": copy.deepcopy(dict(compression or {})),
        "validation": copy.deepcopy(dict(validation or {})),
        "samples": copy.deepcopy(samples),
    }
    validate_manifest(data, package_dir, verify_checksums=False)
    return data


def write_manifest(package_dir: Path, data: Mapping[str, Any]) -> Path:
    """Validate `data` (without re-hashing files) and write it atomically as manifest.json."""
    package_dir = Path(package_dir)
    validate_manifest(data, package_dir, verify_checksums=False)
    path = package_dir / MANIFEST_NAME
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def read_manifest(package_dir: Path, verify_checksums: bool = True) -> Manifest:
    """Read and validate `package_dir/manifest.json`; see `validate_manifest`."""
    package_dir = Path(package_dir)
    if not package_dir.is_dir():
        raise PackageError(
            f"Model package {package_dir} not found or not a folder.",
            "Pass the folder that contains manifest.json (written by `edgemm export` or `edgemm compress`).",
        )
    path = package_dir / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(
            f"{path} not found: {package_dir} is not a model package.",
            "Pass the folder written by `edgemm export` or `edgemm compress`.",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PackageError(
            f"{path} is not valid JSON: {error}.",
            "The file is damaged; export the package again.",
        ) from error
    return validate_manifest(data, package_dir, verify_checksums=verify_checksums)


def validate_manifest(data: Any, package_dir: Path, verify_checksums: bool = True) -> Manifest:
    """Check a manifest object against format version 1 and return it as a `Manifest`.

    It checks the required fields and their types, the format name and version, and the
    kind, architecture, precision and graph names. A newer format version is rejected with
    a request to upgrade edgemm. Every graph and the vocabulary must be listed in `files`.
    Every listed file must stay inside `package_dir` and exist with the recorded size, and
    its SHA-256 is compared when `verify_checksums` is true. Unknown extra fields are kept.

    Raises `PackageError` naming the field or file and the fix.
    """
    package_dir = Path(package_dir)
    checker = _Checker(package_dir / MANIFEST_NAME)
    checker.require_type(data, dict, "the manifest")

    _check_format(checker, data)
    kind = checker.require_choice(data, "kind", KINDS)
    architecture = checker.require_choice(data, "architecture", ARCHITECTURES)
    if (kind == "dual_encoder") != (architecture == "dual_encoder"):
        checker.fail(f"kind {kind!r} does not fit architecture {architecture!r}")
    precision = checker.require_choice(data, "precision", PRECISIONS)
    edgemm_version = checker.require(data, "edgemm_version", str)

    opset = checker.require(data, "opset", int)
    if opset < MIN_OPSET:
        checker.fail(f"opset {opset} is below {MIN_OPSET}, the oldest opset edgemm supports")

    graphs = _check_graphs(checker, data, kind)
    input_spec = _check_inputs(checker, data)
    outputs = _check_outputs(checker, data, kind)
    labels = _check_labels(checker, data, kind)
    decision_threshold = _check_threshold(checker, data)
    logit_scale = checker.optional_number(data, "logit_scale")

    files = _check_files(checker, data)
    required_files = list(graphs.values()) + [input_spec.text.vocab_file]
    for name in required_files:
        if name not in files:
            checker.fail(f"'files' has no entry for {name}, so its checksum cannot be verified")

    compression = checker.optional(data, "compression", dict, {})
    validation = checker.optional(data, "validation", dict, {})
    samples = _check_samples(checker, data, files)

    manifest = Manifest(
        package_dir=package_dir,
        kind=kind,
        architecture=architecture,
        graphs=graphs,
        input_spec=input_spec,
        outputs=outputs,
        labels=labels,
        decision_threshold=decision_threshold,
        logit_scale=logit_scale,
        precision=precision,
        opset=opset,
        files=files,
        edgemm_version=edgemm_version,
        compression=compression,
        validation=validation,
        samples=samples,
        data=dict(data),
    )
    verify_files(manifest, verify_checksums=verify_checksums)
    return manifest


def verify_files(manifest: Manifest, verify_checksums: bool = True) -> None:
    """Check that every file listed in the manifest exists inside the package with its size and SHA-256."""
    for name, entry in manifest.files.items():
        path = manifest.path(name)
        if not path.is_file():
            raise PackageError(
                f"Package file {name} is listed in the manifest but missing from {manifest.package_dir}.",
                "The package is incomplete; copy the whole package folder again or export it again.",
            )
        size = path.stat().st_size
        if size != entry.bytes:
            raise PackageError(
                f"Package file {path} has {size} bytes, but the manifest records {entry.bytes}.",
                "The file is truncated or was replaced; copy the package again or export it again.",
            )
        if verify_checksums:
            digest = file_sha256(path)
            if digest != entry.sha256:
                raise PackageError(
                    f"Checksum mismatch for package file {path}: SHA-256 is {digest}, "
                    f"but the manifest records {entry.sha256}.",
                    "The file is damaged or was modified; copy the package again or export it again.",
                )


def _resolve_package_path(package_dir: Path, relative: str) -> Path:
    try:
        return resolve_inside(package_dir, relative)
    except EdgemmError as error:
        raise PackageError(error.message, error.hint) from error


def _check_format(checker: "_Checker", data: dict[str, Any]) -> None:
    name = checker.require(data, "format", str)
    if name != FORMAT_NAME:
        checker.fail(f"'format' is {name!r}, expected {FORMAT_NAME!r}")
    version = checker.require(data, "format_version", int)
    if version > FORMAT_VERSION:
        written_by = data.get("edgemm_version", "a newer edgemm")
        raise PackageError(
            f"{checker.source} has format version {version} (written by edgemm {written_by}), "
            f"but this edgemm {__version__} reads only format version {FORMAT_VERSION}.",
            "Upgrade edgemm (pip install --upgrade edgemm) to load this package.",
        )
    if version < 1:
        checker.fail(f"'format_version' is {version}, expected {FORMAT_VERSION}")


def _check_graphs(checker: "_Checker", data: dict[str, Any], kind: str) -> dict[str, str]:
    graphs = checker.require(data, "graphs", dict)
    for name, relative in graphs.items():
        if name not in KNOWN_GRAPHS:
            checker.fail(f"'graphs' has an unknown entry {name!r}, expected some of {list(KNOWN_GRAPHS)}")
        checker.require_type(relative, str, f"'graphs.{name}'")
    for name in REQUIRED_GRAPHS[kind]:
        if name not in graphs:
            checker.fail(f"a {kind} package needs 'graphs.{name}', which is missing")
    return dict(graphs)


def _check_inputs(checker: "_Checker", data: dict[str, Any]) -> InputSpec:
    inputs = checker.require(data, "inputs", dict)
    try:
        return InputSpec.from_dict(inputs)
    except EdgemmError as error:
        checker.fail(f"'inputs' is not a valid input spec ({error.message})")
    raise AssertionError("unreachable")


def _check_outputs(checker: "_Checker", data: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    outputs = checker.require(data, "outputs", dict)
    for name, description in outputs.items():
        checker.require_type(description, dict, f"'outputs.{name}'")
        shape = checker.require(description, "shape", list, f"outputs.{name}.")
        for dim in shape:
            if not isinstance(dim, (str, int)) or isinstance(dim, bool):
                checker.fail(f"'outputs.{name}.shape' contains {dim!r}, expected names or integers")
    for name in DEFAULT_OUTPUTS[kind]:
        if name not in outputs:
            checker.fail(f"a {kind} package needs 'outputs.{name}', which is missing")
    return {name: dict(description) for name, description in outputs.items()}


def _check_labels(checker: "_Checker", data: dict[str, Any], kind: str) -> list[str]:
    labels = checker.optional(data, "labels", list, [])
    for label in labels:
        checker.require_type(label, str, "each entry of 'labels'")
    if len(set(labels)) != len(labels):
        checker.fail(f"'labels' contains duplicates: {labels}")
    if kind == "fusion_classifier" and len(labels) < 2:
        checker.fail(f"a fusion_classifier needs at least 2 'labels', got {labels}")
    return list(labels)


def _check_threshold(checker: "_Checker", data: dict[str, Any]) -> float | None:
    threshold = checker.optional_number(data, "decision_threshold")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        checker.fail(f"'decision_threshold' is {threshold}, expected a probability between 0 and 1")
    return threshold


def _check_samples(checker: "_Checker", data: dict[str, Any], files: dict[str, FileEntry]) -> dict[str, Any]:
    samples = checker.optional(data, "samples", dict, {})
    for key in ("texts", "images"):
        values = checker.optional(samples, key, list, [], prefix="samples.")
        for value in values:
            checker.require_type(value, str, f"each entry of 'samples.{key}'")
    for image in samples.get("images") or []:
        if image not in files:
            checker.fail(f"'files' has no entry for the sample image {image}, so its checksum cannot be verified")
    return samples


def _check_files(checker: "_Checker", data: dict[str, Any]) -> dict[str, FileEntry]:
    files = checker.require(data, "files", dict)
    entries = {}
    for name, entry in files.items():
        checker.require_type(entry, dict, f"'files.{name}'")
        digest = checker.require(entry, "sha256", str, f"files.{name}.")
        if not _SHA256_PATTERN.match(digest):
            checker.fail(f"'files.{name}.sha256' is {digest!r}, expected 64 lower-case hex digits")
        size = checker.require(entry, "bytes", int, f"files.{name}.")
        if size < 0:
            checker.fail(f"'files.{name}.bytes' is {size}, expected a size of 0 or more")
        _resolve_package_path(checker.source.parent, name)
        entries[name] = FileEntry(sha256=digest, bytes=size)
    return entries


class _Checker:
    """Field checks that raise one `PackageError` naming the manifest and the field."""

    def __init__(self, source: Path):
        self.source = source

    def fail(self, problem: str) -> None:
        raise PackageError(
            f"Invalid manifest {self.source}: {problem}.",
            "Export the package again with `edgemm export`, or fix the field by hand.",
        )

    def require_type(self, value: Any, expected: type, what: str) -> None:
        # bool is a subclass of int, but true/false is never a valid count or version.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            self.fail(f"{what} must be {_type_name(expected)}, got {type(value).__name__} {value!r}")

    def require(self, data: dict[str, Any], key: str, expected: type, prefix: str = "") -> Any:
        if key not in data:
            self.fail(f"required field '{prefix}{key}' is missing")
        self.require_type(data[key], expected, f"'{prefix}{key}'")
        return data[key]

    def require_choice(self, data: dict[str, Any], key: str, choices: Sequence[str]) -> str:
        value = self.require(data, key, str)
        if value not in choices:
            self.fail(f"'{key}' is {value!r}, expected one of {list(choices)}")
        return value

    def optional(self, data: dict[str, Any], key: str, expected: type, default: Any, prefix: str = "") -> Any:
        if data.get(key) is None:
            return default
        self.require_type(data[key], expected, f"'{prefix}{key}'")
        return data[key]

    def optional_number(self, data: dict[str, Any], key: str) -> float | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(f"'{key}' must be a finite number or null, got {value!r}")
        return float(value)


def _type_name(expected: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer"}.get(
        expected, expected.__name__
    )
