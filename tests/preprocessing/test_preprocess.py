"""The preprocessing bundle on every synthetic cohort layout, run as a user runs it."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bundle_import import SCHEMA, bundle_dir, run_bundle
from tests.conftest import COHORT_DIRS, TINY, preprocess

ORGAN = {"spleen": 1, "right kidney": 2, "left kidney": 3, "liver": 6, "pancreas": 11}


def _datalist(path: Path) -> dict:
    return json.loads(path.read_text())


def _items(datalist: dict, cohort: str) -> list[dict]:
    return [
        it
        for key in ("training", "validation", "test")
        for it in datalist.get(key, [])
        if it["cohort"] == cohort
    ]


def _centroid_ras(label: nib.Nifti1Image, organ: int) -> np.ndarray:
    vox = np.argwhere(np.asarray(label.dataobj) == organ).mean(0)
    return (label.affine @ np.append(vox, 1.0))[:3]


def test_every_cohort_lands_on_the_reference_grid(tiny_preprocessed):
    root = tiny_preprocessed.parent
    dl = _datalist(tiny_preprocessed)
    assert set(dl["cohorts"]) == set(COHORT_DIRS)
    ref = nib.load(root / dl["registration_val"][0]["fixed"])
    assert ref.shape == tuple(TINY["shape"])
    assert np.allclose(nib.affines.voxel_sizes(ref.affine), TINY["spacing"])
    for cohort in COHORT_DIRS:
        items = _items(dl, cohort)
        assert len(items) >= 3, cohort
        for it in items:
            img = nib.load(root / it["image"])
            assert img.shape == tuple(TINY["shape"]), it["image"]
            assert np.allclose(img.affine, ref.affine, atol=1e-4), (
                f"{it['image']} is not on the reference grid"
            )
            assert img.get_data_dtype() == np.int16
            data = np.asarray(img.dataobj)
            assert data.min() >= -1024 and (data > -500).mean() > 0.1, f"{it['image']}: body missing"
            assert len(it["annotated"]) == 13
            if "label" in it:
                lab = nib.load(root / it["label"])
                assert np.allclose(lab.affine, ref.affine, atol=1e-4)
                ids = set(np.unique(np.asarray(lab.dataobj)).tolist()) - {0}
                assert ids <= set(range(1, 14)), f"{it['label']}: ids {ids}"
                assert ids <= {i + 1 for i, a in enumerate(it["annotated"]) if a}, (
                    f"{it['label']}: organ not annotated"
                )


def test_labels_are_remapped_to_the_13_organ_scheme(tiny_preprocessed):
    root = tiny_preprocessed.parent
    dl = _datalist(tiny_preprocessed)
    expected = {
        "l2r": set(range(1, 14)),
        "msd_liver": {6},
        "msd_pancreas": {11},
        "msd_spleen": {1},
        "kits": {2, 3},
        "tcia_pancreas": {1, 3, 4, 5, 6, 7, 11},
        "msd_hepaticvessel": set(),
        "msd_colon": set(),
    }
    for cohort, organs in expected.items():
        for it in _items(dl, cohort):
            assert {i + 1 for i, a in enumerate(it["annotated"]) if a} == organs, (cohort, it["annotated"])
            if not organs:
                assert "label" not in it, f"{cohort} has no organ labels and must be image-only"
    # The synthetic liver (native id 1 in MSD Task03, 5 in TCIA) lands on 6 and nothing else does.
    for cohort in ("msd_liver", "tcia_pancreas"):
        for it in _items(dl, cohort):
            lab = np.asarray(nib.load(root / it["label"]).dataobj)
            assert (lab == 6).sum() > 50, it["label"]


def test_kits_kidneys_are_split_by_the_patients_side(tiny_preprocessed):
    """RAS x grows towards the patient's right: the right kidney (2) must lie at larger x than the left (3)."""
    root = tiny_preprocessed.parent
    for it in _items(_datalist(tiny_preprocessed), "kits"):
        lab = nib.load(root / it["label"])
        img = nib.load(root / it["image"])
        body = np.argwhere(np.asarray(img.dataobj) > -500).mean(0)
        mid_x = (img.affine @ np.append(body, 1.0))[0]
        ids = set(np.unique(np.asarray(lab.dataobj)).tolist())
        assert ids & {2, 3}, it["label"]
        if 2 in ids:
            assert _centroid_ras(lab, 2)[0] > mid_x
        if 3 in ids:
            assert _centroid_ras(lab, 3)[0] < mid_x


