"""The transforms MONAI lacks; the configs chain them with MONAI's own (``train.json``, ``inference.json``).

* ``CTWindowd``: each CT window (width, level) of a HU image as one channel in [0, 1].
* ``EnsureLabeld``: an all-zero label map for training cases without labels, so batches collate.
* ``CheckLabelsd`` (from ``scripts.label_checks``, shared with the segmentation bundle): label maps hold whole
  organ ids 0..max_label, else an error naming the file and the ids.
* ``LoadScand``: a scan loaded by file name, refused with the file's name when unreadable, not 3D or not
  finite, or (labels) with ids outside 0..max_label.
* ``CheckSameGridd``: preprocessed pairs must share the fixed scan's grid (they are registered array to array).
* ``AlignCentersd``: the moving scan's affine translated so that it meets the fixed scan.

Inside a pair, label maps and paths use keys that do not start with ``fixed_``/``moving_`` (``LABEL``,
``PSEUDO``, ``path_*``): MONAI's ``Spacingd`` treats every ``<key>_*`` entry as a meta dict of ``<key>``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform

from scripts.errors import InputError
from scripts.label_checks import CheckLabelsd, label_map

__all__ = [
    "LABEL",
    "PSEUDO",
    "LOADED",
    "ct_window",
    "CTWindowd",
    "EnsureLabeld",
    "label_map",
    "CheckLabelsd",
    "LoadScand",
    "AlignCentersd",
    "CheckSameGridd",
    "grid_distance_mm",
]

# true labels (the metrics read them) and predicted labels (instance optimisation's Dice term reads them)
LABEL = {"fixed": "label_fixed", "moving": "label_moving"}
PSEUDO = {"fixed": "pseudo_fixed", "moving": "pseudo_moving"}
# how a user supplies them, for every error about missing predicted labels
PSEUDO_HINT = "pass --pseudo_datalist (the segmentation bundle's datalist_pseudo.json) or --fixed_pseudo/--moving_pseudo"
# pair-list key -> key of the loaded scan
LOADED = {
    "fixed": "fixed",
    "moving": "moving",
    "fixed_label": LABEL["fixed"],
    "moving_label": LABEL["moving"],
    "fixed_pseudo": PSEUDO["fixed"],
    "moving_pseudo": PSEUDO["moving"],
}


def ct_window(img: torch.Tensor, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """(1, *spatial) HU -> (len(windows), *spatial) in [0, 1], one channel per (width, level) window."""
    img = torch.as_tensor(img).float()
    chans = [((img - (level - width / 2.0)) / width).clamp(0.0, 1.0) for width, level in windows]
    return torch.cat(chans, dim=0)


class CTWindowd(MapTransform):
    """Replace each HU image by its windowed channels (one per window; MONAI's ``ScaleIntensityRanged``
    clips one range into one channel, the network reads several)."""

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


class EnsureLabeld(MapTransform):
    """Give unlabelled cases an all-zero label map (uint8) so that every batch collates the same keys."""

    def __init__(self, image_key: str = "image", label_key: str = "label") -> None:
        super().__init__([label_key], allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if d.get(self.label_key) is None:
            img = d[self.image_key]
            d[self.label_key] = torch.zeros((1, *img.shape[1:]), dtype=torch.uint8)
        return d


class LoadScand(MapTransform):
    """Load scans as channel-first MetaTensors, rejecting unreadable, non-3D or non-finite data by file name.

    Each loaded key is renamed as ``LOADED`` says, and its file goes to ``path_<new key>``. Label maps
    (every key but ``fixed`` and ``moving``) must hold organ ids 0..``max_label``.
    """

    def __init__(
        self, keys: Sequence[str] = tuple(LOADED), max_label: int = 13, allow_missing_keys: bool = True
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_label = int(max_label)
        self.loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not os.path.exists(str(path)):
                raise InputError(f"{path}: {key} not found")
            try:
                img = self.loader(str(path))
            except Exception as exc:  # readers raise many types for truncated or foreign files
                raise InputError(
                    f"{path}: unreadable {key} ({type(exc).__name__}: {exc}); a scan is a file MONAI's LoadImage "
                    "reads (NIfTI .nii/.nii.gz, NRRD, MetaImage .mha/.mhd, ...) or a folder holding one DICOM series"
                ) from exc
            while img.ndim > 4 and img.shape[-1] == 1:
                img = img[..., 0]
            if img.ndim != 4 or img.shape[0] != 1 or min(img.shape[1:]) < 2:
                raise InputError(f"{path}: expected a 3D single-channel {key}, got shape {tuple(img.shape)}")
            bad = int(img.numel() - torch.isfinite(img).sum())
            if bad:
                raise InputError(f"{path}: {key} has {bad} NaN or infinite voxels")
            if key not in ("fixed", "moving"):
                label_map(img, self.max_label, f"{path} ({key})")
            del d[key]
            d[LOADED.get(key, key)] = img
            d[f"path_{LOADED.get(key, key)}"] = str(path)
        return d


def _body_box(img: MetaTensor, threshold: float = -500.0) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """World (RAS, mm) bounding box corners and centre of mass of the body (voxels above ``threshold`` HU)."""
    arr = np.asarray(img[0])
    step = max(1, int(round(max(arr.shape) / 96)))  # a coarse look is enough for a box and a centre
    idx = np.argwhere(arr[::step, ::step, ::step] > threshold) * step
    if len(idx) == 0:
        return None
    aff = np.asarray(img.affine, np.float64)
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    return world.min(0), world.max(0), world.mean(0)


def _agreement(fixed: MetaTensor, moving: MetaTensor, shift: np.ndarray, box, spacing: float = 8.0) -> float:
    """Correlation of the two scans' HU (clipped to -1000..1000) on an 8 mm grid over the fixed body's box, with
    the moving scan translated by ``shift`` (world, mm)."""
    import scipy.ndimage

    axes = [np.arange(lo, hi + spacing, spacing) for lo, hi in zip(box[0], box[1], strict=True)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    values = []
    for img, offset in ((fixed, np.zeros(3)), (moving, shift)):
        aff = np.asarray(img.affine, np.float64)
        vox = (points - offset - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
        arr = np.clip(np.asarray(img[0], np.float32), -1000.0, 1000.0)
        values.append(scipy.ndimage.map_coordinates(arr, vox.T, order=1, cval=-1000.0))
    f, m = values
    if f.std() == 0 or m.std() == 0:
        return -1.0
    return float(np.corrcoef(f, m)[0, 1])


class AlignCentersd(MapTransform):
    """Translate the moving scan's affine so that it meets the fixed scan (records ``world_shift``, mm, RAS).

    Scans of different patients sit at arbitrary scanner coordinates; without a first translation a moving scan
    can fall outside the fixed field of view. The shift is part of the transform the writer saves. Modes:

    * ``auto`` (default): of the scanner coordinates as they are (right for the same patient and session, or a
      cropped copy) and the bodies' (> -500 HU) centres of mass aligned (right for a changed header, another
      patient), the one under which the two scans agree best (correlation of their clipped HU on an 8 mm grid
      over the fixed body).
    * ``mass``: always align the bodies' centres of mass.
    * ``none``: never move it.

    Scans without a body (a phantom, a blank scan) have their geometric centres aligned instead (``auto``,
    ``mass``). Applied to the scans as loaded, so the geometry is the original one in world coordinates.
    """

    MODES = ("auto", "mass", "none")

    def __init__(
        self,
        keys: Sequence[str] = ("moving", LABEL["moving"], PSEUDO["moving"]),
        ref_key: str = "fixed",
        mode: str = "auto",
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.ref_key = ref_key
        mode = str(mode).lower()
        if mode not in self.MODES:
            raise ValueError(f"align_centers must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    @staticmethod
    def _centre(img: MetaTensor) -> np.ndarray:
        aff = np.asarray(img.affine, np.float64)
        return (aff @ np.append((np.asarray(img.shape[1:]) - 1) / 2.0, 1.0))[:3]

    def shift(self, fixed: MetaTensor, moving: MetaTensor) -> tuple[np.ndarray, str]:
        """The world shift for the moving scan, and the rule that chose it."""
        if self.mode == "none":
            return np.zeros(3), "none"
        a, b = _body_box(fixed), _body_box(moving)
        if a is None or b is None:  # no body (a phantom, a blank scan): the geometric centres
            return self._centre(fixed) - self._centre(moving), "centre"
        mass = a[2] - b[2]
        if self.mode == "auto" and _agreement(fixed, moving, np.zeros(3), a) >= _agreement(
            fixed, moving, mass, a
        ):
            return np.zeros(3), "scanner coordinates kept"
        return mass, "body centres of mass"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shift, rule = self.shift(d[self.ref_key], d["moving"])
        for key in self.key_iterator(d):
            aff = d[key].affine.clone()
            aff[:3, 3] += torch.as_tensor(shift, dtype=aff.dtype)
            d[key].affine = aff
        d["world_shift"] = torch.as_tensor(shift, dtype=torch.float64)
        d["alignment"] = rule
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
        self,
        keys: Sequence[str] = ("moving", *LABEL.values(), *PSEUDO.values()),
        tolerance_mm: float = 0.1,
        allow_missing_keys: bool = True,
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
