"""Label maps hold whole organ ids 0..max_label; anything else is an error naming the file and the ids.

A uint8 cast would wrap id 262 into 6, and an id above the organs silently drops an organ from the Dice (or
breaks a one-hot loss). ``CheckLabelsd`` checks label maps right after loading; ``label_map`` is the check
itself, for code that reads label maps without a transform chain.

A shared copy: the registration and segmentation bundles hold the same file (``tests/test_layout.py`` keeps them
equal), so it imports only its bundle's ``errors`` and libraries.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.errors import InputError

__all__ = ["label_map", "CheckLabelsd"]


def label_map(labels: Any, max_label: int, source: object) -> np.ndarray:
    """``labels`` as a uint8 array of organ ids, after checking that every voxel is a whole id in
    0..``max_label``; an ``InputError`` naming ``source`` and the offending ids otherwise."""
    arr = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if arr.size and (arr.min() < 0 or arr.max() > max_label or not np.array_equal(arr, np.rint(arr))):
        values = np.unique(arr)
        bad = values[(values < 0) | (values > max_label) | (values != np.rint(values))]
        shown = ", ".join(f"{v:g}" for v in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise InputError(
            f"{source}: label ids {shown} are not organ ids 0..{max_label}: label maps hold the 13-organ "
            "scheme (the preprocessing bundle's output), one whole number per voxel"
        )
    return arr.astype(np.uint8)


class CheckLabelsd(MapTransform):
    """Refuse label maps with ids outside 0..``max_label`` (or not whole numbers), naming the file; the data
    pass unchanged."""

    def __init__(self, keys: KeysCollection, max_label: int = 13, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_label = int(max_label)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", None) or {}
            label_map(d[key], self.max_label, meta.get("filename_or_obj") or key)
        return d
