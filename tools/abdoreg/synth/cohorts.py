"""Write synthetic cohorts in each public dataset's native layout, label ids and geometry.

The Learn2Reg cohort is drawn on the canonical grid (already 2 mm, 192x160x256 at full
size). The other cohorts are "acquired" from their own subjects with anisotropic spacing,
other orientations (RAS, LPS, axis-permuted KiTS-like), other fields of view and table
positions, so that preprocessing has real work to do.

The subjects come from a source: the phantom (``PhantomSource``, the default) or real organ
label maps (``anatomy.AnatomySource``, ``generate(anatomy=...)``); every layout is written the
same way from either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Protocol

import nibabel as nib
import numpy as np

from ..atomic import atomic_write, atomic_write_text
from .dicom import write_dicom_series
from .phantom import ORGANS, PRESETS, TISSUE_IDS, Preset, acquire, render, sample_subject
from .realmaps import realdata_table

L2R_LABEL_NAMES = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic vein",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}


@dataclass(frozen=True)
class Cohort:
    """How a public cohort stores its scans (full-size acquisition parameters)."""

    name: str
    spacing: tuple[float, float, float]  # mm along the array axes, at full size
    fov: tuple[float, float, float]  # mm along the array axes, at full size
    axcodes: str  # nibabel orientation codes of the array axes
    native_labels: dict[int, tuple[str, ...]]  # native id -> phantom tissues it covers
    tumours: tuple[str, ...] = ()


COHORTS: dict[str, Cohort] = {
    "msd_liver": Cohort(
        "msd_liver",
        (0.8, 0.8, 2.5),
        (400, 400, 280),
        "LPS",
        {1: ("liver", "hepatic_vessel"), 2: ("liver_tumour",)},
        ("liver",),
    ),
    "msd_pancreas": Cohort(
        "msd_pancreas",
        (0.9, 0.9, 2.5),
        (420, 420, 220),
        "RAS",
        {1: ("pancreas",), 2: ("pancreas_tumour",)},
        ("pancreas",),
    ),
    "msd_hepaticvessel": Cohort(
        "msd_hepaticvessel",
        (0.8, 0.8, 1.5),
        (400, 400, 200),
        "LAS",
        {1: ("hepatic_vessel",), 2: ("liver_tumour",)},
        ("liver", "vessels"),
    ),
    "msd_spleen": Cohort("msd_spleen", (0.8, 0.8, 5.0), (400, 400, 300), "RPS", {1: ("spleen",)}),
    "msd_colon": Cohort(
        "msd_colon", (0.75, 0.75, 3.0), (380, 380, 300), "LPS", {1: ("colon_tumour",)}, ("colon",)
    ),
    "kits": Cohort(
        "kits",
        (3.0, 0.78, 0.78),
        (240, 400, 400),
        "IPL",
        {1: ("right_kidney", "left_kidney"), 2: ("kidney_tumour",)},
        ("kidney",),
    ),
    "tcia_pancreas": Cohort(
        "tcia_pancreas",
        (0.85, 0.85, 1.5),
        (400, 400, 240),
        "LPS",
        {
            1: ("spleen",),
            2: ("left_kidney",),
            3: ("gallbladder",),
            4: ("esophagus",),
            5: ("liver",),
            6: ("stomach",),
            7: ("pancreas",),
            8: ("duodenum",),
        },
    ),
}
_ORGAN_NAMES = {oid: name for name, oid in ORGANS.items()}
# Cohorts beyond the phantom's default set (written when named): FLARE22-like (12 organs, no portal/splenic vein;
# MSD-style folder) and 3D-IRCADb-like (liver and gallbladder; 13-organ ids in images/ and labels/).
EXTRA_COHORTS: dict[str, Cohort] = {
    "flare22": Cohort(
        "flare22",
        (0.8, 0.8, 2.5),
        (400, 400, 250),
        "RAS",
        {  # FLARE22's ids (the conversion table of realdata.json); its 12, the duodenum, is none of the 13 organs
            int(fid): (_ORGAN_NAMES[oid],) if oid else ("duodenum",)
            for fid, oid in realdata_table()["sets"]["flare22"]["source"]["id_map"].items()
        },
    ),
    "ircadb": Cohort(
        "ircadb", (0.75, 0.75, 1.6), (380, 380, 200), "LPS", {4: ("gallbladder",), 6: ("liver",)}
    ),
}
MSD_TASKS = {
    "msd_liver": ("Task03_Liver", "liver", {"0": "background", "1": "liver", "2": "cancer"}),
    "msd_pancreas": ("Task07_Pancreas", "pancreas", {"0": "background", "1": "pancreas", "2": "cancer"}),
    "msd_hepaticvessel": (
        "Task08_HepaticVessel",
        "hepaticvessel",
        {"0": "background", "1": "Vessel", "2": "Tumour"},
    ),
    "msd_spleen": ("Task09_Spleen", "spleen", {"0": "background", "1": "spleen"}),
    "msd_colon": ("Task10_Colon", "colon", {"0": "background", "1": "colon cancer primaries"}),
}
ALL_COHORTS = ("l2r", *COHORTS)
KNOWN_COHORTS = (*ALL_COHORTS, *EXTRA_COHORTS)
SEED_BASE = {
    "msd_liver": 1,
    "msd_pancreas": 2,
    "msd_hepaticvessel": 3,
    "msd_spleen": 4,
    "msd_colon": 5,
    "kits": 6,
    "tcia_pancreas": 7,
    "flare22": 8,
    "ircadb": 9,
}


class SubjectSource(Protocol):
    """Where the subjects of the cohorts come from (the phantom, or real label maps)."""

    noise_hu: float  # the scanner noise the cohort writers add (0: the subjects carry their own)
    description: str

    def scale(self, preset: Preset) -> float: ...

    def subject(
        self, sid: int, preset: Preset, role: str, index: int, tumours: tuple[str, ...] = ()
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tissue ids, noiseless HU, RAS affine) on the preset's canonical grid; ``role`` is
        ``l2r_validation``, ``l2r_training`` or ``native`` (the other cohorts), ``index`` the scan's number."""
        ...


