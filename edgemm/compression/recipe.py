"""Compression recipes: one TOML file per deployment target (see the `export/` folder).

A recipe names the stages `edgemm compress` runs and their settings. Every key is checked
against the schema below, so a typo fails loudly instead of silently using a default.
Command-line options override recipe values with `section.key=value` pairs.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemm.errors import ConfigError

# Allowed keys per section and the Python types a value may have.
# A float key also accepts an int, because TOML writes `1` for 1.0.
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "target": {
        "name": (str,),
        "description": (str,),
        "cpu": (str,),
    },
    "prune": {
        "enabled": (bool,),
        "ratio": (float, int),
        "text_ratio": (float, int),
        "image_ratio": (float, int),
        "head_ratio": (float, int),
        "importance": (str,),
        "round_to": (int,),
        "prune_heads": (bool,),
        "global_pruning": (bool,),
        "iterative_steps": (int,),
        "calibration_batches": (int,),
        "keep_residual": (bool,),
    },
    "recover": {
        "enabled": (bool,),
        "epochs": (int,),
        "steps": (int,),
        "lr": (float, int),
        "batch_size": (int,),
        "temperature": (float, int),
        "alpha": (float, int),
        "pairing": (str,),
    },
    "quantize": {
        "mode": (str,),
        "per_channel": (bool,),
        "calibration_method": (str,),
        "percentile": (float, int),
        "op_types": (list,),
        "exclude_nodes": (list,),
        "text_mode": (str,),
        "image_mode": (str,),
        "pre_process": (bool,),
        "accuracy_fallback": (bool,),
        "reduce_range": (bool,),
        "activation_type": (str,),
        "weight_type": (str,),
    },
    "export": {
        "opset": (int,),
        "exporter": (str,),
    },
    "validate": {
        "split": (str,),
        "max_accuracy_drop": (float, int),
        "max_auc_drop": (float, int),
        "max_recall_drop": (float, int),
        "max_pairs": (int,),
    },
    "calibration": {
        "definition": (str,),
    },
    "input": {
        "image_size": (int,),
    },
}

QUANTIZE_MODES = ("none", "int8-static", "int8-dynamic", "fp16")
QUANT_TYPES = ("int8", "uint8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
IMPORTANCE_KINDS = ("magnitude", "taylor")
EXPORTERS = ("dynamo", "torchscript")
PAIRINGS = ("matrix", "pairs")
# The image towers downsample by 32, so a smaller crop leaves no feature map.
MIN_IMAGE_SIZE = 32


@dataclass
class Recipe:
    """A validated recipe: section name -> {key: value}."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: Path | None = None

    @property
    def name(self) -> str:
        return str(self.get("target", "name", self.source.stem if self.source else "default"))

    def get(self, section: str, key: str, default: Any = None) -> Any:
        return self.sections.get(section, {}).get(key, default)

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.sections.get(name, {}))

    def to_dict(self) -> dict[str, Any]:
        return {"source": str(self.source) if self.source else None, **self.sections}


