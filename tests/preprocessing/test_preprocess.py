"""The preprocessing bundle on every synthetic cohort layout, run as a user runs it."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bundle_import import REPO, bundle_dir, import_bundle_module, metadata_schema, run_bundle
from tests.conftest import COHORT_DIRS, TINY, preprocess

PRE = import_bundle_module("preprocessing", "scripts.preprocess")
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
    assert ref.shape == tuple(TINY["spatial_size"])
    assert np.allclose(nib.affines.voxel_sizes(ref.affine), TINY["pixdim"])
    for cohort in COHORT_DIRS:
        items = _items(dl, cohort)
        assert len(items) >= 3, cohort
        for it in items:
            img = nib.load(root / it["image"])
            assert img.shape == tuple(TINY["spatial_size"]), it["image"]
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
    datalists = {p: p.stat().st_mtime_ns for p in out.glob("datalist*.json")}
    second = preprocess(raw, out, "l2r")
    assert "0 processed, 9 unchanged" in second.stdout + second.stderr
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "l2r").rglob("*.nii.gz")}
    # a no-op re-run leaves the datalists untouched, so the pipeline's later stages stay done
    assert datalists == {p: p.stat().st_mtime_ns for p in out.glob("datalist*.json")}
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
    assert not [p for p in out.rglob("*") if _hidden(p.relative_to(out))], "temporary files left behind"
    produced = {p.name for p in out.rglob("*") if p.is_file()}
    assert not any(case in n for n in produced for case in reasons), "outputs written for a failed case"


def test_missing_reference_is_a_clear_error(tiny_cohorts, tmp_path):
    proc = preprocess(tiny_cohorts, tmp_path, "kits", check=False)
    assert proc.returncode != 0
    assert "needs a reference" in proc.stdout + proc.stderr


def test_metadata_is_valid():
    root = bundle_dir("preprocessing")
    proc = run_bundle(
        "preprocessing", "metadata.json", {"filepath": str(metadata_schema())}, entry="verify_metadata"
    )
    assert "verified with no error" in proc.stdout + proc.stderr
    assert (root / "docs" / "README.md").exists() and (root / "LICENSE").exists()


def test_truncated_gzip_is_really_truncated(tmp_path):
    """Guard for the bad-input test: half a gzip stream must not decompress."""
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), path)
    data = path.read_bytes()
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------
# Bad runs never lose or corrupt data
# ---------------------------------------------------------------------------------------------
def _args(input_dir: Path, out: Path, cohort: str, **overrides) -> dict:
    """Keyword arguments of ``run_cohort`` as the bundle config builds them (tiny grid)."""
    root = bundle_dir("preprocessing")
    return {
        "cohort": cohort,
        "input_dir": str(input_dir),
        "output_dir": str(out),
        "cohort_table": str(root / "configs" / "cohorts" / f"{cohort}.json"),
        "organs_file": str(root / "configs" / "organs.json"),
        **TINY,
        **overrides,
    }


def _copy_datalists(src: Path, out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True)
    for path in src.glob("datalist*.json"):
        shutil.copy2(path, out / path.name)
    return {p.name: p.read_bytes() for p in out.glob("datalist*.json")}


def test_empty_input_dir_is_an_error_and_keeps_the_datalist(tiny_preprocessed, tmp_path):
    out = tmp_path / "out"
    before = _copy_datalists(tiny_preprocessed.parent, out)
    (tmp_path / "empty").mkdir()
    reference = tiny_preprocessed.parent / "l2r" / "images" / "AbdomenCTCT_0001_0000.nii.gz"
    args = {"input_dir": str(tmp_path / "empty"), "reference": str(reference)}
    proc = preprocess(tmp_path, out, "kits", check=False, **args)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, "an empty cohort folder must fail"
    assert f"no cases found in {tmp_path / 'empty'}" in log and "case_XXXXX" in log, log[-2000:]
    assert {p.name: p.read_bytes() for p in out.glob("datalist*.json")} == before, "datalist changed"


def test_unknown_cohort_lists_the_known_ones(tmp_path):
    with pytest.raises(PRE.PreprocessingFailed) as err:
        PRE.run_cohort(**_args(tmp_path, tmp_path / "out", "kist"))
    message = str(err.value)
    assert "unknown cohort 'kist'" in message and "--cohort_table" in message
    assert all(name in message for name in ("kits", "l2r", "msd_liver", "folder")), message


def test_folder_cohort_labels_are_optional(tiny_cohorts, tiny_preprocessed, tmp_path):
    """A folder cohort with a label map for one scan only: the other scan is image-only, not an error."""
    src = tiny_cohorts / "Task09_Spleen"
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    for name in ("spleen_000.nii.gz", "spleen_001.nii.gz"):
        shutil.copy(src / "imagesTr" / name, mine / "images" / name)
    reference = tiny_preprocessed.parent / "l2r" / "images" / "AbdomenCTCT_0001_0000.nii.gz"
    out = tmp_path / "out"
    summary = PRE.run_cohort(**_args(mine, out, "folder", align="none", reference=str(reference)))
    assert summary["processed"] == 2 and not summary["failed"]
    items = _datalist(out / "datalist.json")["training"]
    assert [("label" in it, sum(it["annotated"])) for it in items] == [(False, 0), (False, 0)]
    (mine / "labels").mkdir()
    shutil.copy(src / "labelsTr" / "spleen_001.nii.gz", mine / "labels" / "spleen_001.nii.gz")
    PRE.run_cohort(**_args(mine, out, "folder", align="none", reference=str(reference)))
    items = {it["case"]: it for it in _datalist(out / "datalist.json")["training"]}
    assert "label" not in items["spleen_000"] and items["spleen_001"]["annotated"] == [1] * 13
    assert (np.asarray(nib.load(out / items["spleen_001"]["label"]).dataobj) == ORGAN["spleen"]).any()


# A preprocessing run killed (SIGKILL) just before its second NIfTI output is renamed into place.
_KILLED_RUN = """
import json, os, signal, sys
import scripts.preprocess as pre
rename, count = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith(".nii.gz"):
        count[0] += 1
        if count[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)
