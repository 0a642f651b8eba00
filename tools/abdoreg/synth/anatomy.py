"""Training scans synthesised from real organ label maps (SynthSeg / SynthMorph style, CT-plausible by default).

A real map (``realmaps.LabelMap``: 13 organs, header fixed) is placed in the canonical frame (its
organ centroids on the canonical ones), moved by a random affine and a smooth random deformation
(one real map, many subjects), resampled (nearest) onto the output grid; the body is drawn around the
organs (``body.py``), lesions and vessels where a cohort needs them, intensities and the scanner's
effects on top (``ct_intensity.py``), and the field of view is cut at random (cranio-caudal range,
a reconstruction circle) and wherever the real map has no data. Deterministic for a seed.

``AnatomySource`` hands such subjects to ``cohorts.py``, which writes them in every native layout.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .body import ALL_TISSUES, _tube_mask, draw_body
from .ct_intensity import PAD_HU, Look, draw_look, render_intensities, scanner
from .noise import fields
from .phantom import Preset, grid_affine
from .realmaps import LabelMap, MapPools, canonical_centroids, folder_fingerprint, load_label_map, map_pools

INTENSITY_MODES = ("ct", "random", "mixed")
# Field of view (mm) of the canonical grid a subject is drawn on before the other cohorts' scanners
# "acquire" it (their fields of view reach 420 mm; the Learn2Reg grid is 384 x 320 x 512 mm).
NATIVE_FOV_MM = (424.0, 352.0, 512.0)
T = ALL_TISSUES


def grid_axes(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (mm) along each axis of an axis-aligned RAS grid."""
    return tuple((affine[i, 3] + affine[i, i] * np.arange(shape[i])).astype(np.float32) for i in range(3))


def random_affine(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """Rotation (about 3-5 degrees), scaling (0.9-1.1, slightly anisotropic) and shift (6, 6, 15 mm sd) about
    ``centre``: maps a point of the output subject to the canonical map."""
    ax, ay, az = np.deg2rad(rng.normal(0.0, [3.0, 3.0, 5.0]))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, 3)
    lin = rz @ ry @ rx @ np.diag(1.0 / scale)
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = centre - lin @ centre + rng.normal(0.0, [6.0, 6.0, 15.0])
    return out


