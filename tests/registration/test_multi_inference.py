"""Sharded inference: two gloo processes under torchrun split the pairs, each pair is written once,
and rank 0 writes one merged metrics table and the submission zip."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from tests.bundle_import import import_bundle_module, run_bundle
from tests.registration.test_inference import configs, standin  # noqa: F401 (fixture)

F = import_bundle_module("registration", "scripts.fields")


def test_two_processes_write_each_pair_once(tiny_preprocessed, standin, tmp_path):  # noqa: F811
    out = tmp_path / "sharded"
    proc = run_bundle(
        "registration",
        [*configs("inference.json", standin), "multi_gpu_inference.json"],
        {"pairs_file": str(tiny_preprocessed), "pairs_key": "registration_val", "output_dir": str(out)},
        nproc=2,
        env={"OMP_NUM_THREADS": "1"},
    )
    pairs = json.loads(Path(tiny_preprocessed).read_text())["registration_val"]
    root = Path(tiny_preprocessed).parent
    expected = [(str((root / p["fixed"]).resolve()), str((root / p["moving"]).resolve())) for p in pairs]
    data = json.loads((out / "metrics.json").read_text())
    # one table, every pair exactly once, in the list's order (3 pairs: rank 0 wrote two, rank 1 one)
    assert [(c["fixed"], c["moving"]) for c in data["cases"]] == expected
    assert data["summary"]["num_pairs"] == len(pairs) == 3
    assert len((out / "metrics.csv").read_text().splitlines()) == len(pairs) + 1
    names = {F.field_name(f, m) for f, m in expected}
    assert {p.name for p in (out / "submission").iterdir()} == names
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert set(zf.namelist()) == names
    assert proc.stdout.count("summary:") + proc.stderr.count("summary:") == 1  # only rank 0 merges
