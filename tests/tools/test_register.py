"""``abdoreg register``: one pair of raw scans, one command, with this repository's bundle (no weights: instance
optimisation from the identity); the exported-archive case is in test_export.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import torch

from tests.bundle_import import import_bundle_module


def test_one_command_registers_a_raw_pair_both_ways(tiny_cohorts, tmp_path):
    raw = tiny_cohorts / "AbdomenCTCT"
    fixed, moving = (raw / "imagesTr" / f"AbdomenCTCT_000{i}_0000.nii.gz" for i in (1, 2))
    labels = {
        k: str(raw / "labelsTr" / p.name) for k, p in (("--fixed_label", fixed), ("--moving_label", moving))
    }
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "abdoreg.cli", "register", str(fixed), str(moving), "--out", str(out)]
    cmd += [
        "--pixdim",
        "[6, 6, 6]",
        "--spatial_size",
        "[48, 40, 64]",
        *[x for kv in labels.items() for x in kv],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "monai.bundle run" in proc.stdout and "instance_opt_start identity" in proc.stdout
    )  # no weights here
    (pair,) = (out / "pairs").iterdir()
    for name in (
        "itk_displacement.nii.gz",
        "itk_inverse_displacement.nii.gz",
        "disp_inverse.nii.gz",
        "warped_image.nii.gz",
    ):
        assert (pair / name).is_file(), name
    (field,) = (out / "submission").iterdir()
    assert nib.load(field).shape == (48, 40, 64, 3)
    metrics = json.loads((pair / "metrics.json").read_text())
    assert metrics["dice"] > metrics["dice_initial"] + 0.05  # instance optimisation registered the pair
    assert metrics["ic_p95_mm"] < 6.0  # within a voxel of the 6 mm grid, inside the body
    # a missing scan is one message, before anything runs
    bad = subprocess.run(
        [sys.executable, "-m", "abdoreg.cli", "register", str(Path(tmp_path) / "nope.nii.gz"), str(moving)],
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 2
        and "nope.nii.gz: no such file or folder" in bad.stderr
        and "Traceback" not in bad.stderr
    )


def test_a_network_reading_predicted_labels_gets_them_from_the_command(tiny_cohorts, tmp_path):
    """--fixed_pseudo/--moving_pseudo feed a network trained with predicted labels as input (untrained weights
    here: the plumbing); without them the command fails with a message that says what to pass."""
    networks = import_bundle_module("registration", "scripts.networks")
    net = networks.GradientRegNet(
        channel_multiplier=1,
        downsample=2,
        head_type="displacement",
        pseudo_channels=13,
        input_windows=[[400, 40], [800, 100], [1000, 400]],
        input_pixdim=[6.0, 6.0, 6.0],
        input_spatial_size=[48, 40, 64],
    )
    torch.save(net.state_dict(), tmp_path / "model.pt")
    raw = tiny_cohorts / "AbdomenCTCT"
    fixed, moving = (raw / "imagesTr" / f"AbdomenCTCT_000{i}_0000.nii.gz" for i in (1, 2))
    base = [
        sys.executable,
        "-m",
        "abdoreg.cli",
        "register",
        str(fixed),
        str(moving),
        "--model",
        str(tmp_path / "model.pt"),
    ]
    missing = subprocess.run(
        [*base, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=600
    )
    assert missing.returncode != 0 and "reads predicted labels" in missing.stderr + missing.stdout
    assert "--fixed_pseudo/--moving_pseudo" in missing.stderr + missing.stdout
    pseudo = [
        "--fixed_pseudo",
        str(raw / "labelsTr" / fixed.name),
        "--moving_pseudo",
        str(raw / "labelsTr" / moving.name),
    ]
    ok = subprocess.run(
        [*base, "--out", str(tmp_path / "b"), *pseudo], capture_output=True, text=True, timeout=600
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    (field,) = (tmp_path / "b" / "submission").iterdir()
    assert nib.load(field).shape == (48, 40, 64, 3)
