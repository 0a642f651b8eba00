"""Loading one pair and putting both scans (and labels) on the model grid, from the affines.

Used by every stage that registers pairs (inference, evaluation, classical baselines), so that
all methods see exactly the same arrays.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    LoadImage,
    MapTransform,
    Orientationd,
    ResampleToMatchd,
    ResizeWithPadOrCropd,
    ShiftIntensityd,
    Spacingd,
)

from scripts.inputs import IMAGE_KEYS, InputError

__all__ = [
    "SEG",
    "PSEUDO",
    "LOADED",
    "LoadScand",
    "AlignCentersd",
    "CheckSameGridd",
    "grid_distance_mm",
    "load_pair_transforms",
]

# Inside the pipeline labels and paths get names that do not start with "fixed_"/"moving_": MONAI's
# Spacingd treats every "<key>_*" entry as a meta dict of <key>.
SEG = {"fixed": "seg_fixed", "moving": "seg_moving"}
# Predicted (pseudo) labels, read only by test-time instance optimisation; metrics read SEG.
PSEUDO = {"fixed": "pseudo_fixed", "moving": "pseudo_moving"}
LOADED = {
    "fixed": "fixed",
    "moving": "moving",
    "fixed_label": SEG["fixed"],
    "moving_label": SEG["moving"],
    "fixed_pseudo": PSEUDO["fixed"],
    "moving_pseudo": PSEUDO["moving"],
}


class LoadScand(MapTransform):
    """Load scans as channel-first MetaTensors, rejecting unreadable, non-3D or non-finite data by file name."""

    def __init__(self, keys: Sequence[str] = tuple(LOADED), allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not os.path.isfile(str(path)):
                raise InputError(f"{path}: {key} file not found")
            try:
                img = self.loader(str(path))
            except Exception as exc:  # readers raise many types for truncated or foreign files
                raise InputError(f"{path}: unreadable {key} ({type(exc).__name__}: {exc})") from exc
            while img.ndim > 4 and img.shape[-1] == 1:
                img = img[..., 0]
            if img.ndim != 4 or img.shape[0] != 1 or min(img.shape[1:]) < 2:
                raise InputError(f"{path}: expected a 3D single-channel {key}, got shape {tuple(img.shape)}")
            bad = int(img.numel() - torch.isfinite(img).sum())
            if bad:
                raise InputError(f"{path}: {key} has {bad} NaN or infinite voxels")
            del d[key]
            d[LOADED.get(key, key)] = img
            d[f"path_{LOADED.get(key, key)}"] = str(path)
        return d


class AlignCentersd(MapTransform):
    """Translate the moving scan's affine so its centre meets the fixed scan's (records the shift).

    Scans of different patients sit at arbitrary scanner coordinates; without this a moving scan
    can fall outside the fixed field of view. The shift is part of the transform we write. Applied
    to the scans as loaded: the centres are those of the original geometry in world coordinates
    (after resampling and padding the fixed grid's centre moves by up to a voxel).
    """

    def __init__(
        self, keys: Sequence[str] = ("moving", SEG["moving"], PSEUDO["moving"]), ref_key: str = "fixed"
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.ref_key = ref_key

    @staticmethod
    def _centre(img: MetaTensor) -> np.ndarray:
        aff = np.asarray(img.affine, np.float64)
        return (aff @ np.append((np.asarray(img.shape[1:]) - 1) / 2.0, 1.0))[:3]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shift = self._centre(d[self.ref_key]) - self._centre(d["moving"])
        for key in self.key_iterator(d):
            aff = d[key].affine.clone()
            aff[:3, 3] += torch.as_tensor(shift, dtype=aff.dtype)
            d[key].affine = aff
        d["world_shift"] = torch.as_tensor(shift, dtype=torch.float64)
        return d


def _describe_grid(img: MetaTensor) -> str:
    aff = np.asarray(img.affine, np.float64)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    codes = "".join(nib.orientations.aff2axcodes(aff))
    return (
        f"shape {tuple(img.shape[1:])}, spacing {tuple(np.round(spacing, 3).tolist())} mm, {codes}, "
        f"origin {tuple(np.round(aff[:3, 3], 2).tolist())}"
    )


def grid_distance_mm(a: MetaTensor, b: MetaTensor) -> float:
    """Largest distance (mm) between the world positions the two grids give the same corner voxel.

    One number for every part of the geometry: spacing, direction and origin (inf if shapes differ).
    """
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        return float("inf")
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in a.shape[1:]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    diff = (np.asarray(a.affine, np.float64) - np.asarray(b.affine, np.float64)) @ corners
    return float(np.linalg.norm(diff[:3], axis=0).max())


class CheckSameGridd(MapTransform):
    """Preprocessed inputs: every scan of the pair must already be on the fixed scan's grid.

    Registration is then array to array, which is right only when the arrays share the whole
    geometry (shape, spacing, direction, origin); scans of the same shape stored LPS and RAS
    would otherwise be registered mirrored.
    """

    def __init__(
        self, keys: Sequence[str], tolerance_mm: float = 0.1, allow_missing_keys: bool = True
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.tolerance_mm = float(tolerance_mm)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        ref = d["fixed"]
        for key in self.key_iterator(d):
            dist = grid_distance_mm(d[key], ref)
            if dist > self.tolerance_mm:
                raise InputError(
                    f"{d.get(f'path_{key}', key)} ({_describe_grid(d[key])}) is not on the grid of the fixed scan "
                    f"{d.get('path_fixed', '')} ({_describe_grid(ref)}); preprocessed pairs are registered array "
                    "to array: pass preprocessed=False to resample from the affines"
                    + (f" (grids differ by up to {dist:.3g} mm)" if np.isfinite(dist) else "")
                )
        return d


def load_pair_transforms(
    preprocessed: bool = True,
    pixdim: Sequence[float] = (2.0, 2.0, 2.0),
    spatial_size: Sequence[int] = (192, 160, 256),
    axcodes: str | None = None,
    align_centers: bool = True,
    pad_value: float = -1024.0,
    grid_tolerance_mm: float = 0.1,
) -> list:
    """Load a pair and put both scans (and labels) on the model grid, from the affines.

    Raw scans: the fixed scan is reoriented (``axcodes``; None keeps its own), resampled to
    ``pixdim`` and centre-cropped/padded to ``spatial_size`` with ``pad_value``; the moving scan
    (and labels) is resampled once onto that grid with ``ResampleToMatchd``. ``ResampleToMatch``
    pads with zeros, so images are shifted by ``-pad_value`` around it to pad with air. Centres are
    aligned on the scans as loaded. Preprocessed scans must share the fixed grid within
    ``grid_tolerance_mm``.
    """
    xforms: list = [LoadScand()]
    if preprocessed:
        return [*xforms, CheckSameGridd(["moving", *SEG.values(), *PSEUDO.values()], grid_tolerance_mm)]
    if align_centers:
        xforms.append(AlignCentersd())
    if axcodes:
        xforms.append(
            Orientationd(["fixed", SEG["fixed"], PSEUDO["fixed"]], axcodes=axcodes, allow_missing_keys=True)
        )
    xforms += [
        Spacingd(
            ["fixed", SEG["fixed"], PSEUDO["fixed"]],
            pixdim=pixdim,
            mode=["bilinear", "nearest", "nearest"],
            allow_missing_keys=True,
        ),
        ShiftIntensityd(IMAGE_KEYS, offset=-pad_value),
        ResizeWithPadOrCropd(
            ["fixed", SEG["fixed"], PSEUDO["fixed"]], spatial_size=spatial_size, allow_missing_keys=True
        ),
    ]
    xforms += [
        ResampleToMatchd(
            ["moving", SEG["moving"], PSEUDO["moving"]],
            key_dst="fixed",
            mode=["bilinear", "nearest", "nearest"],
            padding_mode="zeros",
            dtype=np.float32,
            allow_missing_keys=True,
        ),
        ShiftIntensityd(IMAGE_KEYS, offset=pad_value),
    ]
    return xforms
