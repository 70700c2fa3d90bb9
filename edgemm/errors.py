"""Exceptions that the CLI reports as one clear line instead of a traceback.

Every message names the offending value (a path, an option, a field) and how to fix it.
"""


class EdgemmError(Exception):
    """Base class for errors caused by the user's input, files or settings."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} {hint}")


class InputError(EdgemmError):
    """Invalid text or image given to a model or a command."""


class DataError(EdgemmError):
    """A dataset, captions file or calibration set is missing, malformed or empty."""


class CheckpointError(EdgemmError):
    """A checkpoint folder is incomplete, inconsistent or unsafe to load."""


class PackageError(EdgemmError):
    """A model package fails validation: manifest, checksums, graph or opset."""


class ConfigError(EdgemmError):
    """A recipe, calibration definition or option has an invalid value."""


class CompressionError(EdgemmError):
    """A compression stage cannot run on this model (e.g. pruning cannot trace it)."""


class AccuracyError(EdgemmError):
    """A compressed model lost more accuracy than the user's limit allows."""

    exit_code = 3