def warp_labels(
    lmap: LabelMap, affine: np.ndarray, shape, rng: np.random.Generator | None, deformation_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """The map's organs on the output grid (nearest), placed, moved and deformed (no move nor deformation
    without ``rng``); and where the map has data."""
    centre = np.mean(list(canonical_centroids().values()), axis=0)
    aug = random_affine(rng, centre) if rng is not None else np.eye(4)
    place = np.eye(4)
    place[:3, 3] = -lmap.placement()  # canonical -> the map's world
    m = np.linalg.inv(lmap.affine) @ place @ aug  # output world -> map voxel
    spacing = [abs(float(affine[i, i])) for i in range(3)]
    disp = (
        fields(rng, 3, shape, spacing, 80.0) * deformation_mm if rng is not None else np.zeros((3, 1, 1, 1))
    )
    axes = grid_axes(affine, shape)
    pts = [axes[c].reshape([-1 if d == c else 1 for d in range(3)]) + disp[c] for c in range(3)]
    valid = np.ones(tuple(shape), bool)
    idx = []
    for r in range(3):
        v = np.rint(m[r, 0] * pts[0] + m[r, 1] * pts[1] + m[r, 2] * pts[2] + m[r, 3]).astype(np.int32)
        valid &= (v >= 0) & (v < lmap.labels.shape[r])
        idx.append(np.clip(v, 0, lmap.labels.shape[r] - 1))
    labels = lmap.labels[idx[0], idx[1], idx[2]]
    labels[~valid] = 0
    return labels, valid


def random_fov(labels: np.ndarray, axes, rng: np.random.Generator) -> np.ndarray:
    """Where the scanner saw: a random cranio-caudal range around the organs (half of the scans: from the
    kidneys' lower poles to the pelvis, from the organs' top to the chest) and a reconstruction circle that may
    cut the sides (a quarter)."""
    keep = np.ones(labels.shape, bool)
    xs, ys, zs = axes
    organ_z = np.nonzero(labels.any(axis=(0, 1)))[0]
    if len(organ_z) and rng.random() < 0.5:
        lo = zs[organ_z.min()] + rng.uniform(-200.0, 20.0)  # from the kidneys' lower poles to the pelvis
        hi = zs[organ_z.max()] + rng.uniform(-40.0, 100.0)
        keep &= ((zs >= lo) & (zs <= hi))[None, None, :]
    if rng.random() < 0.25:
        i, j, _ = np.nonzero(labels[:, :, :: max(1, labels.shape[2] // 16)])
        cx, cy = (float(xs[i].mean()), float(ys[j].mean())) if len(i) else (0.0, 0.0)
        r = rng.uniform(170.0, 240.0)
        keep &= ((xs[:, None] - cx) ** 2 + (ys[None, :] - cy) ** 2 < r * r)[:, :, None]
    return keep


def _random_voxel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    idx = np.flatnonzero(mask)
    if not len(idx):
        return None
    return np.asarray(np.unravel_index(idx[rng.integers(len(idx))], mask.shape))


def _ellipsoid(shape, axes, centre_mm, radii_mm) -> np.ndarray:
    xs, ys, zs = axes
    return (
        ((xs[:, None, None] - centre_mm[0]) / radii_mm[0]) ** 2
        + ((ys[None, :, None] - centre_mm[1]) / radii_mm[1]) ** 2
        + ((zs[None, None, :] - centre_mm[2]) / radii_mm[2]) ** 2
    ) < 1.0


def _world(axes, vox) -> np.ndarray:
    return np.array([axes[d][vox[d]] for d in range(3)], float)


def liver_vessels(tissue: np.ndarray, axes, rng: np.random.Generator) -> np.ndarray:
    """A tree of vessels in the liver: portal branches from the hilum (the liver point nearest the portal vein,
    else the inferior vena cava) and hepatic veins toward the cava, 2-5 mm radius."""
    liver = tissue == T["liver"]
    out = np.zeros(tissue.shape, bool)
    if liver.sum() < 50:
        return out
    pts = np.argwhere(liver)
    world = np.stack([axes[d][pts[:, d]] for d in range(3)], 1)
    anchors = []
    for organ in (T["portal_splenic_vein"], T["ivc"]):
        o = np.argwhere(tissue == organ)
        if len(o):
            c = np.stack([axes[d][o[:, d]] for d in range(3)], 1).mean(0)
            anchors.append(world[np.argmin(((world - c) ** 2).sum(1))])
    if not anchors:
        anchors.append(world.mean(0))
    for k, hilum in enumerate(anchors):
        for _ in range(rng.integers(4, 8) if k == 0 else rng.integers(2, 4)):
            end = world[rng.integers(len(world))]
            if np.linalg.norm(end - hilum) < 30.0:
                continue
            mid = (hilum + end) / 2 + rng.normal(0.0, 8.0, 3)
            out |= _tube_mask(tissue.shape, axes, np.stack([hilum, mid, end]), rng.uniform(2.0, 5.0))
    return out & liver


def add_lesions(tissue: np.ndarray, axes, rng: np.random.Generator, kinds: tuple[str, ...], vessels) -> None:
    """Tumours (``liver``, ``pancreas``, ``kidney``, ``colon``) and labelled hepatic vessels (``vessels``),
    as the phantom's cohorts have them (tissue ids of ``phantom.TISSUES``)."""
    shape = tissue.shape
    spec = {
        "liver": ((T["liver"],), "liver_tumour", (10.0, 25.0), (T["liver"],)),
        "pancreas": ((T["pancreas"],), "pancreas_tumour", (8.0, 16.0), (T["pancreas"],)),
        "kidney": (
            (T["right_kidney"], T["left_kidney"]),
            "kidney_tumour",
            (10.0, 25.0),
            (T["right_kidney"], T["left_kidney"], T["visceral_fat"], T["bowel"], T["colon"]),
        ),
        "colon": ((T["colon"],), "colon_tumour", (12.0, 20.0), (T["colon"], T["visceral_fat"])),
    }
    for kind in kinds:
        if kind == "vessels":
            tissue[vessels & (tissue == T["liver"])] = T["hepatic_vessel"]
            continue
        host, name, (rmin, rmax), over = spec[kind]
        vox = _random_voxel(np.isin(tissue, host), rng)
        if vox is None:
            continue
        radii = rng.uniform(rmin, rmax) * rng.uniform(0.8, 1.2, 3)
        mask = _ellipsoid(shape, axes, _world(axes, vox), radii) & np.isin(tissue, over)
        tissue[mask] = T[name]


class Scan(NamedTuple):
    tissue: np.ndarray  # uint8: organ ids 1..13, lesion ids, other tissues >= 20, 0 outside the field of view
    hu: np.ndarray  # float32, -1024 outside the field of view
    affine: np.ndarray  # RAS
    look: Look  # the intensities drawn


def synthesise(
    lmap: LabelMap,
    affine: np.ndarray,
    shape,
    seed: int,
    intensity: str = "ct",
    lesions: tuple[str, ...] = (),
    augment: bool = True,
    deformation_mm: tuple[float, float] = (3.0, 8.0),
) -> Scan:
    """One subject from a real map on the grid (``affine``, ``shape``), deterministic for ``seed``.

    ``augment=False`` leaves out the random affine, the deformation and the random field-of-view cuts: the
    organs are then the map's, placed on the canonical centroids and resampled (nearest).
    """
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"unknown intensity mode {intensity!r}; choose one of {', '.join(INTENSITY_MODES)}")
    rng = np.random.default_rng(seed)
    mode = intensity if intensity != "mixed" else ("random" if rng.random() < 0.5 else "ct")
    axes = grid_axes(affine, shape)
    deformation = rng.uniform(*deformation_mm)
    labels, valid = warp_labels(lmap, affine, shape, rng if augment else None, deformation)
    if augment:
        valid &= random_fov(labels, axes, rng)
    tissue = draw_body(labels, axes, rng)
    vessels = liver_vessels(tissue, axes, rng)
    add_lesions(tissue, axes, rng, tuple(lesions), vessels)
    look = draw_look(rng, mode)
    hu = render_intensities(tissue, axes, look, rng, liver_vessels=vessels)
    spacing = [abs(float(affine[i, i])) for i in range(3)]
    hu = scanner(hu, spacing, look, rng)
    tissue[~valid] = 0
    hu[~valid] = PAD_HU
    return Scan(tissue, hu, affine, look)


@lru_cache(maxsize=4)
def _load(path: str) -> LabelMap:
    return load_label_map(path)


class AnatomySource:
    """Subjects synthesised from the real label maps of a folder, for the cohort writers of ``cohorts.py``.

    The Learn2Reg-like validation scans come from maps no training scan uses (``MapPools``); the scanner's
    noise is part of each subject, so the cohort writers add none.
    """

    noise_hu = 0.0

    def __init__(
        self,
        folder: str | Path,
        intensity: str = "ct",
        include_sets: tuple[str, ...] = (),
        record: Path | None = None,
    ):
        if intensity not in INTENSITY_MODES:
            raise ValueError(
                f"unknown intensity mode {intensity!r}; choose one of {', '.join(INTENSITY_MODES)}"
            )
        self.folder = Path(folder)
        self.intensity = intensity
        self.fingerprint = folder_fingerprint(folder)
        known = None
        if record is not None and record.exists():  # the organs of each map, as read last time
            old = json.loads(record.read_text())
            if old.get("fingerprint") == self.fingerprint:
                known = old.get("organs")
        self.pools: MapPools = map_pools(folder, include_sets, organs=known)

    @property
    def description(self) -> str:
        return f"Synthesised from real organ label maps ({self.folder.name}, intensity mode {self.intensity})"

    def record(self) -> dict:
        """What made the cohorts (written beside them, checked on reuse)."""
        return {
            "anatomy": str(self.folder.resolve()),
            "intensity": self.intensity,
            "validation_maps": [p.name for p in self.pools.validation],
            "l2r_maps": [p.name for p in self.pools.l2r],
            "other_maps": [p.name for p in self.pools.other],
            "left_out": [list(x) for x in self.pools.left_out],
            "fingerprint": self.fingerprint,
            "organs": {name: sorted(ids) for name, ids in self.pools.organs.items()},
        }

    def scale(self, preset: Preset) -> float:
        """Real anatomy keeps its size on every grid (real scans on the demo grid are cut, not shrunk)."""
        return 1.0

    def map_for(self, role: str, index: int) -> Path:
        pool = {
            "l2r_validation": self.pools.validation,
            "l2r_training": self.pools.l2r,
            "native": self.pools.other,
        }[role]
        return pool[index % len(pool)]

    def subject(
        self, sid: int, preset: Preset, role: str, index: int, tumours: tuple[str, ...] = ()
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if role == "native":
            shape = tuple(int(math.ceil(f / preset.spacing)) for f in NATIVE_FOV_MM)
        else:
            shape = preset.shape
        affine = grid_affine(preset.spacing, shape)
        lmap = _load(str(self.map_for(role, index)))
        # the validation scans stand in for real CT pairs: CT-plausible intensities whatever the training scans get
        intensity = "ct" if role == "l2r_validation" else self.intensity
        scan = synthesise(lmap, affine, shape, sid, intensity, tumours)
        return scan.tissue, scan.hu, scan.affine


def write_record(out: Path, source: AnatomySource) -> None:
    """Record the source of the cohorts in ``out``; refuse to mix cohorts of another source."""
    from ..atomic import atomic_write_text

    path = out / "ANATOMY.json"
    record = source.record()
    if path.exists():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in ("anatomy", "intensity")} != {
            k: record[k] for k in ("anatomy", "intensity")
        }:
            raise ValueError(
                f"{out} holds cohorts synthesised from {old.get('anatomy')} (intensity {old.get('intensity')}); "
                f"write these to another folder or delete it"
            )
    atomic_write_text(path, json.dumps(record, indent=2))
