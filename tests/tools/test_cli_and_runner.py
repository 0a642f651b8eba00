"""The CLI and the runner as a user meets them: help, typos, killed runs, failed stages, changed code.

Cheap: stand-in pipelines (one stage, or none) and stand-in stage commands, except one real
failing bundle stage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import abdoreg.bundles as bundles
from abdoreg.pipeline import Runner, load_pipeline, stage_stamp

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tools" / "abdoreg" / "pipelines" / "tiny.yaml"


def _pipeline(path: Path, stages: list[dict], variables: dict | None = None) -> Path:
    path.write_text(json.dumps({"vars": variables or {}, "stages": stages}))  # JSON is YAML
    return path


def _cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "abdoreg.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_run_help_prints_help_and_runs_nothing(tmp_path):
    config = _pipeline(tmp_path / "p.yaml", [], {"steps": "3"})
    work = tmp_path / "work"
    proc = _cli("pipeline", "run", "--help", "--config", str(config), "--work", str(work))
    assert proc.returncode == 0, proc.stderr
    assert "usage: abdoreg pipeline run" in proc.stdout and "--steps  (default: 3)" in proc.stdout
    assert not work.exists(), "--help ran the pipeline"


def test_unknown_option_is_an_error_listing_the_valid_ones(tmp_path):
    config = _pipeline(tmp_path / "p.yaml", [], {"steps": "3"})
    work = tmp_path / "work"
    proc = _cli("pipeline", "run", "--config", str(config), "--wrok", str(work), cwd=tmp_path)
    assert proc.returncode == 2 and not work.exists() and not (tmp_path / "runs").exists(), "it ran"
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("abdoreg: error: unknown option --wrok"), proc.stderr
    assert all(f"--{o}" in message for o in ("config", "work", "start", "only", "jobs", "steps")), message
    proc = _cli("pipeline", "list", "--config", str(config), "--stpes", "4")
    assert proc.returncode == 2 and "unknown option --stpes" in proc.stderr and "--steps" in proc.stderr


def test_pipeline_help_lists_its_commands():
    proc = _cli("pipeline", "--help")
    shown = proc.stdout + proc.stderr  # Fire writes help to stderr when it is not a terminal
    assert proc.returncode == 0
    commands = shown.split("COMMANDS", 1)[-1]
    assert "COMMANDS" in shown and "run" in commands and "list" in commands, shown


def test_the_stamp_covers_the_code_a_stage_runs(tmp_path, monkeypatch):
    """Editing a bundle's scripts/*.py marks the stages that run it as changed, and only those."""
    repo = tmp_path / "repo"
    for bundle in ("preprocessing", "segmentation"):
        shutil.copytree(REPO / "bundles" / bundle, repo / "bundles" / bundle)
    monkeypatch.setattr(bundles, "BUNDLES", repo / "bundles")
    _, stages = load_pipeline(TINY, tmp_path / "work")
    pre = next(s for s in stages if s.bundle == "preprocessing")
    seg = next(s for s in stages if s.bundle == "segmentation")
    before = stage_stamp(pre), stage_stamp(seg)
    with (repo / "bundles" / "preprocessing" / "scripts" / "geometry.py").open("a") as f:
        f.write("\n# a changed line\n")
    assert stage_stamp(pre) != before[0], "a change of the code the stage runs does not change its stamp"
    assert stage_stamp(seg) == before[1]


def test_a_failed_stage_shows_the_cause_from_its_log(tmp_path):
    """A real bundle stage that fails deep inside MONAI's config machinery: the root exception is shown."""
    stage = {
        "name": "preprocess_typo",
        "bundle": "preprocessing",
        "configs": ["preprocess.json"],
        "overrides": {"cohort": "kist", "input_dir": str(tmp_path), "output_dir": str(tmp_path / "out")},
        "outputs": [str(tmp_path / "out" / "datalist.json")],
    }
    runner = Runner(_pipeline(tmp_path / "p.yaml", [stage]), tmp_path / "work", echo=lambda _: None)
    with pytest.raises(RuntimeError, match="stage preprocess_typo failed") as err:
        runner.run()
    message = str(err.value)
    log = (tmp_path / "work" / "logs" / "preprocess_typo.log").read_text()
    assert "Traceback" in log and len(log.splitlines()) > 40
    assert "cohorts/kist.json" in message, f"the cause is not in the message:\n{message}"


