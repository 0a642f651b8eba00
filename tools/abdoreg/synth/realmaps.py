"""Real organ label maps, read through their affines, for the anatomy generator.

A map is a uint8 volume in the 13-organ Learn2Reg AbdomenCTCT ids (0 background). Its world
geometry comes from its affine; known header errors (the Learn2Reg 2020 maps are mirrored
left-right) are corrected on the affine from the data table ``realdata.json``, never by flipping
arrays, and a map whose organs still lie mirrored is refused with an error naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

N_ORGANS = 13
TABLE_PATH = Path(__file__).with_name("realdata.json")
# organs whose presence makes a map "complete" enough for a Learn2Reg-like (13-organ) scan
CORE_ORGANS = (1, 2, 3, 6, 8, 9, 10, 11)


@lru_cache(maxsize=1)
def realdata_table() -> dict:
    """The data table: sets (prefix, licence, header fix, training use), exclusions, canonical centroids."""
    return json.loads(TABLE_PATH.read_text())


def set_of(name: str) -> tuple[str, dict] | None:
    """(set name, its entry) for a label map's file name, or None for a map of no known set."""
    for key, entry in realdata_table()["sets"].items():
        if name.startswith(entry["prefix"]):
            return key, entry
    return None


def map_name(path: Path) -> str:
    """``flare22_0001`` for ``.../flare22_0001.nii.gz``."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def flip_axes_affine(affine: np.ndarray, shape: tuple[int, ...], axes) -> np.ndarray:
    """The affine that says array axes ``axes`` run the other way (same voxels, same field of view)."""
    flip = np.eye(4)
    for ax in axes:
        flip[ax, ax] = -1.0
        flip[ax, 3] = shape[ax] - 1
    return affine @ flip


@dataclass(frozen=True)
class LabelMap:
    """A real organ map: labels (uint8, organ ids), its RAS affine (header fixed) and organ centroids (mm)."""

    name: str
    labels: np.ndarray
    affine: np.ndarray
    centroids: dict[int, np.ndarray]

    @property
    def organs(self) -> frozenset[int]:
        return frozenset(self.centroids)

    def placement(self, targets: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """Translation (mm) that brings the map's organ centroids closest to the canonical ones (least squares)."""
        targets = targets or canonical_centroids()
        common = [o for o in self.centroids if o in targets]
        if not common:
            raise ValueError(f"{self.name}: no organ of the 13-organ scheme in the map")
        return np.mean([targets[o] - self.centroids[o] for o in common], axis=0)


@lru_cache(maxsize=1)
def _canonical() -> dict[int, tuple[float, float, float]]:
    return {int(k): tuple(v) for k, v in realdata_table()["canonical_centroids_mm"].items()}


def canonical_centroids() -> dict[int, np.ndarray]:
    """Where each organ's centroid is placed in the canonical frame (RAS mm, centre of the Learn2Reg grid = 0)."""
    return {k: np.asarray(v, float) for k, v in _canonical().items()}


def check_sides(name: str, centroids: dict[int, np.ndarray]) -> None:
    """Refuse a map whose organs are mirrored left-right in world coordinates (a wrong header).

    RAS x grows toward the patient's right: the liver lies right of the spleen, the right kidney
    and adrenal right of the left ones.
    """
    pairs = [
        (6, 1, "liver", "spleen"),
        (2, 3, "right kidney", "left kidney"),
        (12, 13, "right adrenal", "left adrenal"),
    ]
    tested = [(r, left, a, b) for r, left, a, b in pairs if r in centroids and left in centroids]
    wrong = [f"{a} left of {b}" for r, left, a, b in tested if centroids[r][0] < centroids[left][0]]
    if tested and len(wrong) == len(tested):
        raise ValueError(
            f"{name}: the organs lie mirrored left-right in world coordinates ({'; '.join(wrong)}): the header's "
            f"affine is wrong. Add the set's file prefix with a header_fix to {TABLE_PATH} (or fix the file's affine)."
        )