def load_recipe(path: Path | str | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe file, then apply `overrides` ({"prune.ratio": 0.3, ...}).

    With `path=None` the recipe starts from `default_recipe()`.
    Raises `ConfigError` for a missing file, invalid TOML, an unknown section or key, or a bad value.
    """
    if path is None:
        recipe = default_recipe()
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Recipe {path} not found.", "Pass a TOML file such as export/x86-avx512-vnni.toml.")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"Recipe {path} is not valid TOML: {error}.") from error
        _check_keys(data, str(path))
        recipe = Recipe(sections={name: dict(values) for name, values in data.items()}, source=path)

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        _check_keys({section: {key: value}}, "the command line")
        recipe.sections.setdefault(section, {})[key] = value

    _check_values(recipe)
    return recipe


def default_recipe() -> Recipe:
    """Return the built-in recipe, used when no --recipe is given.

    Prune 30 % of the text tower's inner widths (heads and MLP, residual width kept), distil for
    two epochs with the image tower frozen, then dynamic INT8 on MatMul and Gather. Measured on
    the built-in demo (real towers, generated scenes): 0.34x the FP32 ONNX size, 1.5x faster at
    batch 1 on one thread, accuracy within the limit.
    """
    return Recipe(
        sections={
            "target": {"name": "default", "description": "Built-in default: portable settings for x86 and ARM64 CPUs."},
            "prune": {"enabled": True, "text_ratio": 0.3, "keep_residual": True, "importance": "magnitude", "round_to": 16, "prune_heads": True},
            "recover": {"enabled": True, "epochs": 2, "lr": 3e-4, "batch_size": 32, "temperature": 2.0, "alpha": 0.5, "pairing": "matrix"},
            "quantize": {"mode": "int8-dynamic", "op_types": ["MatMul", "Gather"], "per_channel": True},
            "export": {"opset": 18},
            "validate": {"split": "dev", "max_accuracy_drop": 1.0, "max_auc_drop": 0.01, "max_recall_drop": 2.0},
        }
    )


def _check_keys(data: dict[str, Any], where: str) -> None:
    for section, values in data.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"Unknown recipe section [{section}] in {where}.",
                f"Valid sections: {', '.join(sorted(SCHEMA))}.",
            )
        if not isinstance(values, dict):
            raise ConfigError(f"Recipe section [{section}] in {where} must be a table of key = value lines.")
        for key, value in values.items():
            allowed = SCHEMA[section]
            if key not in allowed:
                raise ConfigError(
                    f"Unknown recipe key {section}.{key} in {where}.",
                    f"Valid keys in [{section}]: {', '.join(sorted(allowed))}.",
                )
            types = allowed[key]
            # bool is a subclass of int, so reject it explicitly for numeric keys.
            if isinstance(value, bool) and bool not in types:
                raise ConfigError(f"Recipe key {section}.{key} in {where} must be a number, got {value!r}.")
            if not isinstance(value, types):
                expected = " or ".join(t.__name__ for t in types)
                raise ConfigError(f"Recipe key {section}.{key} in {where} must be {expected}, got {value!r}.")


def _check_values(recipe: Recipe) -> None:
    for key in ("ratio", "text_ratio", "image_ratio", "head_ratio"):
        value = recipe.get("prune", key)
        if value is not None and not 0.0 < float(value) < 1.0:
            raise ConfigError(
                f"Invalid prune ratio prune.{key}={value}: it must lie strictly between 0 and 1.",
                "Use e.g. 0.3 to remove 30 % of the channels, or skip pruning with --no-prune "
                "(prune.enabled = false in a recipe).",
            )
    size = recipe.get("input", "image_size")
    if size is not None and size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"Invalid image size {size} (--image-size, recipe key input.image_size): it must be at least {MIN_IMAGE_SIZE} pixels.",
            "Use the crop edge the compressed model should see, e.g. 192 for a model trained at 224.",
        )
    checks = [
        ("quantize", "mode", QUANTIZE_MODES),
        ("quantize", "text_mode", QUANTIZE_MODES),
        ("quantize", "image_mode", QUANTIZE_MODES),
        ("quantize", "calibration_method", CALIBRATION_METHODS),
        ("prune", "importance", IMPORTANCE_KINDS),
        ("recover", "pairing", PAIRINGS),
        ("quantize", "activation_type", QUANT_TYPES),
        ("quantize", "weight_type", QUANT_TYPES),
    ]
    for section, key, choices in checks:
        value = recipe.get(section, key)
        if value is not None and value not in choices:
            raise ConfigError(f"Invalid {section}.{key}={value!r}.", f"Choose one of: {', '.join(choices)}.")
    round_to = recipe.get("prune", "round_to")
    if round_to is not None and round_to not in (1, 4, 8, 16, 32):
        raise ConfigError(f"Invalid prune.round_to={round_to}.", "Use 8 or 16 so INT8 kernels stay vectorised.")
    for key in ("max_accuracy_drop", "max_auc_drop", "max_recall_drop"):
        value = recipe.get("validate", key)
        if value is not None and float(value) < 0:
            raise ConfigError(f"Invalid validate.{key}={value}: a drop limit cannot be negative.")
    exporter = recipe.get("export", "exporter")
    if exporter is not None and exporter not in EXPORTERS:
        raise ConfigError(f"Invalid export.exporter={exporter!r}.", f"Choose one of: {', '.join(EXPORTERS)}.")
    # The opset range depends on the installed torch and onnxruntime, so the pipeline checks it
    # with edgemm.compression.export_onnx.check_opset before any work starts.