def test_translation_alignment_brings_organs_to_the_reference(tiny_cohorts, tiny_preprocessed, tmp_path):
    """Scans from other scanners sit anywhere in world space; aligning to the L2R reference fixes that."""
    root = tiny_preprocessed.parent
    dl = _datalist(tiny_preprocessed)
    l2r_liver = np.mean([_centroid_ras(nib.load(root / it["label"]), 6) for it in _items(dl, "l2r")], axis=0)
    reference = root / dl["registration_val"][0]["fixed"]
    preprocess(tiny_cohorts, tmp_path, "msd_liver", align="none", reference=str(reference))
    unaligned = _datalist(tmp_path / "datalist.json")
    for it_aligned, it_raw in zip(_items(dl, "msd_liver"), _items(unaligned, "msd_liver"), strict=True):
        err_aligned = np.linalg.norm(_centroid_ras(nib.load(root / it_aligned["label"]), 6) - l2r_liver)
        raw = np.asarray(nib.load(tmp_path / it_raw["label"]).dataobj)
        err_raw = (
            np.linalg.norm(_centroid_ras(nib.load(tmp_path / it_raw["label"]), 6) - l2r_liver)
            if (raw == 6).any()
            else np.inf
        )
        assert err_aligned < 60.0, (
            f"{it_aligned['case']}: liver {err_aligned:.0f} mm from the reference after alignment"
        )
        assert err_aligned < err_raw, (
            f"{it_aligned['case']}: alignment did not help ({err_aligned:.0f} vs {err_raw:.0f} mm)"
        )


def test_l2r_pairs_and_splits(tiny_preprocessed):
    dl = _datalist(tiny_preprocessed)
    val_cases = {it["case"] for it in dl["validation"]}
    assert val_cases == {"AbdomenCTCT_0001_0000", "AbdomenCTCT_0004_0000", "AbdomenCTCT_0007_0000"}
    assert len(dl["registration_val"]) == 3
    for pair in dl["registration_val"]:
        assert set(pair) == {"fixed", "moving", "fixed_label", "moving_label"}
        assert (tiny_preprocessed.parent / pair["moving_label"]).exists()


def test_rerun_skips_unchanged_cases_and_redoes_changed_ones(tiny_cohorts, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_cohorts / "AbdomenCTCT", raw / "AbdomenCTCT")
    out = tmp_path / "out"
    first = preprocess(raw, out, "l2r", num_workers=2)
    assert "9 processed, 0 unchanged" in first.stdout + first.stderr
    stamp = {p: p.stat().st_mtime_ns for p in (out / "l2r").rglob("*.nii.gz")}
    second = preprocess(raw, out, "l2r")
    assert "0 processed, 9 unchanged" in second.stdout + second.stderr
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "l2r").rglob("*.nii.gz")}
    changed = raw / "AbdomenCTCT" / "imagesTr" / "AbdomenCTCT_0002_0000.nii.gz"
    img = nib.load(changed)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine, img.header), changed)
    third = preprocess(raw, out, "l2r")
    assert "1 processed, 8 unchanged" in third.stdout + third.stderr