os.replace = replace
pre.run_cohort(**json.loads(sys.argv[1]))
"""


def _hidden(path: Path) -> bool:
    """A hidden file or folder, or one inside a hidden folder (where outputs are written before the rename);
    not the output folder's lock (``.lock``, held by the run that writes into the folder)."""
    return any(part.startswith(".") for part in path.parts) and path.name != ".lock"


def test_temporary_files_of_a_killed_run_are_never_read_and_are_removed(tiny_cohorts, tmp_path):
    out = tmp_path / "out"
    args = _args(tiny_cohorts / "AbdomenCTCT", out, "l2r")
    env = {**os.environ, "PYTHONPATH": str(bundle_dir("preprocessing"))}
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(args)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    left = [p for p in out.rglob("*") if p.is_file() and _hidden(p.relative_to(out))]
    assert left, "the killed run left no temporary file: the test does not test anything"
    assert not [p for p in (out / "l2r" / "images").glob("*.nii.gz") if p in left], (
        f"temporary files match the pattern that reads outputs: {left}"
    )
    PRE.run_cohort(**args)  # the re-run
    reference = PRE.find_reference(None, out)
    assert reference.name == "AbdomenCTCT_0001_0000.nii.gz", reference
    assert not [p for p in out.rglob("*") if _hidden(p.relative_to(out))], "leftovers kept"


def _grid_lies(out: Path) -> list[str]:
    """Images a datalist of ``out`` lists on another grid than the datalist states."""
    wrong = []
    for path in out.glob("datalist*.json"):
        dl = _datalist(path)
        for it in _items(dl, "l2r"):
            img = nib.load(out / it["image"])
            spacing = list(nib.affines.voxel_sizes(img.affine))
            if list(img.shape) != dl["spatial_size"] or not np.allclose(spacing, dl["pixdim"]):
                wrong.append(f"{path.name}: {it['image']} is {img.shape} at {spacing}")
    return wrong


def test_a_killed_regrid_never_leaves_a_datalist_on_another_grid(tiny_cohorts, tmp_path, monkeypatch):
    raw, out = tiny_cohorts / "AbdomenCTCT", tmp_path / "out"
    PRE.run_cohort(**_args(raw, out, "l2r"))
    coarse = {"pixdim": [8.0, 8.0, 8.0], "spatial_size": [36, 30, 48]}
    rename, count = os.replace, [0]

    def killed_after_three_images(src, dst, *args, **kwargs):
        if str(dst).endswith(".nii.gz"):
            count[0] += 1
            if count[0] > 6:  # three cases (label + image) are on the new grid, the rest on the old one
                raise KeyboardInterrupt
        return rename(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_after_three_images)
        with pytest.raises(KeyboardInterrupt):
            PRE.run_cohort(**_args(raw, out, "l2r", **coarse))
    assert not _grid_lies(out), _grid_lies(out)
    PRE.run_cohort(**_args(raw, out, "l2r", **coarse))  # the re-run completes the new grid
    assert _datalist(out / "datalist.json")["spatial_size"] == coarse["spatial_size"] and not _grid_lies(out)
    assert len(_items(_datalist(out / "datalist.json"), "l2r")) == 9


