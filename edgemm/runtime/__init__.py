"""Torch-free device runtime: load a model package and run it with onnxruntime, numpy and Pillow."""
