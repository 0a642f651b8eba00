"""Transforms shared by every stage: CT windowing of the network inputs."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["ct_window", "CTWindowd"]


def ct_window(img: torch.Tensor, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """(1, *spatial) HU -> (len(windows), *spatial) in [0, 1], one channel per (width, level) window."""
    img = torch.as_tensor(img).float()
    chans = [((img - (level - width / 2.0)) / width).clamp(0.0, 1.0) for width, level in windows]
    return torch.cat(chans, dim=0)


class CTWindowd(MapTransform):
    """Replace each HU image by its windowed channels (kept as MetaTensor where the input is one)."""

    def __init__(
        self, keys: KeysCollection, windows: Sequence[Sequence[float]], allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.windows = [tuple(float(v) for v in w) for w in windows]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = ct_window(d[key], self.windows)
        return d
