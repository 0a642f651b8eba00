"""Find the cases of a cohort in its native folder layout.

Each public data set stores scans its own way; a layout turns a folder into a list of
``Case`` records (id, image, label, split) plus, for Learn2Reg, its registration pairs.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Case:
    case: str
    image: Path
    label: Path | None = None
    split: str = "training"
    label_optional: bool = False  # an image without a label file is an image-only case, not an error


@dataclass
class CohortListing:
    cases: list[Case]
    pairs: dict[str, list[tuple[str, str]]] = field(
        default_factory=dict
    )  # list key -> [(fixed id, moving id)]


def _case_id(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _resolve(root: Path, rel: str) -> Path:
    return (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)


def _l2r(root: Path, table: dict) -> CohortListing:
    found = sorted(root.glob("*_dataset.json"))
    if not found:
        raise FileNotFoundError(
            f"no *_dataset.json in {root} (expected the Learn2Reg layout, e.g. AbdomenCTCT_dataset.json)"
        )
    meta = json.loads(found[0].read_text())
    cases: dict[str, Case] = {}
    for item in meta.get("training", []):
        img = _resolve(root, item["image"])
        lab = _resolve(root, item["label"]) if item.get("label") else None
        cases[_case_id(img)] = Case(_case_id(img), img, lab)
    pairs: dict[str, list[tuple[str, str]]] = {}
    for key in ("registration_val", "registration_test"):
        for p in meta.get(key, []):
            f, m = _resolve(root, p["fixed"]), _resolve(root, p["moving"])
            for img in (f, m):
                cid = _case_id(img)
                if cid not in cases:  # test scans come without labels
                    cases[cid] = Case(cid, img, None, "test")
            pairs.setdefault(key, []).append((_case_id(f), _case_id(m)))
    for f, m in pairs.get("registration_val", []):
        cases[f].split = cases[m].split = "validation"
    return CohortListing(list(cases.values()), pairs)


def _l2r2020(root: Path, table: dict) -> CohortListing:
    cases = []
    for img in sorted((root / "img").glob("img*.nii.gz")):
        num = img.name[3:].split(".")[0]
        lab = root / "label" / f"label{num}.nii.gz"
        cases.append(Case(_case_id(img), img, lab if lab.exists() else None))
    by_num = {c.case[3:]: c for c in cases}
    pairs: dict[str, list[tuple[str, str]]] = {}
    for csv_path in sorted(root.glob("pairs_val*.csv")):
        with csv_path.open() as fh:
            for row in csv.DictReader(fh, skipinitialspace=True):
                f, m = (by_num[f"{int(row[k]):04d}"] for k in ("fixed", "moving"))
                f.split = m.split = "validation"
                pairs.setdefault("registration_val", []).append((f.case, m.case))
    return CohortListing(cases, pairs)


def _msd(root: Path, table: dict) -> CohortListing:
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"no dataset.json in {root} (expected a Medical Segmentation Decathlon task folder)"
        )
    meta = json.loads(meta_path.read_text())
    cases = [
        Case(_case_id(_resolve(root, it["image"])), _resolve(root, it["image"]), _resolve(root, it["label"]))
        for it in meta["training"]
    ]
    for it in meta.get("test", []):
        img = _resolve(root, it if isinstance(it, str) else it["image"])
        cases.append(Case(_case_id(img), img, None, "test"))
    return CohortListing(cases)


def _kits(root: Path, table: dict) -> CohortListing:
    base = root / "data" if (root / "data").is_dir() else root
    cases = []
    for d in sorted(p for p in base.glob("case_*") if p.is_dir()):
        seg = d / "segmentation.nii.gz"
        # KiTS19 test cases come without segmentation: image only.
        cases.append(
            Case(d.name, d / "imaging.nii.gz", seg, "training")
            if seg.exists()
            else Case(d.name, d / "imaging.nii.gz", None, "test")
        )
    return CohortListing(cases)


def _dicom_folder(patient: Path) -> Path:
    """The folder of a patient holding the DICOM files (TCIA nests study/series folders)."""
    for d in [patient, *sorted(p for p in patient.rglob("*") if p.is_dir())]:
        if any(f.suffix.lower() == ".dcm" for f in d.iterdir() if f.is_file()):
            return d
    return patient  # reported as unreadable later, with this path


def _tcia(root: Path, table: dict) -> CohortListing:
    cases = []
    label_dir = root / table.get("label_dir", "labels")
    pattern = table.get("label_pattern", "label{num}.nii.gz")
    for patient in sorted(p for p in _subfolder(root, table.get("images", "images")).iterdir() if p.is_dir()):
        num = re.findall(r"\d+", patient.name)[-1]
        lab = label_dir / pattern.format(num=num)
        cases.append(Case(patient.name, _dicom_folder(patient), lab))
    return CohortListing(cases)


def _subfolder(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no {name}/ folder in {root}")
    return folder


def _folder(root: Path, table: dict) -> CohortListing:
    """Scans under ``images/``; a label map of the same name under ``labels/`` is optional."""
    cases = []
    label_dir = root / table.get("label_dir", "labels")
    for img in sorted(_subfolder(root, table.get("images", "images")).iterdir()):
        if img.name.startswith("."):
            continue
        src = _dicom_folder(img) if img.is_dir() else img
        lab = label_dir / (img.name if img.is_file() else f"{img.name}.nii.gz")
        cases.append(Case(_case_id(img), src, lab if lab.exists() else None, label_optional=True))
    return CohortListing(cases)


LAYOUTS: dict[str, Callable[[Path, dict], CohortListing]] = {
    "l2r": _l2r,
    "l2r2020": _l2r2020,
    "msd": _msd,
    "kits": _kits,
    "tcia": _tcia,
    "folder": _folder,
}


# What each layout expects, for the error that says a folder holds no case.
LAYOUT_HELP = {
    "l2r": "Expected: imagesTr/, labelsTr/ and a *_dataset.json (Learn2Reg).",
    "l2r2020": "Expected: img/img0001.nii.gz, label/label0001.nii.gz and pairs_val.csv (Learn2Reg 2020).",
    "msd": "Expected: imagesTr/, labelsTr/ and dataset.json with a non-empty 'training' list (MSD task).",
    "kits": "Expected: case_XXXXX/imaging.nii.gz folders, directly or under data/ (KiTS19).",
    "tcia": "Expected: one folder of DICOM files per patient under the table's `images` folder.",
    "folder": "Expected: NIfTI files or DICOM folders under images/ (labels/ optional).",
}


def list_cohort(root: str | Path, table: dict) -> CohortListing:
    """Cases of the cohort at ``root`` according to its table's ``layout``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cohort folder {root} does not exist")
    layout = table.get("layout")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](root, table)
