"""Nothing stale, nothing shared by accident, no traceback for a bad argument: the runner's work-dir lock, stamps
that cover every file a stage reads, and the CLI's checks of its arguments (each before any work starts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import abdoreg.bundles as bundles
from abdoreg.errors import UsageError
from abdoreg.pipeline import Runner, load_pipeline, stage_stamp

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tools" / "abdoreg" / "pipelines" / "tiny.yaml"


def _cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "abdoreg.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _one_stage(path: Path, out: Path) -> Path:
    stage = {"name": "only", "builtin": "report", "args": {"methods": {}, "out_dir": str(out)}, "outputs": []}
    path.write_text(json.dumps({"stages": [stage]}))  # JSON is YAML
    return path


# A process that holds a work folder's lock, as a running `abdoreg pipeline run` does, until it is killed.
_HOLDER = (
    "import sys, time; from abdoreg.locks import hold; hold(sys.argv[1], 'abdoreg pipeline run (demo)'); "
    "print('held', flush=True); time.sleep(600)"
)


def test_a_second_run_on_a_work_folder_in_use_is_refused_and_a_killed_ones_is_taken_over(tmp_path):
    work = tmp_path / "work"
    config = _one_stage(tmp_path / "p.yaml", tmp_path / "report")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(work)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _cli("pipeline", "run", "--config", str(config), "--work", str(work))
        assert proc.returncode == 2, proc.stderr
        assert (
            f"PID {holder.pid}" in proc.stderr and "in use" in proc.stderr and "Traceback" not in proc.stderr
        )
        assert "another --work folder" in proc.stderr
        assert not (work / "stamps" / "only.json").exists(), "the refused run ran a stage"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder was killed: its lock went with it, the next run takes the folder over and says so
    proc = _cli("pipeline", "run", "--config", str(config), "--work", str(work))
    assert proc.returncode == 0, proc.stderr
    assert (work / "stamps" / "only.json").is_file()
    assert f"PID {holder.pid}), which ended without finishing" in proc.stdout + proc.stderr
    # that run finished: the one after it takes over from nobody
    proc = _cli("pipeline", "run", "--config", str(config), "--work", str(work))
    assert proc.returncode == 0 and "ended without finishing" not in proc.stdout + proc.stderr, proc.stderr


@pytest.fixture
def repo_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the preprocessing and segmentation bundles that the runner reads instead of the real ones."""
    root = tmp_path / "repo"
    for bundle in ("preprocessing", "segmentation", "registration"):
        shutil.copytree(REPO / "bundles" / bundle, root / "bundles" / bundle)
    monkeypatch.setattr(bundles, "BUNDLES", root / "bundles")
    return root / "bundles"


@pytest.mark.parametrize(
    "edit, reruns",
    [
        (
            "preprocessing/configs/cohorts/msd_spleen.json",
            {"preprocess_msd_spleen"},
        ),  # a cohort's label table
        ("preprocessing/configs/organs.json", "all preprocessing"),  # the organ scheme every cohort maps to
        ("preprocessing/configs/preprocess.json", "all preprocessing"),  # the config the stages list
        ("preprocessing/scripts/geometry.py", "all preprocessing"),  # the code
        ("segmentation/configs/inference.json", {"segmentation_pseudo_labels"}),
    ],
)
def test_the_stamp_covers_every_file_a_stage_reads(repo_copy, tmp_path, edit, reruns):
    """Editing a cohort table, the organ scheme, a listed config or the code marks exactly the stages that read
    it as changed (a cohort table changes the stages of every cohort here, conservatively, only where it is a
    table of that stage's bundle)."""
    _, stages = load_pipeline(TINY, tmp_path / "work")
    before = {s.name: stage_stamp(s) for s in stages}
    path = repo_copy / edit
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        data["_edited"] = True
        path.write_text(json.dumps(data))
    else:
        path.write_text(path.read_text() + "\n# edited\n")
    changed = {s.name for s in stages if stage_stamp(s) != before[s.name]}
    preprocessing = {s.name for s in stages if s.bundle == "preprocessing"}
    if reruns == "all preprocessing":
        assert changed == preprocessing
    else:
        assert reruns <= changed, changed
        assert not changed - reruns - preprocessing, changed  # no other bundle's stage


@pytest.mark.parametrize("jobs", ["0", "-1", "abc"])
def test_bad_jobs_is_a_message_not_a_traceback(tmp_path, jobs):
    config = _one_stage(tmp_path / "p.yaml", tmp_path / "report")
    proc = _cli("pipeline", "run", "--config", str(config), "--work", str(tmp_path / "w"), "--jobs", jobs)
    assert proc.returncode == 2 and "--jobs" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "w" / "stamps").exists()


def test_a_work_folder_that_cannot_be_one_is_a_message(tmp_path):
    config = _one_stage(tmp_path / "p.yaml", tmp_path / "report")
    file_work = tmp_path / "a_file"
    file_work.write_text("x")
    proc = _cli("pipeline", "run", "--config", str(config), "--work", str(file_work))
    assert (
        proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
    )
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o500)
        proc = _cli("pipeline", "run", "--config", str(config), "--work", str(read_only / "w"))
        assert proc.returncode == 2 and "cannot be written" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["bench_infer", "--pairs", "0"], "--pairs 0"),
        (["bench_infer", "--methods", "fast"], "choose from reference"),
        (["bench_train", "run", "--recipes", "nonsense"], "--recipes nonsense"),
        (["bench_train", "run", "--minutes", "-5"], "--minutes -5"),
        (["bench_train", "sweep", "no_such_recipes.json", "x.json", "out"], "no_such_recipes.json: no such file"),
        (["export", "registration", "--stage", "registration_baseline", "--work", "no_such_work", "--data", "x"], "no_such_work: no such folder"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_before_any_work(tmp_path, args, says):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == [], f"work started before the arguments were checked: {made}"


def test_debug_shows_the_traceback(tmp_path):
    proc = _cli("bench_infer", "--pairs", "0", "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UsageError" in proc.stderr


def test_runner_refuses_bad_jobs_in_process(tmp_path):
    config = _one_stage(tmp_path / "p.yaml", tmp_path / "report")
    with pytest.raises(UsageError, match="at least 1"):
        Runner(config, tmp_path / "w", echo=lambda _: None, jobs=0)