class PhantomSource:
    """The phantom's subjects (``phantom.py``), scaled to the preset's field of view."""

    noise_hu = 12.0
    description = "Synthetic phantom"

    def scale(self, preset: Preset) -> float:
        return preset.scale

    def subject(
        self, sid: int, preset: Preset, role: str, index: int, tumours: tuple[str, ...] = ()
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return render(sample_subject(sid, preset.scale, tumours), preset)


PHANTOM = PhantomSource()


def _atomic_save_nifti(img: nib.Nifti1Image, path: Path) -> None:
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def _atomic_write_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def _nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def native_lut(native_labels: dict[int, tuple[str, ...]]) -> np.ndarray:
    """Phantom tissue id -> native label id."""
    lut = np.zeros(256, np.uint8)
    for nid, tissues in native_labels.items():
        for t in tissues:
            lut[TISSUE_IDS[t]] = nid
    return lut


def native_affine(axcodes: str, spacing, shape, center_ras: np.ndarray) -> np.ndarray:
    """RAS affine of an array whose axes point along ``axcodes``, centred on ``center_ras``."""
    unit = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for col, code in enumerate(axcodes):
        row, sign = unit[code]
        aff[row, col] = sign * spacing[col]
    aff[:3, 3] = center_ras - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def l2r_validation_ids(n: int) -> list[int]:
    """Learn2Reg AbdomenCTCT validation scans: 0001, 0004, ..., 0028."""
    return [i for i in range(1, min(n, 28) + 1) if (i - 1) % 3 == 0]


def write_l2r(
    root: Path,
    n: int,
    preset: Preset,
    seed: int,
    log: Callable[[str], None],
    source: SubjectSource = PHANTOM,
) -> None:
    """Learn2Reg AbdomenCTCT: imagesTr/labelsTr and AbdomenCTCT_dataset.json."""
    root = root / "AbdomenCTCT"
    lut = native_lut({oid: (name,) for name, oid in ORGANS.items()})
    val = l2r_validation_ids(n)
    train_ids = [i for i in range(1, n + 1) if i not in val]
    training = []
    for i in range(1, n + 1):
        name = f"AbdomenCTCT_{i:04d}_0000.nii.gz"
        img_path, lab_path = root / "imagesTr" / name, root / "labelsTr" / name
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        if img_path.exists() and lab_path.exists():
            continue
        sid = seed * 100_000 + i
        role, index = ("l2r_validation", val.index(i)) if i in val else ("l2r_training", train_ids.index(i))
        tissue, hu, aff = source.subject(sid, preset, role, index)
        img, tis = acquire(tissue, hu, aff, aff, preset.shape, sid, noise_hu=source.noise_hu)
        _atomic_save_nifti(_nifti(lut[tis], aff), lab_path)
        _atomic_save_nifti(_nifti(img, aff), img_path)
        log(f"l2r {name}")
    pairs = [
        {
            "fixed": f"./imagesTr/AbdomenCTCT_{f:04d}_0000.nii.gz",
            "moving": f"./imagesTr/AbdomenCTCT_{m:04d}_0000.nii.gz",
        }
        for f, m in combinations(val, 2)
    ]
    _atomic_write_json(
        {
            "name": "AbdomenCTCT",
            "description": f"{source.description} in the Learn2Reg AbdomenCTCT layout",
            "tensorImageSize": {"0": "3D"},
            "tensorImageShape": {"0": list(preset.shape)},
            "modality": {"0": "CT"},
            "labels": {str(k): v for k, v in L2R_LABEL_NAMES.items()},
            "numTraining": n,
            "training": training,
            "registration_val": pairs,
            "registration_test": [],
        },
        root / "AbdomenCTCT_dataset.json",
    )


def _acquire_native(
    cohort: Cohort, sid: int, preset: Preset, source: SubjectSource = PHANTOM, index: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A subject of ``cohort`` scanned with the cohort's geometry (scaled like the source's anatomy)."""
    rng = np.random.default_rng(sid + 31)
    s, r = source.scale(preset), preset.spacing / 2.0  # anatomy scale, resolution factor w.r.t. full size
    spacing = np.asarray(cohort.spacing) * r
    shape = tuple(int(round(f * s / sp)) for f, sp in zip(cohort.fov, spacing, strict=True))
    center = (
        np.array([rng.normal(0, 15), rng.normal(0, 15), 60 + rng.normal(0, 30)]) * s
    )  # table position, FOV
    dst = native_affine(cohort.axcodes, spacing, shape, center)
    tissue, hu, aff = source.subject(sid, preset, "native", index, cohort.tumours)
    img, tis = acquire(tissue, hu, aff, dst, shape, sid, noise_hu=source.noise_hu)
    # The scanner's world frame differs from the phantom's (table height and position): shift the affine.
    table = np.eye(4)
    table[:3, 3] = np.array([rng.normal(0, 30), rng.normal(0, 30) + 40, rng.uniform(-300, 300)]) * s
    return img, native_lut(cohort.native_labels)[tis], table @ dst


def write_cohort(
    name: str,
    root: Path,
    n: int,
    preset: Preset,
    seed: int,
    log: Callable[[str], None],
    source: SubjectSource = PHANTOM,
) -> None:
    """One non-L2R cohort in its native layout."""
    if name not in SEED_BASE:
        raise ValueError(f"unknown cohort {name!r}; known: {', '.join(KNOWN_COHORTS)}")
    cohort = {**COHORTS, **EXTRA_COHORTS}[name]
    base = SEED_BASE[name]
    ids = [seed * 100_000 + base * 1000 + i for i in range(n)]

    def scan(i: int, sid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _acquire_native(cohort, sid, preset, source, index=7 * base + i)

    if name in MSD_TASKS:
        task, prefix, labels = MSD_TASKS[name]
        d = root / task
        training = []
        for i, sid in enumerate(ids):
            fname = f"{prefix}_{i:03d}.nii.gz"
            training.append({"image": f"./imagesTr/{fname}", "label": f"./labelsTr/{fname}"})
            if (d / "imagesTr" / fname).exists() and (d / "labelsTr" / fname).exists():
                continue
            img, lab, aff = scan(i, sid)
            _atomic_save_nifti(_nifti(lab, aff), d / "labelsTr" / fname)
            _atomic_save_nifti(_nifti(img, aff), d / "imagesTr" / fname)
            log(f"{name} {fname}")
        _atomic_write_json(
            {
                "name": task.split("_", 1)[1],
                "modality": {"0": "CT"},
                "labels": labels,
                "numTraining": n,
                "training": training,
                "test": [],
            },
            d / "dataset.json",
        )
    elif name == "kits":
        for i, sid in enumerate(ids):
            case = root / "kits19" / "data" / f"case_{i:05d}"
            if (case / "imaging.nii.gz").exists() and (case / "segmentation.nii.gz").exists():
                continue
            img, lab, aff = scan(i, sid)
            _atomic_save_nifti(_nifti(lab, aff), case / "segmentation.nii.gz")
            _atomic_save_nifti(_nifti(img.astype(np.float32), aff), case / "imaging.nii.gz")
            log(f"kits case_{i:05d}")
    elif name == "tcia_pancreas":
        for i, sid in enumerate(ids, start=1):
            series = root / "Pancreas-CT" / f"PANCREAS_{i:04d}" / "study" / "series"
            label = root / "TCIA_multiorgan_labels" / f"label{i:04d}.nii.gz"
            if label.exists() and series.exists():
                continue
            img, lab, aff = scan(i, sid)
            write_dicom_series(img, aff, series, patient_id=f"PANCREAS_{i:04d}", seed=sid)
            _atomic_save_nifti(_nifti(lab, aff), label)
            log(f"tcia PANCREAS_{i:04d}")
    elif name == "flare22":
        d = root / "FLARE22"
        training = []
        for i, sid in enumerate(ids, start=1):
            img_name, lab_name = f"FLARE22_Tr_{i:04d}_0000.nii.gz", f"FLARE22_Tr_{i:04d}.nii.gz"
            training.append({"image": f"./imagesTr/{img_name}", "label": f"./labelsTr/{lab_name}"})
            if (d / "imagesTr" / img_name).exists() and (d / "labelsTr" / lab_name).exists():
                continue
            img, lab, aff = scan(i - 1, sid)
            _atomic_save_nifti(_nifti(lab, aff), d / "labelsTr" / lab_name)
            _atomic_save_nifti(_nifti(img, aff), d / "imagesTr" / img_name)
            log(f"flare22 {img_name}")
        labels = {"0": "background", **{str(k): "/".join(v) for k, v in cohort.native_labels.items()}}
        _atomic_write_json(
            {
                "name": "FLARE22",
                "modality": {"0": "CT"},
                "labels": labels,
                "numTraining": n,
                "training": training,
            },
            d / "dataset.json",
        )
    elif name == "ircadb":
        for i, sid in enumerate(ids, start=1):
            fname = f"ircadb_{i:02d}.nii.gz"
            img_path, lab_path = root / "IRCADb" / "images" / fname, root / "IRCADb" / "labels" / fname
            if img_path.exists() and lab_path.exists():
                continue
            img, lab, aff = scan(i - 1, sid)
            _atomic_save_nifti(_nifti(lab, aff), lab_path)
            _atomic_save_nifti(_nifti(img, aff), img_path)
            log(f"ircadb {fname}")


def generate(
    out_dir: str | Path,
    size: str = "tiny",
    n_l2r: int = 9,
    n_other: int = 3,
    cohorts: tuple[str, ...] | list[str] | str = ALL_COHORTS,
    seed: int = 0,
    log: Callable[[str], None] = print,
    anatomy: str | Path | None = None,
    intensity: str = "ct",
) -> Path:
    """Generate the synthetic cohorts under ``out_dir`` (existing cases are kept).

    ``anatomy``: a folder of real organ label maps to synthesise the subjects from (``anatomy.py``; intensity
    mode ``ct``, ``random`` or ``mixed``) instead of the phantom.
    """
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[size]
    out = Path(out_dir)
    names = [cohorts] if isinstance(cohorts, str) else list(cohorts)
    unknown = [c for c in names if c not in KNOWN_COHORTS]
    if unknown:
        raise ValueError(f"unknown cohort {unknown[0]!r}; known: {', '.join(KNOWN_COHORTS)}")
    source: SubjectSource = PHANTOM
    if anatomy not in (None, ""):
        from .anatomy import AnatomySource, write_record  # the anatomy generator: only when asked for

        source = AnatomySource(anatomy, intensity, record=out / "ANATOMY.json")
        write_record(out, source)
        reasons: dict[str, list[str]] = {}
        for name, why in source.pools.left_out:
            reasons.setdefault(why, []).append(name)
        for why, files in reasons.items():
            log(f"anatomy: left out {', '.join(files)}: {why}")
    elif intensity != "ct":
        raise ValueError(
            f"intensity {intensity!r} needs real label maps (anatomy=...); the phantom has its own"
        )
    elif (out / "ANATOMY.json").exists():
        raise ValueError(
            f"{out} holds cohorts synthesised from real label maps (ANATOMY.json); use another folder"
        )
    for name in names:
        if name == "l2r":
            write_l2r(out, n_l2r, preset, seed, log, source)
        else:
            write_cohort(name, out, n_other, preset, seed, log, source)
    return out
