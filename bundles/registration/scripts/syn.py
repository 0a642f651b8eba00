"""Classical baseline: ANTs SyN (antspyx) on the same pairs, written as Learn2Reg fields.

ANTs works in LPS physical space. ``ants.registration`` returns forward transforms (an affine and
a warp) that map fixed points into the moving image, i.e. the same pull-back as a Learn2Reg field.
We compose them into one physical displacement field on the fixed grid
(``ants.apply_transforms(..., compose=prefix)``) and convert it
to voxels with the fixed affine.

Reproducibility: antspyx 0.6 ignores a ``random_seed`` argument of ``ants.registration`` (it
reads the seed from ``ants.config``), and even seeded, ANTs' multithreaded metric sums differ
from run to run (measured here on a tiny pair: fields of identical calls differed by up to 1-2
voxels, unseeded on 1 thread or seeded on 2). ``make_reproducible`` seeds ANTs and sets ITK to one thread; ITK reads the
thread count once per process, at its first registration, so it must come before that.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import ants
import numpy as np

from scripts.atomic import scratch
from scripts.fields import RAS_TO_LPS, world_to_voxel

logger = logging.getLogger("registration.syn")
_registered = False  # whether ITK already ran a registration (and fixed its thread count) here


def make_reproducible(seed: int | None, deterministic: bool = True) -> None:
    """Seed ANTs and run ITK on one thread, so that the same pair gives the same field every run.

    ``deterministic=False`` (or no seed) leaves ANTs unseeded on ITK's default threads: faster on
    several cores, but every run gives a slightly different field.
    """
    if seed is None or not deterministic:
        return
    if ants.config._deterministic and ants.config._random_seed == int(seed):
        return
    if _registered:
        logger.warning("ANTs already ran in this process with its thread count: runs may not be reproducible")
    ants.config.set_ants_deterministic(True, int(seed))  # seed + ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1


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
    fixed: ants.ANTsImage, transforms: list[str], fixed_affine: np.ndarray, folder: str | os.PathLike
) -> np.ndarray:
    """Learn2Reg voxel field (D, H, W, 3) equal to the chain of ANTs forward ``transforms`` on the fixed grid
    (the composed transform is written into ``folder``)."""
    path = ants.apply_transforms(
        fixed=fixed, moving=fixed, transformlist=transforms, compose=str(Path(folder) / "composite_")
    )
    disp_lps = ants.image_read(path).numpy()  # (X, Y, Z, 3), LPS mm, fixed point -> moving point
    disp_ras = disp_lps @ RAS_TO_LPS.T
    return world_to_voxel(disp_ras, fixed_affine).astype(np.float32)


def register_pair(
    fixed: np.ndarray,
    moving: np.ndarray,
    fixed_affine: np.ndarray,
    moving_affine: np.ndarray,
    clip_hu: tuple[float, float] | None = (-1000.0, 1500.0),
    deterministic: bool = True,
    temp_dir: str | os.PathLike | None = None,
    **registration_kwargs,
) -> tuple[np.ndarray, float]:
    """Run ``ants.registration`` (parameters from the config) and return (voxel field, seconds).

    A ``random_seed`` among the parameters is applied by ``make_reproducible`` (``ants.registration``
    would ignore it), on one ITK thread unless not ``deterministic``. The transforms ANTs writes (a warp, its
    inverse and an affine per pair: hundreds of MB at full size) go into a hidden folder of ``temp_dir`` (the
    run's output folder; the system's temp folder if None) that is removed after the pair, also on failure.
    """
    global _registered
    make_reproducible(registration_kwargs.pop("random_seed", None), deterministic)
    if clip_hu is not None:
        fixed, moving = np.clip(fixed, *clip_hu), np.clip(moving, *clip_hu)
    fx, mv = to_ants(fixed, fixed_affine), to_ants(moving, moving_affine)
    with scratch(temp_dir or tempfile.gettempdir()) as folder:
        start = time.perf_counter()
        reg = ants.registration(fixed=fx, moving=mv, outprefix=f"{folder}/", **registration_kwargs)
        _registered = True
        field = composite_to_voxel_field(fx, reg["fwdtransforms"], fixed_affine, folder)
        return field, time.perf_counter() - start
