"""A fresh clone, with no ``shared/`` beside it, passes: what needs the schema says why it skipped."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.bundle_import import REPO, SCHEMA_VARIABLE

METADATA_TESTS = [
    "tests/preprocessing/test_preprocess.py::test_metadata_is_valid",
    "tests/segmentation/test_bundle.py::test_verify_metadata",
    "tests/registration/test_network.py::test_verify_metadata",
]


def test_metadata_tests_skip_with_a_reason_without_the_schema(tmp_path):
    env = {**os.environ, SCHEMA_VARIABLE: str(tmp_path / "absent" / "meta_schema_20240725.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *METADATA_TESTS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "3 skipped" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-3000:]
    reasons = [ln for ln in proc.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert reasons and all(f"set {SCHEMA_VARIABLE}" in ln for ln in reasons), proc.stdout[-3000:]
