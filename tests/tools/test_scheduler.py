"""The pipeline runner's scheduling: which stages wait for which, and ``jobs`` running stages at once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from abdoreg.pipeline import Runner, dependencies, load_pipeline

DEMO = Path(__file__).resolve().parents[2] / "tools" / "abdoreg" / "pipelines" / "demo.yaml"


def _deps(stages, name):
    return dependencies(stages)[name]


@pytest.mark.parametrize("pipeline", sorted(p.stem for p in DEMO.parent.glob("*.yaml")))
def test_every_stage_names_configs_its_bundle_has(pipeline, tmp_path):
    """A config listed for the wrong bundle (e.g. the registration recipe on the segmentation stage) fails
    only when that stage is reached, minutes into a run: catch it when the file is read."""
    _, stages = load_pipeline(DEMO.parent / f"{pipeline}.yaml", tmp_path)
    bundles = DEMO.parents[3] / "bundles"
    missing = [
        f"{s.name}: {s.bundle}/configs/{c}"
        for s in stages
        if s.bundle
        for c in s.configs
        if not (bundles / s.bundle / "configs" / c).is_file()
    ]
    assert not missing, missing


def test_demo_dependencies_follow_inputs_and_outputs(tmp_path):
    _, stages = load_pipeline(DEMO, tmp_path)
    assert _deps(stages, "preprocess_l2r") == {"synth"}
    # every later preprocessing stage waits for the reference (l2r) cohort; none of them run concurrently
    assert "preprocess_l2r" in _deps(stages, "preprocess_kits")
    assert "preprocess_msd_liver" in _deps(stages, "preprocess_kits")
    seg = _deps(stages, "segmentation_train")
    assert {s.name for s in stages if s.name.startswith("preprocess")} <= seg
    # the fine-tuning stage waits for its pretraining, not for the unrelated trainings
    ft = _deps(stages, "registration_pseudo_pretraining")
    assert "registration_pseudo_pretraining_pretrain" in ft and "registration_baseline" not in ft
    assert "registration_symmetric" not in _deps(stages, "registration_pseudo_pretraining_pretrain")
    assert "segmentation_train" not in _deps(stages, "registration_baseline")
    assert {s.name for s in stages if s.name.startswith("evaluate")} <= _deps(stages, "report")


def _write_pipeline(path: Path, stages: list[dict], jobs: int) -> Path:
    path.write_text(json.dumps({"jobs": jobs, "stages": stages}))  # JSON is YAML
    return path


class _Recorder:
    """Stands in for the stage processes: records start/end times, sleeps, writes the outputs."""

    def __init__(self, fail: str | None = None) -> None:
        self.times: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()
        self.fail = fail

    def __call__(self, stage) -> None:
        t0 = time.monotonic()
        time.sleep(0.3)
        if stage.name == self.fail:
            raise RuntimeError(f"stage {stage.name} failed")
        for out in stage.outputs:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(stage.name)
        with self.lock:
            self.times[stage.name] = (t0, time.monotonic())


def _stages(work: Path) -> list[dict]:
    return [
        {"name": "a", "outputs": [f"{work}/a/out.txt"]},
        {"name": "b", "inputs": [f"{work}/a/out.txt"], "outputs": [f"{work}/b/out.txt"]},
        {"name": "c", "inputs": [f"{work}/a/out.txt"], "outputs": [f"{work}/c/out.txt"]},
        {"name": "d", "inputs": [f"{work}/b/out.txt", f"{work}/c"], "outputs": [f"{work}/d/out.txt"]},
    ]


@pytest.mark.parametrize("jobs", [1, 2])
def test_jobs_run_independent_stages_together_and_respect_dependencies(tmp_path, jobs):
    work = tmp_path / "work"
    runner = Runner(_write_pipeline(tmp_path / "p.yaml", _stages(work), jobs), work, echo=lambda _: None)
    rec = _Recorder()
    runner._execute = rec
    rows = runner.run()
    assert {r[0] for r in rows} == {"a", "b", "c", "d"} and {r[1] for r in rows} == {"done"}
    t = rec.times
    assert t["a"][1] <= min(t["b"][0], t["c"][0]), "b and c read a's output"
    assert max(t["b"][1], t["c"][1]) <= t["d"][0], "d reads b's and c's outputs"
    overlap = min(t["b"][1], t["c"][1]) - max(t["b"][0], t["c"][0])
    assert (overlap > 0.1) == (jobs == 2), f"b and c overlap by {overlap:.2f} s with jobs={jobs}"
    # a second run skips everything
    runner2 = Runner(tmp_path / "p.yaml", work, echo=lambda _: None)
    runner2._execute = _Recorder()
    assert {r[1] for r in runner2.run()} == {"skipped"}


def test_a_failed_stage_stops_new_stages_and_raises(tmp_path):
    work = tmp_path / "work"
    runner = Runner(_write_pipeline(tmp_path / "p.yaml", _stages(work), 2), work, echo=lambda _: None)
    rec = _Recorder(fail="b")
    runner._execute = rec
    with pytest.raises(RuntimeError, match="stage b failed"):
        runner.run()
    assert "c" in rec.times, "the stage running beside the failed one finishes"
    assert "d" not in rec.times, "nothing that depends on the failed stage starts"
    assert not (work / "stamps" / "b.json").exists() and (work / "stamps" / "c.json").exists()


def test_after_names_an_earlier_stage(tmp_path):
    bad = [{"name": "a", "after": ["b"]}, {"name": "b"}]
    with pytest.raises(ValueError, match="not earlier stages"):
        load_pipeline(_write_pipeline(tmp_path / "p.yaml", bad, 1), tmp_path)
