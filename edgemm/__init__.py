"""edgemm: compressed edge inference for text-image fusion models.

This module must stay free of heavy imports: `import edgemm.runtime` runs on devices
that have onnxruntime, numpy and Pillow but no torch.
"""

__version__ = "0.1.0"