def load_label_map(path: str | Path) -> LabelMap:
    """Read a label map, correct its affine from the data table and check its sides."""
    path = Path(path)
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ValueError(f"{path}: not a readable NIfTI label map ({exc})") from exc
    labels = np.asanyarray(img.dataobj)
    if labels.ndim == 4 and labels.shape[3] == 1:
        labels = labels[..., 0]
    if labels.ndim != 3:
        raise ValueError(f"{path}: a label map must be 3D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.allclose(labels, np.rint(labels)):
            raise ValueError(f"{path}: label map has non-integer values")
        labels = np.rint(labels)
    idx = np.nonzero(labels)  # organ voxels only: a few percent of the map
    values = np.asarray(labels[idx])
    if values.size and (values.min() < 0 or values.max() > N_ORGANS):
        raise ValueError(
            f"{path}: label ids {np.unique(values).tolist()} are outside 0..{N_ORGANS} (the 13-organ scheme)"
        )
    labels = labels.astype(np.uint8)
    values = values.astype(np.int64)
    affine = img.affine.astype(np.float64)
    found = set_of(map_name(path))
    if found and "header_fix" in found[1]:
        affine = flip_axes_affine(affine, labels.shape, found[1]["header_fix"]["flip_axes"])
    counts = np.bincount(values, minlength=N_ORGANS + 1)
    sums = [np.bincount(values, weights=i.astype(np.float64), minlength=N_ORGANS + 1) for i in idx]
    centroids = {
        o: affine[:3, :3] @ np.array([s[o] / counts[o] for s in sums]) + affine[:3, 3]
        for o in range(1, N_ORGANS + 1)
        if counts[o]
    }
    check_sides(str(path), centroids)
    return LabelMap(map_name(path), labels, affine, centroids)


@dataclass(frozen=True)
class MapPools:
    """Which real maps feed which synthesised scans.

    ``validation``: complete maps held out for the Learn2Reg-like validation scans only (every third complete
    map); ``l2r``: the other complete maps (the Learn2Reg-like training scans, whose labels are read as all 13
    organs); ``other``: every usable map but the validation ones (the partially labelled cohorts).
    """

    validation: tuple[Path, ...]
    l2r: tuple[Path, ...]
    other: tuple[Path, ...]
    left_out: tuple[tuple[str, str], ...]  # (file name, reason)
    organs: dict[str, frozenset[int]]  # organ ids of each usable map, by file name


def _organs_in(path: Path) -> set[int]:
    labels = np.asanyarray(nib.load(path).dataobj)
    return {int(i) for i in np.unique(labels[labels > 0]) if i <= N_ORGANS}


def _map_paths(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"anatomy folder {folder} does not exist (expected real organ label maps, *.nii.gz)"
        )
    paths = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not paths:
        raise FileNotFoundError(f"no label maps (*.nii.gz) in {folder}")
    return paths


def folder_fingerprint(folder: str | Path) -> list[list]:
    """Name, size and modification time of each map: pools recorded for the same fingerprint are reused."""
    return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in _map_paths(Path(folder))]


def map_pools(
    folder: str | Path, include_sets: tuple[str, ...] = (), organs: dict[str, list[int]] | None = None
) -> MapPools:
    """Sort the label maps of ``folder`` into pools (``include_sets`` lets in sets the table keeps out;
    ``organs``: the organ ids of each map by file name, when already known)."""
    folder = Path(folder)
    table = realdata_table()
    paths = _map_paths(folder)
    usable, complete, left_out, found_organs = [], [], [], {}
    for p in paths:
        name = map_name(p)
        found = set_of(name)
        if name in table["exclude"]:
            left_out.append((p.name, "a subject of the real-CT benchmark"))
            continue
        if found and not found[1].get("training", True) and found[0] not in include_sets:
            left_out.append((p.name, found[1].get("why_not_training", "kept out by realdata.json")))
            continue
        usable.append(p)
        present = set(organs[p.name]) if organs and p.name in organs else _organs_in(p)
        found_organs[p.name] = frozenset(present)
        if set(CORE_ORGANS) <= present:
            complete.append(p)
    if not complete:
        raise ValueError(
            f"{folder}: no usable map holds the organs {list(CORE_ORGANS)} a Learn2Reg-like scan needs "
            f"(maps left out: {', '.join(n for n, _ in left_out) or 'none'})"
        )
    validation = complete[::3] if len(complete) >= 3 else complete
    l2r = [p for p in complete if p not in validation] or complete
    other = [p for p in usable if p not in validation] or usable
    return MapPools(tuple(validation), tuple(l2r), tuple(other), tuple(left_out), found_organs)
