"""Inference and evaluation configs end to end (tiny data, untrained stand-in network), outputs,
geometry of one raw pair, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_import import REPO, bundle_dir, import_bundle_module, run_bundle

F = import_bundle_module("registration", "scripts.fields")
S = import_bundle_module("registration", "scripts.syn")

# A tiny MONAI network standing in for the trained model (zero-initialised output: identity field).
STANDIN = {
    "network_def": {
        "_target_": "LocalNet",
        "spatial_dims": 3,
        "in_channels": 2,
        "out_channels": 3,
        "num_channel_initial": 4,
        "extract_levels": [2],
        "out_activation": None,
        "out_kernel_initializer": "zeros",
    },
    "input_windows": [[400, 40]],
    "require_checkpoint": False,
}


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "standin.json"
    path.write_text(json.dumps(STANDIN))
    return path


def configs(stage: str, standin: Path) -> list[str]:
    """inference.json alone, or with a stage override (evaluate.json, ...), then the stand-in network."""
    return ["inference.json", *([] if stage == "inference.json" else [stage]), str(standin)]


def test_evaluate_model_and_field_folder(tiny_preprocessed, standin, tmp_path):
    out = tmp_path / "model"
    run_bundle(
        "registration",
        configs("evaluate.json", standin),
        {"datalist": str(tiny_preprocessed), "output_dir": str(out)},
    )
    data = json.loads((out / "metrics.json").read_text())
    assert data["summary"]["num_pairs"] == 3
    # identity network: DSC is the unregistered DSC, no folding
    assert data["summary"]["dice"] == pytest.approx(data["summary"]["dice_initial"])
    assert data["summary"]["fold_fraction"] == 0.0 and (out / "metrics.csv").is_file()
    fields = sorted((out / "submission").iterdir())
    assert len(fields) == 3

    # the same config scores a folder of fields from any method: zero fields -> the same numbers
    zero_dir = tmp_path / "zero_fields"
    for f in fields:
        F.save_field(zero_dir / f.name.replace(".nii.gz", ".npz"), np.zeros(nib.load(f).shape, np.float32))
    scored = tmp_path / "scored"
    run_bundle(
        "registration",
        ["inference.json", "evaluate.json", "field_folder.json", str(standin)],
        {"datalist": str(tiny_preprocessed), "output_dir": str(scored), "field_dir": str(zero_dir)},
    )
    again = json.loads((scored / "metrics.json").read_text())
    assert again["summary"]["dice"] == pytest.approx(data["summary"]["dice"])
    assert again["method"].startswith("fields:") and not (scored / "submission").exists()


def test_inference_submission_folder(tiny_preprocessed, standin, tmp_path):
    out = tmp_path / "inf"
    run_bundle(
        "registration",
        configs("inference.json", standin),
        {"pairs_file": str(tiny_preprocessed), "pairs_key": "registration_val", "output_dir": str(out)},
    )
    datalist = json.loads(Path(tiny_preprocessed).read_text())
    shape = tuple(datalist["spatial_size"])
    expected = {F.field_name(p["fixed"], p["moving"]) for p in datalist["registration_val"]}
    assert {p.name for p in (out / "submission").iterdir()} == expected
    for name in expected:
        field = nib.load(out / "submission" / name)
        assert field.shape == (*shape, 3)
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert set(zf.namelist()) == expected
    pair = datalist["registration_val"][0]
    pair_dir = out / "pairs" / F.pair_tag(pair["fixed"], pair["moving"])
    fixed = nib.load(Path(tiny_preprocessed).parent / pair["fixed"])
    for name in ("warped_image.nii.gz", "warped_label.nii.gz", "itk_displacement.nii.gz"):
        np.testing.assert_allclose(nib.load(pair_dir / name).affine, fixed.affine, atol=1e-4)
    assert (pair_dir / "qc.png").stat().st_size > 10_000 and (pair_dir / "metrics.json").is_file()


def _scan(path: Path, axcodes_flip: bool, spacing, shape, centre_ras, offset=(0, 0, 0)) -> np.ndarray:
    """A box phantom: body (0 HU) with an organ (label 1, 80 HU), written with its own orientation/spacing."""
    aff = np.diag([*spacing, 1.0])
    if axcodes_flip:
        aff[:2] *= -1  # LPS-stored
    aff[:3, 3] = np.asarray(centre_ras) - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    ijk = np.indices(shape).reshape(3, -1)
    ras = (
        (aff[:3, :3] @ ijk + aff[:3, 3:4]).T.reshape(*shape, 3) - np.asarray(centre_ras) - np.asarray(offset)
    )
    body = (np.abs(ras) < [70, 55, 90]).all(-1)
    organ = (np.abs(ras - [20, 10, 0]) < [18, 14, 24]).all(-1)
    img = np.where(body, 0, -1000) + 80 * organ
    nib.save(nib.Nifti1Image(img.astype(np.int16), aff), path)
    nib.save(nib.Nifti1Image(organ.astype(np.uint8), aff), path.with_name(path.name.replace("img", "lab")))
    return aff


def test_one_raw_pair(standin, tmp_path):
    # fixed LPS-stored 4 mm, moving RAS-stored 5x4x3 mm, far apart in scanner coordinates
    _scan(tmp_path / "img_f.nii.gz", True, (4.0, 4.0, 4.0), (40, 32, 48), (0, 0, 0))
    _scan(tmp_path / "img_m.nii.gz", False, (5.0, 4.0, 3.0), (32, 32, 64), (300, -50, 400), offset=(6, 0, 0))
    out = tmp_path / "one"
    run_bundle(
        "registration",
        configs("inference.json", standin),
        {
            "fixed": str(tmp_path / "img_f.nii.gz"),
            "moving": str(tmp_path / "img_m.nii.gz"),
            "fixed_label": str(tmp_path / "lab_f.nii.gz"),
            "moving_label": str(tmp_path / "lab_m.nii.gz"),
            "output_dir": str(out),
            "pixdim": [6.0, 6.0, 6.0],
            "spatial_size": [32, 28, 40],
        },
    )
    pair_dir = out / "pairs" / "img_f_img_m"
    assert (out / "submission" / "disp_img_f_img_m.nii.gz").is_file()
    warped = nib.load(pair_dir / "warped_image.nii.gz")
    assert warped.shape == (32, 28, 40)
    assert np.allclose(np.abs(np.diag(warped.affine)[:3]), 6.0)
    assert nib.aff2axcodes(warped.affine) == nib.aff2axcodes(nib.load(tmp_path / "img_f.nii.gz").affine)
    metrics = json.loads((pair_dir / "metrics.json").read_text())
    assert metrics["dice"] > 0.5  # centre alignment brought the organ in; identity network
    # ANTs applying our ITK transform to the RAW moving scan gives our warped image (shift included)
    ref = S.to_ants(np.zeros(warped.shape, np.float32), warped.affine)
    raw = nib.load(tmp_path / "img_m.nii.gz")
    res = ants.apply_transforms(
        fixed=ref,
        moving=S.to_ants(raw.get_fdata(), raw.affine),
        transformlist=[str(pair_dir / "itk_displacement.nii.gz")],
        defaultvalue=-1024,
    ).numpy()
    ours = warped.get_fdata()
    inner = (slice(3, -3),) * 3
    assert np.corrcoef(res[inner].ravel(), ours[inner].ravel())[0, 1] > 0.98


@pytest.mark.parametrize("kind", ["2d", "nan", "unreadable"])
def test_bad_input_names_the_file(standin, tmp_path, kind):
    _scan(tmp_path / "img_f.nii.gz", False, (4.0, 4.0, 4.0), (20, 16, 24), (0, 0, 0))
    bad = tmp_path / "bad_moving.nii.gz"
    if kind == "2d":
        nib.save(nib.Nifti1Image(np.zeros((20, 16), np.int16), np.eye(4)), bad)
    elif kind == "nan":
        arr = np.zeros((20, 16, 24), np.float32)
        arr[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(arr, np.eye(4)), bad)
    else:
        bad.write_bytes(b"not a nifti")
    proc = run_bundle(
        "registration",
        configs("inference.json", standin),
        {"fixed": str(tmp_path / "img_f.nii.gz"), "moving": str(bad), "output_dir": str(tmp_path / "o")},
        check=False,
    )
    assert proc.returncode != 0
    assert str(bad) in proc.stderr + proc.stdout


def _copy(src: Path, dst: Path, shift_mm=(0.0, 0.0, 0.0), crop: int = 0) -> None:
    """``src`` with its header moved by ``shift_mm`` (world, mm), or its last ``crop`` slices (axis 2) removed."""
    img = nib.load(src)
    data = np.asarray(img.dataobj)
    aff = img.affine.copy()
    aff[:3, 3] += np.asarray(shift_mm)
    if crop:
        data = data[..., :-crop]
    nib.save(nib.Nifti1Image(data, aff), dst)


@pytest.mark.parametrize(
    "case, alignment",
    [("header_shift", "body centres of mass"), ("crop", "scanner coordinates kept")],
)
def test_a_scan_against_a_moved_or_cropped_copy_of_itself_stays_at_the_identity(
    tiny_cohorts, standin, tmp_path, case, alignment
):
    """A raw scan registered (identity network) against a copy with a changed header, or cropped by 10 slices, is
    put exactly where it belongs before any registration: every organ overlaps (Dice 1) and the warped scan is the
    fixed one where both have data; air, never 0 HU, where the moving scan has none; the first translation is
    reported."""
    raw = tiny_cohorts / "AbdomenCTCT"
    fixed, fixed_lab = (
        raw / "imagesTr" / "AbdomenCTCT_0001_0000.nii.gz",
        raw / "labelsTr" / "AbdomenCTCT_0001_0000.nii.gz",
    )
    shift = (37.0, -23.0, 55.0) if case == "header_shift" else (0.0, 0.0, 0.0)
    crop = 10 if case == "crop" else 0
    _copy(fixed, tmp_path / "moving.nii.gz", shift, crop)
    _copy(fixed_lab, tmp_path / "moving_lab.nii.gz", shift, crop)
    out = tmp_path / "out"
    run_bundle(
        "registration",
        configs("inference.json", standin),
        {"fixed": str(fixed), "moving": str(tmp_path / "moving.nii.gz"), "fixed_label": str(fixed_lab),
         "moving_label": str(tmp_path / "moving_lab.nii.gz"), "output_dir": str(out), "pixdim": [6.0, 6.0, 6.0],
         "spatial_size": [48, 40, 64]},
    )  # fmt: skip
    (pair_dir,) = (out / "pairs").iterdir()
    metrics = json.loads((pair_dir / "metrics.json").read_text())
    assert metrics["alignment"] == alignment
    np.testing.assert_allclose(metrics["world_shift_mm"], -np.asarray(shift), atol=1e-3)
    assert not metrics["qc_flags"]
    if (
        not crop
    ):  # the cropped copy lacks the organ parts in its missing slices: Dice < 1 there, by definition
        assert metrics["dice"] == pytest.approx(1.0, abs=1e-6)
    warped = np.asarray(nib.load(pair_dir / "warped_image.nii.gz").dataobj)
    original = np.asarray(nib.load(fixed).dataobj)
    covered = slice(None, 64 - crop) if crop else slice(None)
    np.testing.assert_allclose(warped[..., covered], original[..., covered], atol=1.0)
    warped_lab = np.asarray(nib.load(pair_dir / "warped_label.nii.gz").dataobj)
    np.testing.assert_array_equal(
        warped_lab[..., covered], np.asarray(nib.load(fixed_lab).dataobj)[..., covered]
    )
    if crop:
        assert (warped[..., 64 - crop + 1 :] == -1024).all(), "outside the cropped copy is air"


def test_a_dicom_series_folder_is_a_scan(tiny_cohorts, standin, tmp_path):
    """A DICOM series (a folder) is registered as any scan is; a folder that holds none is named in the error."""
    from abdoreg.synth.dicom import write_dicom_series

    raw = tiny_cohorts / "AbdomenCTCT" / "imagesTr"
    img = nib.load(raw / "AbdomenCTCT_0002_0000.nii.gz")
    series = tmp_path / "moving_series"
    write_dicom_series(np.asarray(img.dataobj).astype(np.int16), img.affine, series, "P2", seed=0)
    out = tmp_path / "out"
    base = {
        "fixed": str(raw / "AbdomenCTCT_0001_0000.nii.gz"),
        "pixdim": [6.0, 6.0, 6.0],
        "spatial_size": [48, 40, 64],
    }
    run_bundle(
        "registration",
        configs("inference.json", standin),
        {**base, "moving": str(series), "output_dir": str(out)},
    )
    (field,) = (out / "submission").iterdir()
    assert nib.load(field).shape == (48, 40, 64, 3)
    empty = tmp_path / "not_a_series"
    empty.mkdir()
    proc = run_bundle(
        "registration", configs("inference.json", standin),
        {**base, "moving": str(empty), "output_dir": str(tmp_path / "o2")}, check=False,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and str(empty) in log and "DICOM series" in log


def test_a_folding_or_missed_result_is_flagged_and_no_weights_warning_without_a_network(
    tiny_preprocessed, tmp_path
):
    """A field that folds many voxels is flagged in the metrics and the log (the exit code stays 0); instance
    optimisation from the identity never runs the network, so nothing warns about its weights."""
    fold = {
        "network_def": {"_target_": "tests.registration.test_inference.FoldNet"},
        "require_checkpoint": False,
    }
    path = tmp_path / "fold.json"
    path.write_text(json.dumps(fold))
    out = tmp_path / "fold"
    proc = run_bundle(
        "registration",
        ["inference.json", "evaluate.json", str(path)],
        {"datalist": str(tiny_preprocessed), "output_dir": str(out)},
        env={"PYTHONPATH": f"{REPO}{os.pathsep}{bundle_dir('registration')}"},
    )
    data = json.loads((out / "metrics.json").read_text())
    assert data["summary"]["flagged_pairs"] == data["summary"]["num_pairs"] == 3
    assert all("of the voxels fold" in case["qc_flags"] for case in data["cases"])
    assert "check this result" in proc.stdout + proc.stderr
    ident = run_bundle(
        "registration",
        ["inference.json", "evaluate.json"],
        {"datalist": str(tiny_preprocessed), "output_dir": str(tmp_path / "io"), "instance_opt": "True",
         "instance_opt_start": "identity", "instance_optimiser#iterations": [1, 1]},
    )  # fmt: skip
    assert "initial weights" not in ident.stdout + ident.stderr


class FoldNet(torch.nn.Module):
    """Stand-in network: a field that folds every voxel (it mirrors axis 0: x + u(x) = D - 1 - x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ddf = torch.zeros(x.shape[0], 3, *x.shape[2:])
        n = x.shape[2]
        ddf[:, 0] = (n - 1 - 2 * torch.arange(n, dtype=torch.float32)).view(1, n, 1, 1)
        return ddf
