"""The synthetic phantom: deterministic, realistic enough, and in each cohort's native layout."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage
from scipy import ndimage

from abdoreg.synth import PRESETS, generate
from abdoreg.synth.phantom import ORGANS, TISSUE_IDS, render, sample_subject


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = [
        2 * ((a == o) & (b == o)).sum() / ((a == o).sum() + (b == o).sum())
        for o in range(1, 14)
        if (a == o).any() and (b == o).any()
    ]
    return float(np.mean(scores))


def test_same_seed_same_subject_other_seed_other_anatomy():
    preset = PRESETS["tiny"]
    t1, h1, _ = render(sample_subject(3, preset.scale), preset)
    t2, h2, _ = render(sample_subject(3, preset.scale), preset)
    t3, _, _ = render(sample_subject(4, preset.scale), preset)
    assert np.array_equal(t1, t2) and np.array_equal(h1, h2)
    assert not np.array_equal(t1, t3)
    assert set(ORGANS.values()) <= set(np.unique(t1).tolist()), "every one of the 13 organs is drawn"


def test_hounsfield_units_are_portal_venous_like():
    preset = PRESETS["small"]
    tissue, hu, _ = render(sample_subject(1, preset.scale), preset)
    # Median inside each tissue, away from its border (partial volume with air or bone there).
    core = {name: ndimage.binary_erosion(tissue == tid) for name, tid in TISSUE_IDS.items()}
    mean = {name: float(np.median(hu[mask])) for name, mask in core.items() if mask.sum() > 100}
    assert 40 < mean["liver"] < 80 and 30 < mean["spleen"] < 70
    assert 120 < mean["aorta"] < 200 and 110 < mean["left_kidney"] < 170
    assert -130 < mean["subcutaneous_fat"] < -70 and mean["lung"] < -700 and mean["marrow"] > 200


def test_layouts_geometry_and_unregistered_dice(tmp_path):
    root = generate(tmp_path, size="tiny", n_l2r=6, n_other=1, log=lambda _: None)
    meta = json.loads((root / "AbdomenCTCT" / "AbdomenCTCT_dataset.json").read_text())
    assert meta["tensorImageShape"]["0"] == [48, 40, 64] and len(meta["training"]) == 6
    assert [(p["fixed"][-21:], p["moving"][-21:]) for p in meta["registration_val"]] == [
        ("AbdomenCTCT_0001_0000.nii.gz"[-21:], "AbdomenCTCT_0004_0000.nii.gz"[-21:])
    ]
    for task in ("Task03_Liver", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon"):
        ds = json.loads((root / task / "dataset.json").read_text())
        assert (root / task / ds["training"][0]["image"]).exists() and (
            root / task / ds["training"][0]["label"]
        ).exists()
    kits = nib.load(root / "kits19" / "data" / "case_00000" / "imaging.nii.gz")
    liver = nib.load(root / "Task03_Liver" / "imagesTr" / "liver_000.nii.gz")
    assert nib.aff2axcodes(kits.affine) == ("I", "P", "L") and nib.aff2axcodes(liver.affine) == (
        "L",
        "P",
        "S",
    )
    assert not np.allclose(
        nib.affines.voxel_sizes(liver.affine), nib.affines.voxel_sizes(liver.affine)[0]
    )  # anisotropic
    dicom = LoadImage(reader="ITKReader", image_only=True)(
        str(root / "Pancreas-CT" / "PANCREAS_0001" / "study" / "series")
    )
    label = nib.load(root / "TCIA_multiorgan_labels" / "label0001.nii.gz")
    assert tuple(dicom.shape) == label.shape and np.allclose(dicom.affine.numpy(), label.affine, atol=1e-3)
    labels = [np.asarray(nib.load(root / "AbdomenCTCT" / it["label"]).dataobj) for it in meta["training"]]
    dice = np.mean([_dice(a, b) for a, b in itertools.combinations(labels, 2)])
    assert 0.15 < dice < 0.4, f"unregistered Dice {dice:.3f} should be in the range of real data"
