"""Displacement-field formats: MONAI ddf, Learn2Reg field, ITK/ANTs displacement transform.

All three describe the same pull-back mapping from the fixed grid into the moving image:

* ``ddf`` (MONAI's name): torch (3, D, H, W) [or (B, 3, D, H, W)], voxel units,
  ``warped(x) = moving(x + ddf(x))`` (``monai.networks.blocks.Warp``). Inference computes everything on it.
* ``field`` (Learn2Reg): numpy (D, H, W, 3), voxel units on the fixed grid, same mapping with scipy
  ``map_coordinates`` (ij indexing); float16 or float32, NIfTI or npz: the layout of the files only.
* ITK displacement field: physical mm in ITK's LPS frame, defined at the fixed grid's points:
  ``T(p) = p + d(p)`` maps a fixed point to the moving point, which is what
  ``itk.DisplacementFieldTransform``, ``antsApplyTransforms`` and 3D Slicer expect.

The physical conversion uses the fixed image's affine (and, for scans resampled with a shifted
moving affine, that world shift), never array flips.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.networks.blocks import Warp

from scripts.atomic import atomic_write

try:  # ISA-L's gzip (the isal package): the same stream as the standard library's, ten times faster
    from isal.igzip import compress as gzip_compress
except ImportError:  # without it the standard library writes the same files, slower
    from gzip import compress as gzip_compress

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
L2R_NAME = re.compile(r"^(?P<name>.+)_(?P<subject>\d{4})_(?P<suffix>\d{4})\.nii(\.gz)?$")
FIELD_EXTS = (".nii.gz", ".npz")


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------
def scan_id(path: str | os.PathLike) -> tuple[str, str] | None:
    """(subject, suffix) of a Learn2Reg-style name ``NAME_XXXX_YYYY.nii.gz``, else None.

    The evaluator takes them from the last 16 characters (``[-16:-12]`` and ``[-11:-7]``).
    """
    name = Path(str(path)).name
    if not L2R_NAME.match(name) or not name.endswith(".nii.gz"):
        return None
    return name[-16:-12], name[-11:-7]


def _stem(path: str | os.PathLike) -> str:
    name = Path(str(path)).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".npz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def pair_tag(fixed: str | os.PathLike, moving: str | os.PathLike, short: bool = False) -> str:
    """``FFFF_0000_MMMM_0000`` (or ``FFFF_MMMM``) for Learn2Reg names, ``<fixed stem>_<moving stem>`` otherwise."""
    f, m = scan_id(fixed), scan_id(moving)
    if f is None or m is None:
        return f"{_stem(fixed)}_{_stem(moving)}"
    return f"{f[0]}_{m[0]}" if short else f"{f[0]}_{f[1]}_{m[0]}_{m[1]}"


def field_name(
    fixed: str | os.PathLike, moving: str | os.PathLike, short: bool = False, ext: str = ".nii.gz"
) -> str:
    """Learn2Reg field file name: ``disp_FFFF_0000_MMMM_0000.nii.gz`` (``disp_FFFF_MMMM`` when ``short``)."""
    if ext not in FIELD_EXTS:
        raise ValueError(f"field extension must be one of {FIELD_EXTS}, got {ext!r}")
    return f"disp_{pair_tag(fixed, moving, short)}{ext}"


def find_field(folder: str | os.PathLike, fixed: str, moving: str) -> Path:
    """The field file of a pair in ``folder``, looked up as the official evaluator does.

    The short name is accepted only when the suffixes are equal or fixed is ``0000`` and moving
    ``0001``; the full name always; ``.nii.gz`` before ``.npz``.
    """
    folder = Path(folder)
    f, m = scan_id(fixed), scan_id(moving)
    candidates = []
    short_ok = f is None or m is None or f[1] == m[1] or (f[1] == "0000" and m[1] == "0001")
    for ext in FIELD_EXTS:
        if short_ok:
            candidates.append(folder / field_name(fixed, moving, short=True, ext=ext))
        candidates.append(folder / field_name(fixed, moving, short=False, ext=ext))
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no displacement field for fixed {fixed} / moving {moving} in {folder} (tried {[c.name for c in candidates]})"
    )


# ----------------------------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------------------------
def ddf_of(pred: Any) -> torch.Tensor:
    """The displacement field of a network output (tensor, first of a tuple, or ``pred["ddf"]``)."""
    if isinstance(pred, Mapping):
        pred = pred["ddf"]
    if isinstance(pred, (list, tuple)):
        pred = pred[0]
    return torch.as_tensor(pred)


def ddf_to_field(ddf: torch.Tensor | np.ndarray) -> np.ndarray:
    """ddf (3, D, H, W) or (1, 3, D, H, W) -> Learn2Reg field (D, H, W, 3) float32, C-contiguous (for a file)."""
    arr = ddf.detach().float().cpu().numpy() if isinstance(ddf, torch.Tensor) else np.asarray(ddf, np.float32)
    if arr.ndim == 5:
        if arr.shape[0] != 1:
            raise ValueError(f"expected a single field, got batch of {arr.shape[0]}")
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise ValueError(f"expected a ddf of shape (3, D, H, W), got {arr.shape}")
    return np.ascontiguousarray(np.moveaxis(arr, 0, -1), dtype=np.float32)


def field_to_ddf(field: np.ndarray) -> torch.Tensor:
    """Learn2Reg field (D, H, W, 3) -> ddf (3, D, H, W) float32 tensor, contiguous (a file's field, or a
    classical method's, made the ddf everything else reads)."""
    arr = np.asarray(field, np.float32)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected a Learn2Reg field of shape (D, H, W, 3), got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0)))


