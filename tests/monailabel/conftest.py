"""Fixtures of the MONAI Label app tests (run in .venv-monailabel: `make test-monailabel`).

A studies folder holds one synthetic scan (the fixed image), the same subject stored differently as the
moving scan (axes 0 and 1 reversed in the array with the affine saying so, moved 30/-24/18 mm in scanner
coordinates, +100 HU), both with their organ labels as the datastore's `final` labels, a 2D and a 4D
image, and a scan with a NaN voxel. The app is a copy of tools/monailabel_app whose `model/` holds copies
of the two bundles at the tiny grid (6 mm, 48x40x64) with small networks and weights saved from their
initialisation: the segmentation is untrained, and the registration network starts at the identity (zero
last layer), so what registers the pair is the bundle's raw-pair geometry (resampling from the affines,
centre alignment). Nothing here imports MONAI Label: in the core environment the test modules skip
themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bundle_import import REPO, bundle_dir

# Settings MONAI Label reads from the environment when it is imported: no file watcher on the studies.
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

APP_SRC = REPO / "tools" / "monailabel_app"
FIXED_ID, MOVING_ID = "AbdomenCTCT_0001_0000", "AbdomenCTCT_0002_0000"
SHIFT_MM = np.array([30.0, -24.0, 18.0])  # moving scan's scanner position relative to the fixed one
OFFSET_HU = 100.0  # moving intensities: the warped image must come from the moving scan, not the fixed
ORGANS = [
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland",
]  # fmt: skip

SEG_TINY = {
    "network_def": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    "pixdim": [6.0, 6.0, 6.0],
    "patch_size": [48, 40, 64],
    "sw_batch_size": 1,
}
# without a checkpoint inference.json builds GradientRegNet from these (network_def's arguments); the weights
# saved from it record them, as trained weights do
REG_TINY = {
    "network_def": {
        "in_channels": 1,
        "channel_multiplier": 1,
        "input_windows": [[400, 40]],
        "input_pixdim": [6.0, 6.0, 6.0],
        "input_spatial_size": [48, 40, 64],
    },
}


def _flip_axes(img: nib.Nifti1Image, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The same world content with the array reversed along ``axes`` (the affine updated to match)."""
    data = np.asarray(img.dataobj)
    aff = img.affine.copy()
    for ax in axes:
        data = np.flip(data, axis=ax)
        aff[:3, 3] += aff[:3, ax] * (img.shape[ax] - 1)
        aff[:3, ax] *= -1
    return np.ascontiguousarray(data), aff


@pytest.fixture(scope="session")
def studies(tmp_path_factory) -> Path:
    from abdoreg.synth import generate

    raw = generate(tmp_path_factory.mktemp("raw"), size="tiny", n_l2r=1, cohorts=("l2r",), log=lambda _: None)
    src = raw / "AbdomenCTCT"
    root = tmp_path_factory.mktemp("studies")
    labels = root / "labels" / "final"
    labels.mkdir(parents=True)
    name = f"{FIXED_ID}.nii.gz"
    shutil.copy(src / "imagesTr" / name, root / name)
    shutil.copy(src / "labelsTr" / name, labels / name)
    for folder, offset in ((root, OFFSET_HU), (labels, 0)):
        data, aff = _flip_axes(nib.load(folder / name), (0, 1))
        aff[:3, 3] += SHIFT_MM
        dtype = np.int16 if offset else np.uint8
        nib.save(nib.Nifti1Image((data + offset).astype(dtype), aff), folder / f"{MOVING_ID}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((48, 40), np.int16), np.eye(4)), root / "flat_2d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((48, 40, 64, 3), np.int16), np.eye(4)), root / "series_4d.nii.gz")
    bad = np.asarray(nib.load(labels / name).dataobj).astype(np.int16)  # a stored label with organ id 262
    bad[bad == 1] = 262
    shutil.copy(root / name, root / "bad_label_scan.nii.gz")
    nib.save(nib.Nifti1Image(bad, nib.load(labels / name).affine), labels / "bad_label_scan.nii.gz")
    nan = np.zeros((48, 40, 64), np.float32)
    nan[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(nan, np.diag([6.0, 6.0, 6.0, 1.0])), root / "nan_scan.nii.gz")
    outside = tmp_path_factory.mktemp("outside") / "other.nii.gz"
    shutil.copy(root / name, outside)
    return root


@pytest.fixture(scope="session")
def outside_scan(studies) -> Path:
    return next(p for p in studies.parent.glob("outside*/other.nii.gz"))


def _copy_bundle(name: str, dest: Path, overrides: dict) -> Path:
    """A copy of ``bundles/<name>`` (no weights or outputs) with ``overrides`` merged into inference.json."""
    out = dest / name
    shutil.copytree(
        bundle_dir(name), out, ignore=shutil.ignore_patterns("__pycache__", "eval", "logs", "*.pt")
    )
    cfg_path = out / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / "models").mkdir(exist_ok=True)
    return out


