"""Learn2Reg metrics on hand-computed cases (identity, known shift, fold) and their outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.bundle_import import import_bundle_module

M = import_bundle_module("registration", "scripts.metrics")

SHAPE = (24, 20, 28)


def _labels(shape=SHAPE) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[4:10, 4:10, 5:12] = 1
    seg[12:20, 6:14, 10:20] = 2
    seg[5:9, 12:17, 16:24] = 6
    return seg


def test_identity_field():
    fixed, moving = _labels(), np.roll(_labels(), 1, axis=2)
    out = M.pair_metrics(np.zeros((*SHAPE, 3)), fixed, moving, spacing_mm=(2.0, 2.0, 2.0))
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
    field = np.zeros((*SHAPE, 3))
    field[..., 0] = 3.0
    warped = M.warp_labels(moving, field)
    np.testing.assert_array_equal(warped[:-3], fixed[:-3])
    out = M.pair_metrics(field, fixed, moving)
    assert out["dice"] == 1.0 and out["hd95"] == 0.0
    assert out["dice_initial"] < 0.7
    wrong = M.pair_metrics(-field, fixed, moving)  # the opposite direction is clearly worse
    assert wrong["dice"] < out["dice_initial"]


def test_fold_detected():
    field = np.zeros((*SHAPE, 3))
    x = np.arange(SHAPE[0], dtype=float)
    field[8:16, :, :, 0] = (-2.5 * (x[8:16] - 12))[:, None, None]  # d(x + u)/dx = -1.5 < 0
    stats = M.jacobian_stats(field)
    assert stats["fold_fraction"] > 0 and stats["num_foldings"] > 0
    assert np.isfinite(stats["sdlogj"]) and stats["sdlogj"] > 0


def test_jacobian_of_affine_field():
    # u(x) = (a - 1) x along axis 0 -> det = a inside the 2-voxel-cropped border
    field = np.zeros((*SHAPE, 3))
    field[..., 0] = 0.2 * np.arange(SHAPE[0])[:, None, None]
    det = M.jacobian_determinant(field)
    assert det.shape == tuple(s - 4 for s in SHAPE)
    np.testing.assert_allclose(det, 1.2)


def test_hd95_matches_deepmind_when_available():
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(0)
    from scipy import ndimage

    for spacing in [(1.0, 1.0, 1.0), (2.0, 1.5, 3.0)]:
        a = ndimage.gaussian_filter(rng.random(SHAPE), 2) > 0.5
        b = ndimage.gaussian_filter(rng.random(SHAPE), 2) > 0.5
        ref = sd.compute_robust_hausdorff(sd.compute_surface_distances(a, b, np.array(spacing)), 95.0)
        assert M.robust_hausdorff(a, b, spacing) == ref


def test_aggregate_and_atomic_outputs(tmp_path):
    rows = [
        {"fixed": "f", "moving": f"m{i}", "dice": d, "hd95": h, "sdlogj": s}
        for i, (d, h, s) in enumerate([(0.2, 10.0, 0.1), (0.4, 8.0, 0.2), (0.6, 6.0, 0.3), (0.8, 4.0, 0.4)])
    ]
    data = M.write_results(tmp_path, rows)
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
