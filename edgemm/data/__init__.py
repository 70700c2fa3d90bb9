"""Datasets of image-text pairs: loading, captions import, matching pairs, synthetic scenes, augmentation.

Everything here except `edgemm.data.torch_data` is torch-free.
"""

from edgemm.data.matching import group_by_image, make_matching_pairs
from edgemm.data.records import Record, load_dataset, write_dataset

__all__ = ["Record", "group_by_image", "load_dataset", "make_matching_pairs", "write_dataset"]
