"""Learn2Reg metrics on hand-computed cases (identity, known shift, fold) and their outputs. The metrics read the
ddf (3, D, H, W), the evaluator's own layout; the fields here are built as Learn2Reg fields (D, H, W, 3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.bundle_import import import_bundle_module

M = import_bundle_module("registration", "scripts.metrics")
FILES = import_bundle_module("registration", "scripts.metric_files")

SHAPE = (24, 20, 28)


def _labels(shape=SHAPE) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[4:10, 4:10, 5:12] = 1
    seg[12:20, 6:14, 10:20] = 2
    seg[5:9, 12:17, 16:24] = 6
    return seg


def test_identity_field():
    fixed, moving = _labels(), np.roll(_labels(), 1, axis=2)
    out = M.pair_metrics(np.zeros((3, *SHAPE)), fixed, moving, spacing_mm=(2.0, 2.0, 2.0))
    # identity: the warped labels are the moving labels, so DSC is the unregistered DSC
    expected = np.mean([M.dice(fixed == lab, moving == lab) for lab in (1, 2, 6)])
    assert out["dice"] == pytest.approx(expected) == pytest.approx(out["dice_initial"])
    assert math.isnan(out["dice_3"]) and math.isnan(out["hd95_3"])  # absent organ -> NaN
    assert out["sdlogj"] == pytest.approx(np.log(4.0).std()) == 0.0  # official: std(log(det + 3)), det = 1
    assert out["sdlogj_honest"] == 0.0 and out["fold_fraction"] == 0.0
    assert out["hd95_1"] == 1.0 and out["hd95_mm_1"] == 2.0  # one-voxel shift of a box


def test_known_integer_shift_is_recovered():
    fixed = _labels()
    moving = np.zeros_like(fixed)
    moving[3:] = fixed[:-3]  # moving(x + 3 e0) = fixed(x)
    ddf = np.zeros((3, *SHAPE))
    ddf[0] = 3.0
    warped = M.warp_labels(moving, ddf)
    np.testing.assert_array_equal(warped[:-3], fixed[:-3])
    out = M.pair_metrics(ddf, fixed, moving)
    assert out["dice"] == 1.0 and out["hd95"] == 0.0
    assert out["dice_initial"] < 0.7
    wrong = M.pair_metrics(-ddf, fixed, moving)  # the opposite direction is clearly worse
    assert wrong["dice"] < out["dice_initial"]


def test_fold_detected():
    ddf = np.zeros((3, *SHAPE))
    x = np.arange(SHAPE[0], dtype=float)
    ddf[0, 8:16] = (-2.5 * (x[8:16] - 12))[:, None, None]  # d(x + u)/dx = -1.5 < 0
    stats = M.jacobian_stats(ddf)
    assert stats["fold_fraction"] > 0 and stats["num_foldings"] > 0
    assert np.isfinite(stats["sdlogj"]) and stats["sdlogj"] > 0


def test_jacobian_of_affine_field():
    # u(x) = (a - 1) x along axis 0 -> det = a inside the 2-voxel-cropped border
    ddf = np.zeros((3, *SHAPE))
    ddf[0] = 0.2 * np.arange(SHAPE[0])[:, None, None]
    det = M.jacobian_determinant(ddf)
    assert det.shape == tuple(s - 4 for s in SHAPE)
    np.testing.assert_allclose(det, 1.2)


def _smooth_field(seed: int, amplitude: float) -> np.ndarray:
    """A smooth random displacement (voxels) of about ``amplitude``; large amplitudes fold."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(SHAPE), 3.0) for _ in range(3)], -1)
    return field * (amplitude / np.abs(field).max())