def test_a_folder_holds_one_grid(tiny_preprocessed, tiny_cohorts, tmp_path):
    """Other cohorts of the folder on another grid: refused before anything is written."""
    out = tmp_path / "out"
    before = _copy_datalists(tiny_preprocessed.parent, out)
    with pytest.raises(PRE.PreprocessingFailed, match="another output_dir") as err:
        PRE.run_cohort(
            **_args(tiny_cohorts / "AbdomenCTCT", out, "l2r", pixdim=[8.0] * 3, spatial_size=[36, 30, 48])
        )
    assert "kits (6x6x6 mm, 48x40x64 voxels)" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.glob("datalist*.json")} == before
    assert not (out / "l2r").exists()


def _doc_block(doc: str, marker: str) -> str:
    """The fenced code block that follows ``<!-- doc-test: marker -->`` in a Markdown file."""
    m = re.search(rf"<!-- doc-test: {marker} -->\s*```\w*\n(.*?)```", doc, re.S)
    assert m, f"no block marked {marker}"
    return m.group(1)


def test_documented_own_cohort_commands_work(tiny_cohorts, tmp_path):
    """The label table and the command of the docs' 'Your own scans' section, run as written (tiny grid)."""
    doc = (bundle_dir("preprocessing") / "docs" / "README.md").read_text()
    data = tmp_path / "data"
    table = json.loads(_doc_block(doc, "own-cohort-table"))
    command = _doc_block(doc, "own-cohort-run").replace("/data/", f"{data}/")
    assert f"{data}/my_scans/table.json" in command and "--reference" in command
    mine = data / "my_scans"
    for sub in ("images", "labels"):
        (mine / sub).mkdir(parents=True)
    src = tiny_cohorts / "Task03_Liver"
    for i in range(2):
        for sub, native in (("images", "imagesTr"), ("labels", "labelsTr")):
            shutil.copy(src / native / f"liver_{i:03d}.nii.gz", mine / sub / f"scan_{i + 1:03d}.nii.gz")
    (mine / "table.json").write_text(json.dumps(table))
    grid = f' --pixdim "{TINY["pixdim"]}" --spatial_size "{TINY["spatial_size"]}"'
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-ec", command.strip() + grid], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dl = _datalist(data / "preprocessed_mine" / "datalist.json")
    assert [it["case"] for it in dl["training"]] == ["scan_001", "scan_002"]
    for it in dl["training"]:
        assert it["annotated"] == [int(i == ORGAN["liver"]) for i in range(1, 14)]
        lab = np.asarray(nib.load(data / "preprocessed_mine" / it["label"]).dataobj)
        assert set(np.unique(lab)) == {0, ORGAN["liver"]}, it["label"]


def test_preprocessing_twice_gives_the_same_voxels(tiny_preprocessed, tiny_cohorts, tmp_path):
    """The same cohort preprocessed twice into two folders (aligned to the same reference by ANTs, two worker
    processes) gives identical images and labels, voxel for voxel; with the clock seed and ITK's threads
    (``--deterministic False``) it need not (measured: up to half the voxels of a KiTS case)."""
    reference = tiny_preprocessed.parent / _datalist(tiny_preprocessed)["registration_val"][0]["fixed"]
    runs = []
    for name in ("first", "second"):
        out = tmp_path / name
        preprocess(tiny_cohorts, out, "kits", reference=str(reference), num_workers=2)
        runs.append(out)
    images = sorted((runs[0] / "kits" / "images").glob("*.nii.gz"))
    assert images
    for image in images:
        for sub in ("images", "labels"):
            a = np.asarray(nib.load(runs[0] / "kits" / sub / image.name).dataobj)
            b = np.asarray(nib.load(runs[1] / "kits" / sub / image.name).dataobj)
            assert np.array_equal(a, b), (
                f"{sub}/{image.name}: {(a != b).sum()} voxels differ between two runs"
            )
