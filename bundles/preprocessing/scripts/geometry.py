"""Reading scans and moving them onto the target grid, by their affines (never by array flips).

Scans are read with MONAI's ``LoadImage`` (nibabel for NIfTI, ITK for DICOM series), which
gives arrays with RAS affines. ANTs, which works in LPS physical space, aligns each scan to
the reference and resamples it onto the target grid in one interpolation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ants
import numpy as np
from monai.transforms import LoadImage

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


class CaseError(Exception):
    """A case that cannot be preprocessed; the message names the file and the reason."""


@dataclass
class Volume:
    array: np.ndarray  # (X, Y, Z)
    affine: np.ndarray  # 4x4, RAS


def read_volume(path: Path, what: str = "image") -> Volume:
    """Read a NIfTI file or DICOM series folder; reject unreadable, non-3D or non-finite data."""
    path = Path(path)
    if not path.exists():
        raise CaseError(f"{path}: missing {what} file")
    reader = "ITKReader" if path.is_dir() or path.suffix.lower() == ".dcm" else "NibabelReader"
    try:
        data = LoadImage(reader=reader, image_only=True, dtype=np.float32)(str(path))
    except Exception as exc:  # nibabel/ITK raise many types for truncated or foreign files
        raise CaseError(f"{path}: unreadable or truncated {what} ({type(exc).__name__}: {exc})") from exc
    array = np.asarray(data)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise CaseError(f"{path}: expected a 3D {what}, got shape {tuple(array.shape)}")
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise CaseError(f"{path}: {what} has {bad} NaN or infinite voxels")
    return Volume(array, np.asarray(data.affine, dtype=np.float64))


def to_ants(vol: Volume) -> ants.ANTsImage:
    """ANTs image (LPS physical space) of a RAS-affine volume."""
    lps = RAS_TO_LPS @ vol.affine[:3, :4]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    direction = lps[:, :3] / spacing
    return ants.from_numpy(
        np.ascontiguousarray(vol.array, dtype=np.float32),
        origin=tuple(lps[:, 3]),
        spacing=tuple(spacing),
        direction=direction,
    )


def target_affine(orientation: np.ndarray, spacing, shape, center_ras: np.ndarray) -> np.ndarray:
    """RAS affine of a grid with unit axis directions ``orientation`` (3x3 columns), centred on ``center_ras``."""
    aff = np.eye(4)
    aff[:3, :3] = orientation * np.asarray(spacing, float)
    aff[:3, 3] = center_ras - aff[:3, :3] @ ((np.asarray(shape, float) - 1) / 2.0)
    return aff


def grid_center(vol: Volume) -> np.ndarray:
    return (vol.affine @ np.append((np.asarray(vol.array.shape) - 1) / 2.0, 1.0))[:3]


def unit_axes(affine: np.ndarray) -> np.ndarray:
    rot = affine[:3, :3]
    return rot / np.linalg.norm(rot, axis=0)


def _for_alignment(img: ants.ANTsImage, spacing) -> ants.ANTsImage:
    """Resampled to the target spacing, air at 0 and bone capped, so centre of mass ~ body centroid."""
    res = ants.resample_image(img, tuple(float(s) for s in spacing), use_voxels=False, interp_type=0)
    return ants.from_numpy(
        np.clip(res.numpy(), -1000.0, 1000.0) + 1000.0,
        origin=res.origin,
        spacing=res.spacing,
        direction=res.direction,
    )


def make_reproducible(seed: int = 1, deterministic: bool = True) -> None:
    """Make this process's ANTs alignments repeat exactly: a fixed seed for the metric's random sampling (a
    positive one: ANTs seeds from the clock for 0), and ITK on one thread (its multithreaded metric sums differ
    from run to run in the last bits, which moved a KiTS case's translation by up to 50 mm here). ITK reads the
    thread count once per process, at its first registration, so call this before it (a worker process calls it
    when it starts). ``deterministic=False`` keeps the clock seed and ITK's threads (not repeatable)."""
    if not deterministic:
        ants.config._random_seed = None
        return
    if int(seed) <= 0:
        raise ValueError(f"seed {seed}: a positive integer (ANTs seeds from the clock for 0)")
    ants.config._random_seed = int(seed)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"


def align(moving: ants.ANTsImage, reference: ants.ANTsImage, spacing, transform: str, **kwargs) -> list[str]:
    """ANTs transform files mapping reference points into the moving scan (``Translation``/``Rigid``/``Affine``);
    repeatable after ``make_reproducible``."""
    kinds = {"translation": "Translation", "rigid": "Rigid", "affine": "Affine"}
    if "random_seed" in kwargs:  # a seed among the registration settings: the metric's sampling seed
        ants.config._random_seed = int(kwargs.pop("random_seed"))
    if transform not in kinds:
        raise ValueError(f"align must be one of none, {', '.join(kinds)}; got {transform!r}")
    reg = ants.registration(
        fixed=_for_alignment(reference, spacing),
        moving=_for_alignment(moving, spacing),
        type_of_transform=kinds[transform],
        **kwargs,
    )
    return reg["fwdtransforms"]


def identity_transform(folder: Path) -> list[str]:
    """An identity transform file (ANTsPy's apply_transforms takes files, and no fill value without one)."""
    path = str(Path(folder) / "identity.mat")
    ants.write_transform(ants.new_ants_transform(dimension=3, transform_type="AffineTransform"), path)
    return [path]


def resample(
    moving: ants.ANTsImage,
    target_aff: np.ndarray,
    shape,
    transforms: list[str],
    interpolator: str,
    fill: float,
) -> np.ndarray:
    """Values of ``moving`` on the target grid through ``transforms``, ``fill`` outside the scan."""
    target = to_ants(Volume(np.zeros(tuple(int(s) for s in shape), np.float32), target_aff))
    out = ants.apply_transforms(
        fixed=target, moving=moving, transformlist=transforms, interpolator=interpolator, defaultvalue=fill
    )
    return out.numpy()


def translation_mm(transforms: list[str]) -> list[float] | None:
    """The translation part (RAS, mm) of an ANTs linear transform, for the case record."""
    if not transforms:
        return None
    tx = ants.read_transform(transforms[0])
    params = np.asarray(tx.parameters, float)
    return list(np.round((RAS_TO_LPS @ params[-3:]), 3))