def _official(fixed: np.ndarray, moving: np.ndarray, disp: np.ndarray, labels, spacing) -> dict:
    """The Learn2Reg evaluator's steps, with DeepMind's surface-distance package and numpy only.

    Warp by nearest neighbour (``map_coordinates`` order 0); per organ present in both scans,
    Dice and the 95th percentile surface distance at unit spacing; SDlogJ = std(log(clip(det + 3)))
    of the Jacobian of x + u(x) by central differences with the 2-voxel border cropped
    (``np.gradient`` is a central difference inside, which is all the crop keeps).
    """
    import surface_distance as sd
    from scipy.ndimage import map_coordinates

    grid = np.meshgrid(*(np.arange(n) for n in fixed.shape), indexing="ij")
    warped = map_coordinates(moving, grid + disp.transpose(3, 0, 1, 2), order=0)
    out = {}
    for lab in labels:
        if not (fixed == lab).any() or not (moving == lab).any():
            out[f"dice_{lab}"] = out[f"hd95_{lab}"] = out[f"hd95_mm_{lab}"] = math.nan
            continue
        a, b = fixed == lab, warped == lab
        out[f"dice_{lab}"] = sd.compute_dice_coefficient(a, b)
        out[f"hd95_{lab}"] = sd.compute_robust_hausdorff(sd.compute_surface_distances(a, b, np.ones(3)), 95.0)
        distances = sd.compute_surface_distances(a, b, np.asarray(spacing, float))
        out[f"hd95_mm_{lab}"] = sd.compute_robust_hausdorff(distances, 95.0)
    jac = np.stack([np.stack(np.gradient(disp[..., c]), -1) for c in range(3)], -2) + np.eye(3)
    det = np.linalg.det(jac[2:-2, 2:-2, 2:-2])
    out["sdlogj"] = float(np.log(np.clip(det + 3, 1e-9, 1e9)).std())
    out["fold_fraction"] = float(np.mean(det <= 0))
    return out


@pytest.mark.parametrize(
    "seed, amplitude, spacing",
    [(0, 1.5, (2.0, 2.0, 2.0)), (1, 4.0, (2.0, 1.5, 3.0)), (2, 8.0, (1.0, 1.0, 1.0))],
)
def test_pair_metrics_match_the_official_evaluator_on_nonzero_fields(seed, amplitude, spacing):
    """DSC, HD95 (voxels and mm) and SDlogJ per pair against the reference implementations."""
    fixed = _labels()
    moving = np.roll(_labels(), (2, -1, 3), axis=(0, 1, 2))
    disp = _smooth_field(seed, amplitude)
    disp[..., 0] += 2.0  # plus a shift that undoes part of the roll
    ours = M.pair_metrics(np.moveaxis(disp, -1, 0), fixed, moving, labels=(1, 2, 3, 6), spacing_mm=spacing)
    ref = _official(fixed, moving, disp, (1, 2, 3, 6), spacing)
    assert any(v > 0 for k, v in ref.items() if k.startswith("hd95_") and not math.isnan(v))  # non-trivial
    for key, value in ref.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (key, ours[key], value)
    per_organ = [ref[f"dice_{lab}"] for lab in (1, 2, 6)]
    assert ours["dice"] == pytest.approx(np.mean(per_organ)) and ours["sdlogj"] > 0
    if amplitude >= 8.0:
        assert ref["fold_fraction"] > 0, "the large field should fold: SDlogJ is tested where it matters"


def test_aggregate_and_atomic_outputs(tmp_path):
    rows = [
        {"fixed": "f", "moving": f"m{i}", "dice": d, "hd95": h, "sdlogj": s}
        for i, (d, h, s) in enumerate([(0.2, 10.0, 0.1), (0.4, 8.0, 0.2), (0.6, 6.0, 0.3), (0.8, 4.0, 0.4)])
    ]
    data = FILES.write_results(tmp_path, rows)
    s = data["summary"]
    assert s["dice"] == pytest.approx(0.5) and s["dice30"] == pytest.approx(
        np.quantile([0.2, 0.4, 0.6, 0.8], 0.3)
    )
    assert s["hd95_30"] == pytest.approx(np.quantile([10, 8, 6, 4], 0.3))
    assert s["sdlogj_70"] == pytest.approx(np.quantile([0.1, 0.2, 0.3, 0.4], 0.7))
    assert data["aggregates"]["dice"]["std"] == pytest.approx(np.std([0.2, 0.4, 0.6, 0.8]))
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"]["num_pairs"] == 4
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "fixed,moving,dice,hd95,sdlogj"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
