"""ConvexAdam baseline (the convexadam package): field direction on a known shift, and the config end to end."""

from __future__ import annotations

import json

import numpy as np
import scipy.ndimage as ndi
import torch

from tests.bundle_import import import_bundle_module, run_bundle

F = import_bundle_module("registration", "scripts.fields")
C = import_bundle_module("registration", "scripts.convex_adam")

# Fewer Adam iterations than the default 80 (config), to keep the tests short.
FAST = {"grid_sp": 4, "disp_hw": 4, "selected_niter": 20}


def test_convex_adam_field_direction():
    rng = np.random.default_rng(0)
    fixed = ndi.gaussian_filter(rng.standard_normal((40, 32, 48)), 2) * 300
    fixed[8:32, 6:26, 10:38] += 400
    moving = np.zeros_like(fixed)
    moving[3:] = fixed[:-3]  # moving(x + 3 e0) = fixed(x): the field must be about +3 along axis 0
    field, seconds = C.register_pair(fixed, moving, clip_hu=None, device="cpu", **FAST)
    assert field.shape == (*fixed.shape, 3) and field.dtype == np.float32 and seconds > 0
    inner = (slice(8, -8),) * 3
    mean = field[inner].reshape(-1, 3).mean(axis=0)
    assert 2.5 < mean[0] < 3.5 and abs(mean[1]) < 0.3 and abs(mean[2]) < 0.3, mean
    warped = F.warp_image(torch.as_tensor(moving), F.field_to_ddf(field), cval=0.0).numpy()
    assert np.abs(warped - fixed)[inner].mean() < 0.5 * np.abs(moving - fixed)[inner].mean()


def test_convex_adam_config_end_to_end(tiny_preprocessed, tmp_path):
    out = tmp_path / "convexadam"
    run_bundle(
        "registration",
        ["inference.json", "evaluate.json", "convexadam_baseline.json"],
        {"datalist": str(tiny_preprocessed), "output_dir": str(out), "convexadam": FAST},
    )
    data = json.loads((out / "metrics.json").read_text())
    s = data["summary"]
    assert s["num_pairs"] == 3 and data["method"] == "convexadam"
    assert all(case["runtime_s"] > 0 for case in data["cases"])
    assert s["dice"] > s["dice_initial"] + 0.02  # a real registration, scored by the same writer
    fields = sorted(p.name for p in (out / "submission").iterdir())
    assert len(fields) == 3 and all(f.startswith("disp_") and f.endswith("_0000.nii.gz") for f in fields)
