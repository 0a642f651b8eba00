"""Test-time instance optimisation: recovers a known shift (sign and axis), the Dice term on predicted labels
raises Dice, the switch off gives exactly the network's field, pseudo labels are found from the segmentation
bundle's datalist, and the evaluation config runs it end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.engines import SupervisedEvaluator
from monai.networks.blocks import Warp

from tests.bundle_import import import_bundle_module, run_bundle

IO = import_bundle_module("registration", "scripts.instance_opt")
PAIR_LISTS = import_bundle_module("registration", "scripts.pair_lists")
ERRORS = import_bundle_module("registration", "scripts.errors")
FIELDS = import_bundle_module("registration", "scripts.fields")
SOURCES = import_bundle_module("registration", "scripts.field_sources")
TRAINING = import_bundle_module("registration", "scripts.training")

SHAPE = (32, 32, 40)


def blobs(shift=(0.0, 0.0, 0.0), shape=SHAPE, n=14, seed=1) -> torch.Tensor:
    """(1, 1, *shape) smooth random image: Gaussian blobs, all moved by ``shift`` voxels."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    img = torch.zeros(shape)
    for _ in range(n):
        centre = torch.rand(3, generator=gen) * (torch.tensor(shape) - 16.0) + 8.0 + torch.tensor(shift)
        radius = 2.5 + 2.5 * torch.rand(1, generator=gen)
        img += torch.exp(-((grid - centre.view(3, 1, 1, 1)) ** 2).sum(0) / (2 * radius**2))
    return img[None, None]


@pytest.mark.parametrize("axis, shift", [(0, 3.0), (1, -2.5), (2, 3.0)])
@pytest.mark.parametrize(
    "schedule",
    [(2, 80, None), ([4, 2], [40, 20], None), ([4, 2], [40, 20], "mind")],
    ids=["one level", "coarse to fine", "coarse to fine on MIND features"],
)
def test_recovers_a_known_shift_from_the_identity(axis, shift, schedule):
    move = [0.0, 0.0, 0.0]
    move[axis] = shift
    fixed, moving = blobs(), blobs(tuple(move))  # moving(y) = fixed(y - shift): u = +shift along ``axis``
    spacing, iterations, features = schedule
    options = {"features": IO.MINDFeatures(dilation=1, spacing=2), "sim_weight": 12.0} if features else {}
    ddf = IO.InstanceOptimiser(iterations=iterations, grid_spacing=spacing, **options)(moving, fixed)
    assert ddf.shape == (1, 3, *SHAPE)
    inner = ddf[0, :, 8:-8, 8:-8, 8:-8].mean(dim=(1, 2, 3))
    assert inner[axis] == pytest.approx(shift, abs=0.6), inner
    others = [inner[i] for i in range(3) if i != axis]
    assert all(abs(float(o)) < 0.3 for o in others), inner
    warped = Warp(mode="bilinear", padding_mode="border")(moving, ddf)
    assert F.mse_loss(warped, fixed) < 0.25 * F.mse_loss(moving, fixed)


def test_schedule_needs_one_iteration_count_per_level_and_zero_steps_keep_the_start():
    with pytest.raises(ValueError, match="one whole number of iterations"):
        IO.InstanceOptimiser(iterations=[40], grid_spacing=[4, 2])
    start = torch.randn(1, 3, *SHAPE)
    out = IO.InstanceOptimiser(iterations=[0, 0], grid_spacing=[4, 2])(blobs(), blobs((1.0, 0.0, 0.0)), start)
    assert torch.equal(out, start)


def _sphere(centre, radius=5.0, shape=SHAPE) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    return ((grid - torch.tensor(centre).view(3, 1, 1, 1)) ** 2).sum(0) <= radius**2


def test_dice_term_on_predicted_labels_raises_dice():
    """Flat images (no image signal): only the Dice term on the label maps can move the field."""
    fixed_seg = torch.zeros(1, 1, *SHAPE)
    fixed_seg[0, 0][_sphere((16, 16, 14))] = 1
    fixed_seg[0, 0][_sphere((16, 16, 27), 4.0)] = 2
    moving_seg = torch.roll(fixed_seg, shifts=4, dims=3)  # both organs 4 voxels further along the last axis
    flat = torch.zeros(1, 3, *SHAPE)

    def dice(ddf):
        return float(TRAINING.pair_dice(moving_seg, fixed_seg, ddf, [1, 2]).nanmean())

    before = dice(torch.zeros(1, 3, *SHAPE))
    without = IO.InstanceOptimiser(iterations=60, dice_weight=0.0)(flat, flat, None, moving_seg, fixed_seg)
    with_dice = IO.InstanceOptimiser(iterations=60, dice_weight=1.0)(flat, flat, None, moving_seg, fixed_seg)
    assert dice(without) == pytest.approx(before)
    assert dice(with_dice) > before + 0.2 and dice(with_dice) > 0.8, (before, dice(with_dice))
    with pytest.raises(ValueError, match="predicted labels"):
        IO.InstanceOptimiser(dice_weight=1.0)(flat, flat)


