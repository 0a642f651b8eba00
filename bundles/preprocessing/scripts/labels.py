"""Remapping native label ids to the 13-organ scheme with a cohort's label table (data, not code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

# Temporary ids for classes that are split by the patient's side after resampling (e.g. KiTS "kidney").
_SPLIT_BASE = 200


class LabelTable:
    """A cohort's native-id -> organ mapping, resolved against the organ scheme (``organs.json``)."""

    def __init__(self, table: dict, organs: dict[str, str]):
        self.organ_ids = {name: int(i) for i, name in organs.items() if int(i) > 0}
        self.n_organs = len(self.organ_ids)
        self.split = table.get("split_by_side", {})
        split_ids = {name: _SPLIT_BASE + k for k, name in enumerate(self.split)}
        self.native: dict[int, int] = {}
        for nid, name in table.get("labels", {}).items():
            if name is None:
                self.native[int(nid)] = 0
            elif name in split_ids:
                self.native[int(nid)] = split_ids[name]
            elif name in self.organ_ids:
                self.native[int(nid)] = self.organ_ids[name]
            else:
                raise ValueError(f"label table maps {nid} to {name!r}, which is not an organ of the scheme")
        self.split_ids = split_ids
        annotated = {v for v in self.native.values() if 0 < v < _SPLIT_BASE}
        for sides in self.split.values():
            annotated |= {self.organ_ids[sides["right"]], self.organ_ids[sides["left"]]}
        self.annotated = [1 if i in annotated else 0 for i in range(1, self.n_organs + 1)]

    @property
    def has_labels(self) -> bool:
        return any(self.annotated)

    def remap(self, native: np.ndarray, path: Path) -> np.ndarray:
        """Native label map -> organ ids (split classes get temporary ids); rejects ids not in the table."""
        if not np.allclose(native, np.rint(native)):
            raise ValueError(f"{path}: label map has non-integer values")
        ids = np.rint(native).astype(np.int64)
        present = set(np.unique(ids).tolist()) - {0}
        unknown = sorted(present - set(self.native))
        if unknown:
            allowed = ", ".join(str(k) for k in sorted({0, *self.native}))
            raise ValueError(
                f"{path}: label ids {unknown} are not in the cohort's label table (allowed: {allowed})"
            )
        lut = np.zeros(max([*present, *self.native, 0]) + 1, np.uint8)
        for nid, oid in self.native.items():
            lut[nid] = oid
        return lut[ids]

    def split_by_side(self, labels: np.ndarray, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """Assign each connected component of a split class to the patient's right or left.

        The midline is the body's centroid along the RAS x axis (x grows to the patient's right).
        """
        if not self.split_ids:
            return labels
        out = labels.copy()
        body = np.argwhere(image > -500)
        mid_x = (affine[:3, :3] @ body.mean(0) + affine[:3, 3])[0] if len(body) else affine[0, 3]
        for name, tmp_id in self.split_ids.items():
            comps, n = ndimage.label(labels == tmp_id)
            for k in range(1, n + 1):
                vox = np.argwhere(comps == k).mean(0)
                x = (affine[:3, :3] @ vox + affine[:3, 3])[0]
                side = "right" if x > mid_x else "left"
                out[comps == k] = self.organ_ids[self.split[name][side]]
        return out
