"""ANTs SyN baseline: field direction on a known shift, and the config end to end."""

from __future__ import annotations

import json

import numpy as np
import torch

from tests.bundle_import import import_bundle_module, run_bundle
from tests.registration.test_fields import SHAPE, blob, oblique_affine

F = import_bundle_module("registration", "scripts.fields")
S = import_bundle_module("registration", "scripts.syn")

FAST_SYN = {
    "type_of_transform": "SyN",
    "reg_iterations": [20, 10, 0],
    "aff_iterations": [0, 0, 0, 0],
    "flow_sigma": 3,
    "grad_step": 0.2,
    "random_seed": 1,
}


def test_syn_field_direction(tmp_path, monkeypatch):
    """The field points into the moving scan; ANTs' transforms (a warp, its inverse, an affine per pair) go into
    a folder the product owns and deletes, never left in the system's temp folder."""
    import tempfile

    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    aff = oblique_affine()
    fixed = blob()
    moving = np.full(SHAPE, -500.0)
    moving[2:] = fixed[:-2]  # moving(x + 2 e0) = fixed(x): the field must be about +2 along axis 0
    field, seconds = S.register_pair(fixed, moving, aff, aff, clip_hu=None, **FAST_SYN)
    assert field.shape == (*SHAPE, 3) and seconds > 0
    inside = fixed > 0
    mean = field[inside].mean(axis=0)
    assert 1.3 < mean[0] < 2.7 and abs(mean[1]) < 0.5 and abs(mean[2]) < 0.5, mean
    warped = F.warp_image(torch.as_tensor(moving), F.field_to_ddf(field), cval=-500).numpy()
    before = np.abs(moving - fixed)[inside].mean()
    assert np.abs(warped - fixed)[inside].mean() < 0.7 * before
    assert list(system_temp.iterdir()) == [], "ANTs' transforms were left in the temp folder"
    out = tmp_path / "out"
    S.register_pair(fixed, moving, aff, aff, clip_hu=None, temp_dir=out, **FAST_SYN)
    assert list(out.iterdir()) == [] and list(system_temp.iterdir()) == []


def test_syn_config_end_to_end(tiny_preprocessed, tmp_path):
    out = tmp_path / "syn"
    run_bundle(
        "registration",
        ["inference.json", "evaluate.json", "syn_baseline.json"],
        {"datalist": str(tiny_preprocessed), "output_dir": str(out), "syn_registration": FAST_SYN},
    )
    data = json.loads((out / "metrics.json").read_text())
    assert data["summary"]["num_pairs"] == 3 and data["method"] == "ants_syn"
    assert all(case["runtime_s"] > 0 for case in data["cases"])
    fields = sorted(p.name for p in (out / "submission").iterdir())
    assert len(fields) == 3 and all(f.startswith("disp_") and f.endswith("_0000.nii.gz") for f in fields)
    assert (out / "submission.zip").is_file()
    hidden = [p for p in out.rglob(".*") if p.name != ".lock"]
    assert hidden == [], f"temporary files left in the output folder: {hidden}"