class _FieldNet(torch.nn.Module):
    """A stand-in network with a non-trivial (random, smooth) field."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.tanh(self.conv(x))


def _run(iteration) -> dict:
    torch.manual_seed(0)
    net = _FieldNet()
    data = [{"input_moving": blobs((0, 2, 0))[0], "input_fixed": blobs()[0]}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=torch.utils.data.DataLoader(data, batch_size=1),
        network=net,
        prepare_batch=SOURCES.InferenceBatch(),
        iteration_update=iteration,
        decollate=False,
    )
    evaluator.run()
    out = evaluator.state.output
    return {"pred": FIELDS.ddf_of(out["pred"]), "runtime_s": out.get("runtime_s")}


def test_switch_off_gives_exactly_the_network_field():
    reference = _run(None)["pred"]  # MONAI's own evaluator iteration
    assert reference.abs().max() > 0.1  # the stand-in's field is not the identity
    optimiser = IO.InstanceOptimiser(iterations=20)
    for enabled in (False, "false", "False"):  # the CLI may pass the switch as text
        off = _run(IO.InstanceOptIteration(optimiser, enabled=enabled))
        assert torch.equal(off["pred"], reference)
        assert len(off["runtime_s"]) == 1 and off["runtime_s"][0] > 0
    assert torch.equal(_run(IO.InstanceOptIteration(IO.InstanceOptimiser(iterations=0)))["pred"], reference)
    refined = _run(IO.InstanceOptIteration(optimiser, enabled=True))["pred"]
    assert not torch.equal(refined, reference)
    identity = _run(IO.InstanceOptIteration(None, start="identity"))["pred"]
    assert torch.count_nonzero(identity) == 0


def test_a_run_is_labelled_by_what_it_ran():
    """The outputs' ``method`` (metrics.json, run.json, QC titles) names the start and the refinement."""
    optimiser = IO.InstanceOptimiser(iterations=1)
    assert IO.InstanceOptIteration(optimiser, enabled=False).method == "network"
    assert IO.InstanceOptIteration(optimiser).method == "network + instance_opt"
    assert IO.InstanceOptIteration(None, start="identity").method == "identity"
    with_labels = IO.InstanceOptimiser(dice_weight=1.0)
    assert IO.InstanceOptIteration(with_labels, start="identity").method == "identity + instance_opt (pseudo)"


def test_pseudo_labels_come_from_the_segmentation_datalist(tmp_path):
    (tmp_path / "pre" / "l2r" / "images").mkdir(parents=True)
    (tmp_path / "seg" / "l2r" / "pseudo_labels").mkdir(parents=True)
    scans = {
        c: tmp_path / "pre" / "l2r" / "images" / f"AbdomenCTCT_{c}_0000.nii.gz" for c in ("0001", "0004")
    }
    pseudo = {c: tmp_path / "seg" / "l2r" / "pseudo_labels" / f"AbdomenCTCT_{c}_0000.nii.gz" for c in scans}
    # the segmentation bundle writes paths relative to its own folder
    items = [
        {"image": f"../pre/l2r/images/{p.name}", "pseudo": f"l2r/pseudo_labels/{p.name}"}
        for p in scans.values()
    ]
    datalist = tmp_path / "seg" / "datalist_pseudo.json"
    datalist.write_text(json.dumps({"training": items[:1], "validation": items[1:], "registration_val": []}))
    pairs = [{"fixed": str(scans["0001"]), "moving": str(scans["0004"]), "fixed_label": "true_labels.nii.gz"}]
    out = PAIR_LISTS.attach_pseudo_labels(pairs, str(datalist))
    assert Path(out[0]["fixed_pseudo"]) == pseudo["0001"] and Path(out[0]["moving_pseudo"]) == pseudo["0004"]
    assert out[0]["fixed_label"] == "true_labels.nii.gz"  # the metrics keep the true labels

    stranger = tmp_path / "pre" / "l2r" / "images" / "AbdomenCTCT_0007_0000.nii.gz"
    with pytest.raises(ERRORS.InputError, match="AbdomenCTCT_0007_0000"):
        PAIR_LISTS.attach_pseudo_labels(
            [{"fixed": str(scans["0001"]), "moving": str(stranger)}], str(datalist)
        )


def test_evaluate_with_instance_optimisation_from_identity(tiny_preprocessed, tmp_path):
    """evaluate.json, no network: image + Dice on the (stand-in) predicted labels beats the identity, and
    every pair reports its time. The stand-in pseudo labels are the scans' label maps, for plumbing only."""
    datalist = json.loads(tiny_preprocessed.read_text())
    items = [
        {
            "image": str(tiny_preprocessed.parent / it["image"]),
            "pseudo": str(tiny_preprocessed.parent / it["label"]),
        }
        for it in datalist["validation"]
    ]
    pseudo = tmp_path / "datalist_pseudo.json"
    pseudo.write_text(json.dumps({"validation": items}))
    out = tmp_path / "io"
    run_bundle(
        "registration",
        ["inference.json", "evaluate.json"],
        {
            "datalist": str(tiny_preprocessed),
            "output_dir": str(out),
            "spatial_size": [48, 40, 64],
            "pixdim": [6.0, 6.0, 6.0],
            "instance_opt": True,
            "instance_opt_start": "identity",
            "instance_opt_dice_weight": 1.0,
            "pseudo_datalist": str(pseudo),
            "write_qc": False,
            "num_workers": 0,
        },
    )
    data = json.loads((out / "metrics.json").read_text())
    assert data["summary"]["num_pairs"] == 3
    assert data["summary"]["dice"] > data["summary"]["dice_initial"] + 0.1
    assert all(case["runtime_s"] > 0 for case in data["cases"])
    assert np.isfinite(data["summary"]["fold_fraction"])
