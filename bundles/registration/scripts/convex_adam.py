"""Classical baseline: ConvexAdam (Siebert, Hansen, Heinrich), through its reference implementation.

The ``convexadam`` package (Apache-2.0, by the method's authors; needs SimpleITK and scikit-learn, no
network access) is wrapped rather than reimplemented: its ``convex_adam_pt`` is the code that ranked
first on Learn2Reg AbdomenCTCT. It computes MIND-SSC features, a coupled convex discrete optimisation
on a coarse grid (``grid_sp``), an inverse-consistency step and about 80 Adam iterations of instance
optimisation at half resolution (``grid_sp_adam``), and returns a displacement field in voxels of
the fixed grid, ``(D, H, W, 3)``, pointing into the moving image: the Learn2Reg convention, as it
was written for the challenge.
"""

from __future__ import annotations

import time

import numpy as np
import torch

__all__ = ["register_pair"]


def register_pair(
    fixed: np.ndarray,
    moving: np.ndarray,
    clip_hu: tuple[float, float] | None = (-1000.0, 1500.0),
    device: torch.device | str = "cpu",
    **params,
) -> tuple[np.ndarray, float]:
    """Run ConvexAdam (parameters from the config) on two scans of one grid; (voxel field, seconds).

    On CPU the computation is float32 (the package would fall back to it with a printed warning);
    on CUDA it is the package's default float16.
    """
    from convexAdam.convex_adam_MIND import convex_adam_pt  # only this stage needs the package

    if fixed.shape != moving.shape:
        raise ValueError(f"ConvexAdam needs both scans on one grid, got {fixed.shape} and {moving.shape}")
    if clip_hu is not None:
        fixed, moving = np.clip(fixed, *clip_hu), np.clip(moving, *clip_hu)
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    field = convex_adam_pt(
        torch.as_tensor(np.ascontiguousarray(fixed), dtype=torch.float32),
        torch.as_tensor(np.ascontiguousarray(moving), dtype=torch.float32),
        device=device,
        dtype=dtype,
        **params,
    )
    return np.asarray(field, np.float32), time.perf_counter() - start
