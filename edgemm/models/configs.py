"""Shared helper for the config dataclasses of towers and heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from edgemm.errors import ConfigError

ConfigT = TypeVar("ConfigT")


def dataclass_from_dict(cls: type[ConfigT], data: Mapping[str, Any], kind: str) -> ConfigT:
    """Build the dataclass `cls` from `data`, raising ConfigError that lists unknown keys.

    `kind` names the config in messages, e.g. "text tower" or "concat_fusion head".
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"The {kind} config must be a JSON object, got {data!r}.", "Write it as a dict of fields.")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"Unknown {kind} config keys: {unknown}.", f"Valid keys are {sorted(known)}.")
    try:
        return cls(**dict(data))
    except TypeError as error:
        raise ConfigError(f"Invalid {kind} config {dict(data)}: {error}.", f"Valid keys are {sorted(known)}.") from error
