"""Classical baseline: ANTs SyN (antspyx) on the same pairs, written as Learn2Reg fields.

ANTs works in LPS physical space. ``ants.registration`` returns forward transforms (an affine and
a warp) that map fixed points into the moving image, i.e. the same pull-back as a Learn2Reg field.
We compose them into one physical displacement field on the fixed grid
(``ants.apply_transforms(..., compose=prefix)``) and convert it
to voxels with the fixed affine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import ants
import numpy as np

from scripts.fields import RAS_TO_LPS, world_to_voxel


def to_ants(array: np.ndarray, affine: np.ndarray) -> ants.ANTsImage:
    """ANTs image (LPS physical space) of an array with a RAS affine."""
    lps = RAS_TO_LPS @ np.asarray(affine, np.float64)[:3, :4]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    return ants.from_numpy(
        np.ascontiguousarray(array, dtype=np.float32),
        origin=tuple(float(v) for v in lps[:, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=lps[:, :3] / spacing,
    )


def composite_to_voxel_field(
    fixed: ants.ANTsImage, transforms: list[str], fixed_affine: np.ndarray
) -> np.ndarray:
    """Learn2Reg voxel field (D, H, W, 3) equal to the chain of ANTs forward ``transforms`` on the fixed grid."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "composite_")
        path = ants.apply_transforms(fixed=fixed, moving=fixed, transformlist=transforms, compose=prefix)
        disp_lps = ants.image_read(path).numpy()  # (X, Y, Z, 3), LPS mm, fixed point -> moving point
    disp_ras = disp_lps @ RAS_TO_LPS.T
    return world_to_voxel(disp_ras, fixed_affine).astype(np.float32)


def register_pair(
    fixed: np.ndarray,
    moving: np.ndarray,
    fixed_affine: np.ndarray,
    moving_affine: np.ndarray,
    clip_hu: tuple[float, float] | None = (-1000.0, 1500.0),
    **registration_kwargs,
) -> tuple[np.ndarray, float]:
    """Run ``ants.registration`` (parameters from the config) and return (voxel field, seconds)."""
    if clip_hu is not None:
        fixed, moving = np.clip(fixed, *clip_hu), np.clip(moving, *clip_hu)
    fx, mv = to_ants(fixed, fixed_affine), to_ants(moving, moving_affine)
    start = time.perf_counter()
    reg = ants.registration(fixed=fx, moving=mv, **registration_kwargs)
    field = composite_to_voxel_field(fx, reg["fwdtransforms"], fixed_affine)
    return field, time.perf_counter() - start
