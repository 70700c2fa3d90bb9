"""The `edgemm` command line. Each command lives in its own module with a `register(app)`.

Command modules import torch and other heavy libraries inside the command body, so that
`edgemm bench`, `edgemm run` and `edgemm inspect` work on a device without torch.
"""
