"""Shared fixtures: tiny synthetic cohorts and their preprocessed datalist (made once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.bundle_import import run_bundle

# Native folder of each cohort under the synthetic root, as `abdoreg synth` writes it.
COHORT_DIRS = {
    "l2r": "AbdomenCTCT",
    "msd_liver": "Task03_Liver",
    "msd_pancreas": "Task07_Pancreas",
    "msd_hepaticvessel": "Task08_HepaticVessel",
    "msd_spleen": "Task09_Spleen",
    "msd_colon": "Task10_Colon",
    "kits": "kits19",
    "tcia_pancreas": ".",
}
TINY = {"pixdim": [6.0, 6.0, 6.0], "spatial_size": [48, 40, 64]}

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 3D conv backward is faster on one thread here


@pytest.fixture(scope="session")
def tiny_cohorts(tmp_path_factory) -> Path:
    """Synthetic raw cohorts in their native layouts (tiny size: 6 mm, 48x40x64 L2R grid)."""
    from abdoreg.synth import generate

    root = tmp_path_factory.mktemp("raw")
    generate(root, size="tiny", n_l2r=9, n_other=3, log=lambda _: None)
    return root


def preprocess(raw: Path, out: Path, cohort: str, check: bool = True, **overrides):
    """Run the preprocessing bundle on one cohort through `python -m monai.bundle run`."""
    args = {
        "cohort": cohort,
        "input_dir": str(raw / COHORT_DIRS[cohort]),
        "output_dir": str(out),
        **TINY,
        **overrides,
    }
    return run_bundle("preprocessing", "preprocess.json", args, check=check)


@pytest.fixture(scope="session")
def tiny_preprocessed(tiny_cohorts, tmp_path_factory) -> Path:
    """Path of the merged ``datalist.json`` of all tiny cohorts, preprocessed (L2R first: it is the reference)."""
    out = tmp_path_factory.mktemp("preprocessed")
    for cohort in COHORT_DIRS:
        preprocess(tiny_cohorts, out, cohort)
    return out / "datalist.json"