# One interpreter for all bundles (imports dominate): each bundle's `scripts` is imported from its own root.
_SAVE_INITIAL_WEIGHTS = """
import sys, torch
from monai.bundle import ConfigParser
for bundle in sys.argv[1:]:
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]
    sys.path.insert(0, bundle)
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(bundle + "/configs/inference.json")
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle + "/models/model.pt")
    sys.path.remove(bundle)
"""


def _save_initial_weights(*bundles: Path) -> None:
    """``models/model.pt`` of each bundle: the state dict of its ``network_def`` as initialised (seed 0)."""
    cmd = [sys.executable, "-c", _SAVE_INITIAL_WEIGHTS, *map(str, bundles)]
    subprocess.run(cmd, check=True, timeout=300)


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory) -> Path:
    """A copy of the app serving small copies of both bundles from its ``model/`` folder."""
    app = tmp_path_factory.mktemp("app") / "monailabel_app"
    shutil.copytree(APP_SRC, app, ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin"))
    model = app / "model"
    model.mkdir()
    _save_initial_weights(
        _copy_bundle("segmentation", model, SEG_TINY), _copy_bundle("registration", model, REG_TINY)
    )
    return app


# ---------------------------------------------------------------------------------------------
# checks shared by the in-process and the server tests
# ---------------------------------------------------------------------------------------------
def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def check_segmentation(path: str | Path, studies: Path) -> None:
    """A label map on the fixed image's grid (shape, affine), values within 0..13."""
    fixed = nib.load(studies / f"{FIXED_ID}.nii.gz")
    seg = nib.load(path)
    assert seg.shape == fixed.shape
    np.testing.assert_allclose(seg.affine, fixed.affine, atol=1e-3)
    values = np.unique(np.asarray(seg.dataobj))
    assert values.min() >= 0 and values.max() <= len(ORGANS), values


def check_registration(path: str | Path, params: dict, studies: Path) -> None:
    """The warped moving scan: fixed geometry, the moving scan's content, aligned with the fixed scan.

    Unregistered, the moving scan sits 30/-24/18 mm away in scanner coordinates; the returned image must
    match the fixed one far better than the moving scan placed by its own affine does, and carry the
    moving scan's +100 HU (so it is not the fixed image sent back). Its warped labels must match the
    fixed labels.
    """
    from nibabel.processing import resample_from_to

    fixed = nib.load(studies / f"{FIXED_ID}.nii.gz")
    fixed_data = fixed.get_fdata()
    warped = nib.load(path)
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-3)
    warped_data = warped.get_fdata()
    as_placed = resample_from_to(
        nib.load(studies / f"{MOVING_ID}.nii.gz"), fixed, order=1, cval=-1024
    ).get_fdata()
    registered, unregistered = _corr(warped_data, fixed_data), _corr(as_placed, fixed_data)
    assert registered > 0.99 and unregistered < registered - 0.1, (registered, unregistered)
    assert np.median(warped_data - fixed_data) == pytest.approx(OFFSET_HU, abs=1.0)

    assert params["fixed"] == FIXED_ID and params["moving"] == MOVING_ID
    out = Path(params["output_dir"])
    assert out.parent == studies / "registration" and out.is_dir()
    l2r = nib.load(params["displacement_field"]["learn2reg"])
    assert Path(params["displacement_field"]["learn2reg"]).name == "disp_0001_0000_0002_0000.nii.gz"
    assert l2r.shape == (*fixed.shape, 3)
    itk_field = nib.load(params["displacement_field"]["itk"])
    assert itk_field.header.get_intent()[0] == "vector" and itk_field.shape[:3] == fixed.shape
    np.testing.assert_array_equal(nib.load(params["warped_image"]).get_fdata(), warped_data)
    assert params["labels"] == {
        "fixed": str((studies / "labels" / "final" / f"{FIXED_ID}.nii.gz").resolve()),
        "moving": str((studies / "labels" / "final" / f"{MOVING_ID}.nii.gz").resolve()),
    }
    fixed_label = np.asarray(nib.load(params["labels"]["fixed"]).dataobj)
    warped_label = np.asarray(nib.load(params["warped_label"]).dataobj)
    assert (warped_label == fixed_label).mean() > 0.99
    assert params["metrics"]["dice"] > 0.99 and params["metrics"]["fold_fraction"] == 0.0


def assert_no_label_saved(studies: Path, image_id: str = FIXED_ID) -> None:
    """Nothing stored as a label of the fixed image besides the `final` label the test put there."""
    saved = [p for p in (studies / "labels").rglob(f"{image_id}*") if p.parent.name != "final"]
    assert not saved, saved
