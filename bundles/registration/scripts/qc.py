"""Quality-control figure of one registered pair (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scripts.atomic import atomic_write  # noqa: E402


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """2D checkerboard of two slices (alternating square tiles)."""
    size = max(1, min(a.shape) // tiles)
    ii, jj = np.indices(a.shape)
    return np.where(((ii // size) + (jj // size)) % 2 == 0, a, b)


def _slices(vol: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Three orthogonal planes through ``centre``, rotated so the first voxel axis runs left-right."""
    i, j, k = centre
    return [np.rot90(vol[:, :, k]), np.rot90(vol[:, j, :]), np.rot90(vol[i, :, :])]


def qc_figure(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    inner_det: np.ndarray,
    path: str | os.PathLike,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    window: tuple[float, float] = (-200.0, 300.0),
    title: str = "",
) -> Path:
    """Write a PNG: rows = axial-like/coronal-like/sagittal-like planes (voxel axes 2, 1, 0);
    columns = fixed, moving, warped, checkerboard fixed/warped, |fixed - warped|, Jacobian determinant.
    ``inner_det``: the field's ``metrics.jacobian_determinant`` (2-voxel border cropped; 1 is shown there).
    """
    det = np.ones(fixed.shape, np.float32)
    if min(fixed.shape) > 4:
        det[2:-2, 2:-2, 2:-2] = inner_det
    centre = tuple(int(s) // 2 for s in fixed.shape)
    lo, hi = window
    columns = [
        ("fixed", fixed, dict(cmap="gray", vmin=lo, vmax=hi)),
        ("moving", moving, dict(cmap="gray", vmin=lo, vmax=hi)),
        ("warped", warped, dict(cmap="gray", vmin=lo, vmax=hi)),
        ("checkerboard", None, dict(cmap="gray", vmin=lo, vmax=hi)),
        (
            "|fixed - warped|",
            np.abs(np.clip(fixed, lo, hi) - np.clip(warped, lo, hi)),
            dict(cmap="magma", vmin=0, vmax=hi - lo),
        ),
        ("Jacobian det.", det, dict(cmap="RdBu_r", vmin=0.0, vmax=2.0)),
    ]
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    fig, axes = plt.subplots(3, len(columns), figsize=(2.6 * len(columns), 7.8), squeeze=False)
    fixed_planes, warped_planes = _slices(fixed, centre), _slices(warped, centre)
    for col, (name, vol, style) in enumerate(columns):
        planes = (
            [checkerboard(f, w) for f, w in zip(fixed_planes, warped_planes, strict=True)]
            if vol is None
            else _slices(vol, centre)
        )
        for row, plane in enumerate(planes):
            ax = axes[row, col]
            im = ax.imshow(plane, aspect=aspects[row], interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
        if name.startswith("Jacobian"):
            fig.colorbar(im, ax=axes[:, col].tolist(), shrink=0.6)
    folds = float(np.mean(det <= 0))
    fig.suptitle(f"{title}  (folded voxels: {folds:.2%})", fontsize=10)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80))
    finally:
        plt.close(fig)