# The stand-in for a stage process: starts a worker of its own (as preprocessing does), writes both pids.
_STAGE = (
    "import os, subprocess, sys, time;"
    "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);"
    "open(os.environ['PIDS'] + '.tmp', 'w').write(f'{os.getpid()} {w.pid}');"
    "os.replace(os.environ['PIDS'] + '.tmp', os.environ['PIDS']);"
    "time.sleep(300)"
)
# The CLI, with every bundle stage replaced by the stand-in.
_DRIVER = f"""
import sys
import abdoreg.pipeline as pipeline
from abdoreg.cli import main
pipeline.bundle_command = lambda *args, **kwargs: [sys.executable, "-c", {_STAGE!r}]
sys.argv = ["abdoreg", "pipeline", "run", "--config", sys.argv[1], "--work", sys.argv[2]]
main()
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has ended; only its exit status is left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killing_the_pipeline_ends_its_stages_and_their_workers(tmp_path, sig):
    stage = {"name": "long", "bundle": "preprocessing", "configs": ["preprocess.json"], "outputs": ["x"]}
    config = _pipeline(tmp_path / "p.yaml", [stage])
    pids_file = tmp_path / "pids"
    env = {**os.environ, "PIDS": str(pids_file)}
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(config), str(tmp_path / "work")],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    pids: list[int] = []
    try:
        deadline = time.time() + 120
        while not pids_file.exists() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert pids_file.exists(), f"the stage did not start: {driver.stderr.read().decode()[-2000:]}"
        pids = [int(v) for v in pids_file.read_text().split()]
        driver.send_signal(sig)  # the CLI only, as `kill PID` (or Ctrl-C on the CLI alone) does
        driver.wait(timeout=30)
        deadline = time.time() + 15
        while not all(_gone(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        alive = [p for p in pids if not _gone(p)]
        assert not alive, f"stage processes {alive} outlived the pipeline killed by {sig.name}"
        assert driver.returncode == 128 + sig
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def test_a_changed_finished_training_starts_afresh_and_an_interrupted_one_resumes(tmp_path, monkeypatch):
    """The bundles leave a finished training alone; after a change the runner removes its checkpoints
    (so it trains anew), while an interrupted run (no stamp) keeps them (so it resumes)."""
    models = tmp_path / "models"
    config = _pipeline(
        tmp_path / "p.yaml",
        [{"name": "train", "bundle": "registration", "configs": ["train.json"],
          "overrides": {"ckpt_dir": str(models), "max_epochs": "{epochs}"}, "outputs": [str(models / "model.pt")]}],
        {"epochs": "2"},
    )  # fmt: skip
    seen = []

    def fake_execute(self, stage):  # stands in for the bundle: records what it would resume from
        seen.append(sorted(p.name for p in models.glob("*.pt")))
        models.mkdir(exist_ok=True)
        for name in ("checkpoint_epoch=2.pt", "model.pt"):
            (models / name).write_text(stage.overrides["max_epochs"])

    monkeypatch.setattr(Runner, "_execute", fake_execute)
    Runner(config, tmp_path / "work", echo=lambda _: None).run()
    Runner(config, tmp_path / "work", echo=lambda _: None).run()  # unchanged: skipped
    assert seen == [[]]
    Runner(config, tmp_path / "work", {"epochs": "3"}, echo=lambda _: None).run()  # changed: afresh
    assert seen == [[], []]
    (tmp_path / "work" / "stamps" / "train.json").unlink()  # as if the last run had been killed
    Runner(config, tmp_path / "work", {"epochs": "3"}, echo=lambda _: None).run()
    assert seen[-1] == ["checkpoint_epoch=2.pt", "model.pt"]  # kept: the bundle resumes