def as_written(ddf: torch.Tensor, dtype: str = "float16") -> torch.Tensor:
    """``ddf`` rounded to the ``dtype`` its file stores (as float32): the field the Learn2Reg evaluator reads."""
    return ddf.to(getattr(torch, np.dtype(dtype).name)).float()


def voxel_to_world(
    field: np.ndarray, fixed_affine: np.ndarray, world_shift: Sequence[float] | None = None
) -> np.ndarray:
    """Voxel displacement (D, H, W, 3) -> physical RAS displacement (mm) at the fixed points.

    ``world(x + u) - world(x) = A u`` with ``A`` the fixed affine's linear part. ``world_shift`` (RAS,
    mm) is the translation that was added to the moving affine before resampling it onto the fixed
    grid (e.g. centre alignment): the true moving point is the resampled one minus that shift.
    """
    lin = np.asarray(fixed_affine, np.float64)[:3, :3]
    disp = np.asarray(field, np.float64) @ lin.T
    if world_shift is not None:
        disp = disp - np.asarray(world_shift, np.float64)
    return disp


def world_to_voxel(disp_ras: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
    """Physical RAS displacement (mm) at the fixed voxels -> voxel displacement on the fixed grid."""
    inv = np.linalg.inv(np.asarray(fixed_affine, np.float64)[:3, :3])
    return np.asarray(disp_ras, np.float64) @ inv.T


# ----------------------------------------------------------------------------------------------
# files (atomic: temp file in the same folder + os.replace)
# ----------------------------------------------------------------------------------------------
def save_nifti(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype=None, intent: str | None = None
) -> Path:
    """Write a NIfTI with the given affine as sform and qform (atomically)."""
    arr = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    img = nib.Nifti1Image(arr, np.asarray(affine, np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if intent:
        img.header.set_intent(intent)
    if not str(path).endswith(".gz"):
        return atomic_write(path, lambda tmp: nib.save(img, tmp))
    # the same gzip stream nibabel writes (level 1, mtime 0), compressed by ISA-L: 10x faster than zlib, which
    # took 2-3 s per full-size field
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(gzip_compress(img.to_bytes(), 1, mtime=0)))


def save_field(
    path: str | os.PathLike, field: np.ndarray, dtype: str = "float16", affine: np.ndarray | None = None
) -> Path:
    """Write a Learn2Reg field (D, H, W, 3): ``.nii.gz`` (nibabel) or ``.npz`` (one array, ``arr_0``).

    NIfTI-1 has no float16 code: a float16 field is rounded to float16 and stored as float32 there.
    """
    arr = np.asarray(field).astype(dtype)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected a Learn2Reg field of shape (D, H, W, 3), got {arr.shape}")
    path = Path(path)
    if path.name.endswith(".npz"):
        return atomic_write(path, lambda tmp: np.savez_compressed(tmp, arr))
    if not path.name.endswith(".nii.gz"):
        raise ValueError(f"{path}: a Learn2Reg field is written as .nii.gz or .npz")
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return save_nifti(path, arr, np.eye(4) if affine is None else affine)


def load_field(path: str | os.PathLike) -> np.ndarray:
    """Read a Learn2Reg field as the evaluator does (float64 for NIfTI, float32 for npz)."""
    path = Path(path)
    try:
        if path.name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                if len(data.files) != 1:
                    raise ValueError(f"{path}: an npz field must hold exactly one array, found {data.files}")
                field = data[data.files[0]].astype(np.float32)
        else:
            field = nib.load(str(path)).get_fdata()
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable displacement field ({exc})") from exc
    field = np.squeeze(field, axis=3) if field.ndim == 5 and field.shape[3] == 1 else field
    if field.ndim != 4 or field.shape[-1] != 3:
        raise ValueError(f"{path}: expected a field of shape (D, H, W, 3), got {field.shape}")
    if not np.isfinite(field).all():
        raise ValueError(f"{path}: displacement field has NaN or infinite values")
    return field


def save_itk_displacement(
    path: str | os.PathLike,
    field: np.ndarray,
    fixed_affine: np.ndarray,
    world_shift: Sequence[float] | None = None,
    convention: str = "ants",
) -> Path:
    """Write the ITK displacement-field transform of a voxel field (a vector NIfTI on the fixed grid).

    ``convention="ants"``: intent ``vector`` with LPS components, byte for byte the form
    ``antsRegistration`` writes (``*Warp.nii.gz``); read unchanged by every ITK/ANTs/Slicer version.
    ``convention="nifti"``: intent ``displacement vector`` (NIfTI 1006) with RAS components, which
    ITK >= 5.3 converts to LPS on reading (ITK 5.4 checked here), so it is the same transform.
    """
    if convention not in ("ants", "nifti"):
        raise ValueError(f"convention must be 'ants' or 'nifti', got {convention!r}")
    # voxel_to_world and the frame change as one 3x3 matrix (float64), applied to the float32 field in
    # float32 (the file's type): one full-size array instead of three float64 ones
    frame = RAS_TO_LPS if convention == "ants" else np.eye(3)
    lin = frame @ np.asarray(fixed_affine, np.float64)[:3, :3]
    values = np.asarray(field, np.float32) @ lin.T.astype(np.float32)
    if world_shift is not None:
        values -= (frame @ np.asarray(world_shift, np.float64)).astype(np.float32)
    intent = "vector" if convention == "ants" else "displacement vector"
    vec = values[:, :, :, None, :]  # NIfTI vector layout (X, Y, Z, 1, 3)
    return save_nifti(path, vec, fixed_affine, intent=intent)


# ----------------------------------------------------------------------------------------------
# the inverse of a field
# ----------------------------------------------------------------------------------------------
_WARP_BORDER = Warp(mode="bilinear", padding_mode="border")


def invert_ddf(
    ddf: torch.Tensor, start: torch.Tensor | None = None, grid: int = 2, iterations: int = 10
) -> torch.Tensor:
    """The inverse of a ddf (B, 3, *spatial), by fixed-point iteration on a grid ``grid`` times coarser (the fields
    are smooth: at 192x160x256 this is 1.5 s instead of 17 s, and 0.02 voxels more residual), upsampled.

    The forward field maps x to y = x + u(x); its inverse v satisfies y + v(y) = x, that is v(y) = -u(y + v(y)),
    which ``v <- -u(y + v(y))`` solves where the field is invertible (its Jacobian determinant positive); it
    starts from ``start`` (e.g. a symmetric network's fixed -> moving ddf) or from -u. Outside the scan u is
    taken from the border. With ``u`` on the fixed grid the inverse is on the same array grid, read in the moving
    scan: ``warped_fixed(y) = fixed(y + v(y))``. MONAI has no field inversion (its ``DVF2DDF`` integrates a
    velocity field, which this network does not predict).
    """
    u = ddf.float()
    v = None if start is None else start.float()
    if grid > 1:
        u = torch.nn.functional.avg_pool3d(u, grid, ceil_mode=True) / grid
        v = None if v is None else torch.nn.functional.avg_pool3d(v, grid, ceil_mode=True) / grid
    v = -u if v is None else v
    with torch.no_grad():
        for _ in range(int(iterations)):
            v = -_WARP_BORDER(u, v)
    if grid > 1:
        v = torch.nn.functional.interpolate(
            v * grid, scale_factor=grid, mode="trilinear", align_corners=False
        )
        v = v[(..., *[slice(0, s) for s in ddf.shape[2:]])]
    return v.contiguous()


def inverse_residual(ddf: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``u(x) + v(x + u(x))`` (B, 3, *spatial), in voxels: zero where ``inverse`` inverts ``ddf`` exactly (the
    inverse-consistency error of a pair of fields)."""
    with torch.no_grad():
        return ddf.float() + _WARP_BORDER(inverse.float(), ddf.float())


# ----------------------------------------------------------------------------------------------
# applying a field
# ----------------------------------------------------------------------------------------------
def warp_image(moving: torch.Tensor, ddf: torch.Tensor, cval: float = 0.0) -> torch.Tensor:
    """Linear ``moving(x + ddf(x))`` on the fixed grid with MONAI ``Warp`` (torch ``grid_sample``, every thread):
    the warped scan inference writes and shows. ``moving`` (D, H, W), ``ddf`` (3, D, H, W) in voxels; ``cval``
    outside the moving scan, blended over its outermost voxel. Labels are warped by ``scripts.metrics.warp_labels``
    (the evaluator's nearest neighbour, exactly); training warps with MONAI's ``Warp`` itself (differentiable).
    """
    moving = torch.as_tensor(moving).as_subclass(torch.Tensor).float()
    if tuple(ddf.shape) != (3, *moving.shape):
        raise ValueError(f"ddf {tuple(ddf.shape)} does not fit the moving image {tuple(moving.shape)}")
    with torch.no_grad():
        warped = Warp(mode="bilinear", padding_mode="zeros")((moving - cval)[None, None], ddf[None].float())
    return warped[0, 0] + cval