def _bad_cohort(tiny_cohorts: Path, root: Path) -> dict[str, str]:
    """An MSD-layout cohort with one good case and one case per kind of bad input; returns case -> reason."""
    src = tiny_cohorts / "Task09_Spleen"
    img = nib.load(src / "imagesTr" / "spleen_000.nii.gz")
    lab = nib.load(src / "labelsTr" / "spleen_000.nii.gz")
    data, seg = np.asarray(img.dataobj), np.asarray(lab.dataobj)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases = {}

    def put(name, image=None, label=None, raw_image: bytes | None = None):
        ip, lp = root / "imagesTr" / f"{name}.nii.gz", root / "labelsTr" / f"{name}.nii.gz"
        if raw_image is not None:
            ip.write_bytes(raw_image)
        else:
            nib.save(image, ip)
        if label is not None:
            nib.save(label, lp)
        cases[name] = {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}

    put("good", img, lab)
    full = (src / "imagesTr" / "spleen_000.nii.gz").read_bytes()
    put("truncated", label=lab, raw_image=full[: len(full) // 2])
    nan = data.astype(np.float32)
    nan[3, 3, 3] = np.nan
    put("nan", nib.Nifti1Image(nan, img.affine), lab)
    put("flat", nib.Nifti1Image(data[:, :, 0], img.affine), nib.Nifti1Image(seg[:, :, 0], lab.affine))
    put("nolabel", img)
    put("mismatch", img, nib.Nifti1Image(seg[:-2], lab.affine))
    wrong = seg.copy()
    wrong[0, 0, 0] = 7
    put("badid", img, nib.Nifti1Image(wrong, lab.affine))
    (root / "dataset.json").write_text(json.dumps({"training": list(cases.values())}))
    return {
        "truncated": "unreadable or truncated",
        "nan": "NaN",
        "flat": "expected a 3D",
        "nolabel": "missing label",
        "mismatch": "does not match",
        "badid": "not in the cohort's label table",
    }


def test_bad_inputs_are_named_and_the_rest_is_done(tiny_cohorts, tiny_preprocessed, tmp_path):
    raw = tmp_path / "Task09_Spleen"
    reasons = _bad_cohort(tiny_cohorts, raw)
    out = tmp_path / "out"
    reference = tiny_preprocessed.parent / "l2r" / "images" / "AbdomenCTCT_0001_0000.nii.gz"
    args = {
        "cohort": "msd_spleen",
        "input_dir": str(raw),
        "output_dir": str(out),
        "reference": str(reference),
        **TINY,
    }
    proc = run_bundle("preprocessing", "preprocess.json", args, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "6 of 7 cases failed" in log
    for case, reason in reasons.items():
        lines = [ln for ln in log.splitlines() if f"{case}.nii.gz" in ln and reason in ln]
        assert lines, f"no error line names {case} with '{reason}':\n{log[-3000:]}"
    assert (out / "msd_spleen" / "images" / "good.nii.gz").exists()
    assert [it["case"] for it in _datalist(out / "datalist.json")["training"]] == ["good"]
    produced = {p.name for p in out.rglob("*") if p.is_file()}
    assert not [n for n in produced if n.startswith(".tmp")], "half-written files left behind"
    assert not any(case in n for n in produced for case in reasons), "outputs written for a failed case"


def test_missing_reference_is_a_clear_error(tiny_cohorts, tmp_path):
    proc = preprocess(tiny_cohorts, tmp_path, "kits", check=False)
    assert proc.returncode != 0
    assert "needs a reference" in proc.stdout + proc.stderr


def test_metadata_is_valid():
    root = bundle_dir("preprocessing")
    assert SCHEMA.exists(), f"schema not found at {SCHEMA}"
    proc = run_bundle("preprocessing", "metadata.json", {"filepath": str(SCHEMA)}, entry="verify_metadata")
    assert "verified with no error" in proc.stdout + proc.stderr
    assert (root / "docs" / "README.md").exists() and (root / "LICENSE").exists()


def test_truncated_gzip_is_really_truncated(tmp_path):
    """Guard for the bad-input test: half a gzip stream must not decompress."""
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), path)
    data = path.read_bytes()
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(data[: len(data) // 2])
