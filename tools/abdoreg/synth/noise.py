"""Smooth random fields for the anatomy generator (label fields, textures, bias, deformation).

A Gaussian lattice about four nodes per feature is upsampled linearly, smoothed there (cheap, at a
coarse size) and interpolated trilinearly to the grid: smooth enough at any grid size, about ten
times faster than the phantom's cubic-spline fields on a full-size grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def fields(rng: np.random.Generator, n: int, shape, spacing, wavelength_mm: float) -> np.ndarray:
    """``n`` smooth random fields of unit standard deviation whose features are about ``wavelength_mm`` wide."""
    shape = tuple(int(s) for s in shape)
    lattice = tuple(max(2, int(round(s * sp / wavelength_mm))) for s, sp in zip(shape, spacing, strict=True))
    out = np.empty((n, *shape), np.float32)
    for k in range(n):
        coarse = rng.standard_normal(lattice).astype(np.float32)
        mid_shape = tuple(min(s, 4 * m) for s, m in zip(shape, lattice, strict=True))
        t = torch.from_numpy(coarse)[None, None]
        mid = F.interpolate(t, size=mid_shape, mode="trilinear", align_corners=True)[0, 0].numpy()
        mid = ndimage.gaussian_filter(mid, [ms / (2.0 * m) for ms, m in zip(mid_shape, lattice, strict=True)])
        mid = (mid - mid.mean()) / max(float(mid.std()), 1e-6)
        t = torch.from_numpy(np.ascontiguousarray(mid, np.float32))[None, None]
        out[k] = F.interpolate(t, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    return out
