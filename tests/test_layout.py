"""The repository's shape: bundles that stand alone, one atomic-write helper, one pipeline graph."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.bundle_import import REPO

BUNDLES = ("registration", "segmentation", "preprocessing")


# Helpers every holder keeps a copy of (a bundle imports nothing outside its folder): file -> its holders.
SHARED = {
    "atomic.py": (*BUNDLES, "tools"),
    "locks.py": (*BUNDLES, "tools"),
    "checkpoints.py": ("registration", "segmentation"),
    "label_checks.py": ("registration", "segmentation"),
    "errors.py": ("registration", "segmentation"),
}


@pytest.mark.parametrize("helper", sorted(SHARED))
def test_every_copy_of_a_shared_helper_is_the_same(helper):
    """A bundle imports nothing outside its folder, so each holds the helpers; the copies may not drift."""
    copies = [
        REPO / "tools" / "abdoreg" / helper
        if holder == "tools"
        else REPO / "bundles" / holder / "scripts" / helper
        for holder in SHARED[helper]
    ]
    texts = {path: path.read_text() for path in copies}
    assert len(set(texts.values())) == 1, [str(p) for p in copies]


def test_bundles_import_nothing_outside_their_folder():
    """A bundle copied alone to another machine runs: its scripts import only themselves and libraries."""
    for bundle in BUNDLES:
        for path in (REPO / "bundles" / bundle / "scripts").glob("*.py"):
            text = path.read_text()
            assert not re.search(r"^\s*(from|import)\s+(abdoreg|tests|tools)\b", text, re.M), path
        for path in (REPO / "bundles" / bundle / "configs").glob("*.json"):
            assert "../.." not in path.read_text(), f"{path}: a path outside the bundle (use dataset_dir)"


def test_zoo_files_are_there():
    assert (REPO / "LICENSE").is_file()
    for bundle in BUNDLES:
        root = REPO / "bundles" / bundle
        assert (root / "LICENSE").is_file() and (root / "docs" / "data_license.txt").is_file(), bundle
    for bundle in ("registration", "segmentation"):  # the bundles with weights
        spec = yaml.safe_load((REPO / "bundles" / bundle / "large_files.yml").read_text())
        assert [f["path"] for f in spec["large_files"]] == ["models/model.pt"]


def test_the_shipped_pipelines_share_one_graph():
    """demo, tiny, bench and full set variables and skip optional stages of ablation.yaml: none lists stages."""
    pipelines = REPO / "tools" / "abdoreg" / "pipelines"
    for name in ("demo", "tiny", "bench", "full"):
        spec = yaml.safe_load((pipelines / f"{name}.yaml").read_text())
        assert spec["graph"] == "ablation.yaml" and "stages" not in spec, name
        assert set(spec) <= {"graph", "vars", "skip", "jobs", "env"}, name


def test_no_issue_numbers_in_code_configs_or_test_names():
    pattern = re.compile(r"issue #\d+|\(#\d+\)|test_issue", re.I)
    roots = [REPO / "bundles", REPO / "tools", REPO / "tests"]
    for root in roots:
        for path in root.rglob("*"):
            if path.suffix in (".py", ".json", ".yaml", ".yml") and "__pycache__" not in path.parts:
                assert not pattern.search(path.read_text()) or path == Path(__file__), path
