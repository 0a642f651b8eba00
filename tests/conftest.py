"""Shared fixtures: tiny synthetic cohorts and their preprocessed datalist (made once per session, also when
pytest-xdist spreads the tests over several workers), and the order in which those workers get the files."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
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


def session_folder(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build`` fills once per test session. Under pytest-xdist the first worker that asks builds
    it in the session's common temporary folder, holding a file lock, and the others wait for it and reuse it
    (the recipe of the xdist docs); a worker that failed half-way leaves no mark, so the next one builds anew."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.mktemp(name)
        build(path)
        return path
    common = tmp_path_factory.getbasetemp().parent  # one per session, shared by its workers
    path, done = common / name, common / f"{name}.done"
    with open(common / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_cohorts(tmp_path_factory) -> Path:
    """Synthetic raw cohorts in their native layouts (tiny size: 6 mm, 48x40x64 L2R grid)."""
    from abdoreg.synth import generate

    return session_folder(
        tmp_path_factory,
        "raw",
        lambda root: generate(root, size="tiny", n_l2r=9, n_other=3, log=lambda _: None),
    )


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

    def build(out: Path) -> None:
        for cohort in COHORT_DIRS:
            preprocess(tiny_cohorts, out, cohort)

    return session_folder(tmp_path_factory, "preprocessed", build) / "datalist.json"


# The end-to-end runs that stay long (several processes, trainings, a whole pipeline), marked `slow` in this one
# place: `pytest -m "not slow"` is the quick loop while developing; `make test` (and so CI) runs them.
SLOW = (
    "tests/tools/test_pipeline.py",  # every stage of the tiny pipeline, and a training killed and resumed
    "tests/tools/test_register.py",  # `abdoreg register` on raw pairs: the CLI and its bundle process
    "tests/tools/test_export.py::test_download_offline_load_and_run_outside_the_repository",
    "tests/tools/test_export.py::test_register_one_pair_with_an_exported_archive",
    "tests/tools/test_bench_infer.py::test_bench_infer_tiny_default_row",
    "tests/registration/test_multi_inference.py",  # torchrun, two processes
    "tests/registration/test_training.py::test_multi_gpu_train_torchrun_gloo",
    "tests/registration/test_exact_outputs_and_clear_failures.py::test_seeded_syn_run_is_reproducible",
    "tests/segmentation/test_bundle.py::test_multi_gpu_config_under_torchrun_gloo",
)
# The files whose shared fixtures take longest (the tiny pipeline, two segmentation trainings, the export's runs
# outside the repository): with pytest-xdist (`make test`: `-n 2 --dist loadfile`, each file on one worker, so
# that a module's fixtures are built once) they are handed out first, so that the workers finish together.
LONGEST_FIRST = (
    "tests/tools/test_pipeline.py",
    "tests/segmentation/test_bundle.py",
    "tests/tools/test_export.py",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    """Mark the tests of ``SLOW`` (an entry that names no test of its file is an error: renamed?); under
    pytest-xdist, the files of ``LONGEST_FIRST`` first (otherwise in the order collected)."""
    for entry in SLOW:
        path, _, name = entry.partition("::")
        module = next((item.module for item in items if item.nodeid.split("::")[0] == path), None)
        if module is not None and name and not hasattr(module, name):
            raise pytest.UsageError(f"tests/conftest.py SLOW names {entry}, which is not a test (renamed?)")
    for item in items:
        file, _, rest = item.nodeid.partition("::")
        if file in SLOW or f"{file}::{rest.split('[')[0]}" in SLOW:
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
