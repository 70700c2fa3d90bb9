"""Torch-free device runtime: load a model package and run it with onnxruntime, numpy and Pillow.

    import edgemm.runtime
    model = edgemm.runtime.load("package/")
    model.predict("a dog runs on the beach", "photo.jpg").labels

`load`, `FusionModel`, `DualEncoderModel` and `Prediction` are imported on first use, so
`edgemm.runtime.manifest` and the preprocessing modules load without onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load", "FusionModel", "DualEncoderModel", "Prediction"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from edgemm.runtime import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
