"""The pipeline CLI on the tiny configuration: every stage, skipping, resuming, fine-tuning from pretrained weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from abdoreg.pipeline import Runner, dependencies, load_pipeline
from tests import bundle_server
from tests.bundle_import import bundle_dir, import_bundle_module

TINY = Path(__file__).resolve().parents[2] / "tools" / "abdoreg" / "pipelines" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny pipeline, two independent stages at a time (rows in the order the stages finished), each stage's
    `python -m monai.bundle run` forked from the tests' server (bundle_server.popen)."""
    work = tmp_path_factory.mktemp("pipeline")
    rows = Runner(TINY, work, echo=lambda _: None, jobs=2, launch=bundle_server.popen).run()
    return work, rows


def test_every_stage_runs_through_monai_bundle(tiny_run):
    work, rows = tiny_run
    _, stages = load_pipeline(TINY, work)
    finished = [r[0] for r in rows]
    assert sorted(finished) == sorted(s.name for s in stages) and {r[1] for r in rows} == {"done"}
    waits = dependencies(stages)  # each stage once, after every stage it reads from
    assert all(finished.index(d) < finished.index(s) for s in finished for d in waits[s])
    for stage in stages:
        if stage.bundle:
            log = (work / "logs" / f"{stage.name}.log").read_text()
            assert "-m monai.bundle run" in log.splitlines()[0], stage.name
    report = json.loads((work / "report" / "report.json").read_text())
    assert set(report) >= {
        "identity",
        "baseline",
        "symmetric",
        "unsupervised_pretraining",
        "pseudo_pretraining",
        "pseudo_input",
        "pseudo_pretraining + instance_opt (pseudo)",
        "ANTs SyN",
    }
    assert (
        report["pseudo_pretraining + instance_opt (pseudo)"]["runtime_s"] > 0
    )  # fed by the real pseudo datalist
    assert (
        report["identity"]["fold_fraction"] == 0.0
        and abs(report["identity"]["dice"] - report["identity"]["dice_initial"]) < 1e-9
    )
    assert (work / "report" / "report.png").stat().st_size > 10_000
    pseudo = json.loads((work / "pseudo" / "datalist_pseudo.json").read_text())
    assert all("pseudo" in it for it in pseudo["training"]), (
        "every case, image-only cohorts included, gets a pseudo label"
    )


def test_second_run_skips_everything(tiny_run):
    work, _ = tiny_run
    rows = Runner(TINY, work, echo=lambda _: None).run()
    assert {r[1] for r in rows} == {"skipped"}


def test_changed_config_reruns_only_that_stage_and_what_depends_on_it(tiny_run):
    work, _ = tiny_run
    runner = Runner(TINY, work, echo=lambda _: None)
    stage = next(s for s in runner.stages if s.name == "evaluate_identity")
    stage.overrides["write_qc"] = "False"
    assert not runner.is_done(stage)
    assert all(
        runner.is_done(s) for s in runner.stages if s.name != "evaluate_identity" and s.name != "report"
    )


def test_finetune_starts_from_the_pretrained_weights(tiny_run):
    """Build the fine-tuning workflow as the pipeline configures it: its weights at step 0 are the pretrained ones."""
    from monai.bundle import ConfigWorkflow

    work, _ = tiny_run
    import_bundle_module("registration", "scripts.training")
    _, stages = load_pipeline(TINY, work)
    stage = next(s for s in stages if s.name == "registration_pseudo_pretraining")
    root = bundle_dir("registration")
    overrides = {k: v for k, v in stage.overrides.items()}
    overrides["ckpt_dir"] = str(
        work / "fresh_finetune"
    )  # no checkpoint of its own: must start from `pretrained`
    wf = ConfigWorkflow(
        config_file=[str(root / "configs" / c) for c in stage.configs],
        meta_file=str(root / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(root),
        **{k: _literal(v) for k, v in overrides.items()},
    )
    wf.initialize()
    net = wf.parser.get_parsed_content("network")
    pretrained = torch.load(
        work / "registration" / "pseudo_pretraining_pretrain" / "models" / "model.pt",
        map_location="cpu",
        weights_only=True,
    )
    pretrained = pretrained.get("model", pretrained)
    state = net.state_dict()
    assert state.keys() == pretrained.keys()
    assert all(torch.equal(state[k].cpu(), pretrained[k]) for k in state)
    assert any(v.abs().sum() > 0 for k, v in pretrained.items() if "weight" in k), (
        "pretrained weights are not all zero"
    )


def test_export_a_finished_training_stage(tiny_run, tmp_path):
    """`abdoreg export --stage`: the stage's model, the settings the pipeline trained it with, and the
    figures of the stage that evaluated it."""
    from abdoreg.export import export

    work, _ = tiny_run
    archive = export(
        "registration",
        stage="registration_pseudo_pretraining",
        pipeline=str(TINY),
        work=str(work),
        data="tiny synthetic cohorts (abdoreg synth)",
        out=str(tmp_path),
    )
    name = "abdominal_ct_registration"
    with zipfile.ZipFile(archive) as zf:
        meta = json.loads(zf.read(f"{name}/configs/metadata.json"))
        inference = json.loads(zf.read(f"{name}/configs/inference.json"))
        zf.extract(f"{name}/models/model.pt", tmp_path)
    variables, _ = load_pipeline(TINY, work)
    network = inference["network_def"]  # as the weights record it
    assert network["channel_multiplier"] == int(variables["reg_width"]) and network["symmetric"] is True
    assert network["input_spatial_size"] == json.loads(variables["spatial_size"])
    assert network["input_pixdim"] == json.loads(variables["pixdim"])
    evaluation = json.loads((work / "evaluation" / "pseudo_pretraining" / "metrics.json").read_text())
    assert meta["eval_metrics"]["val_mean_dice"] == pytest.approx(evaluation["summary"]["dice"])
    exported = torch.load(tmp_path / name / "models" / "model.pt", weights_only=True)
    trained = torch.load(
        work / "registration" / "pseudo_pretraining" / "models" / "model.pt", weights_only=True
    )
    trained = trained.get("model", trained)
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def _literal(value):
    import ast

    try:
        return ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        return value


def test_killed_training_resumes_from_its_checkpoint(tiny_run):
    work, _ = tiny_run
    models = work / "registration" / "baseline" / "models"
    # Ask for more epochs: the stamp changes, the stage re-runs and continues from epoch 1's checkpoint.
    cmd = [
        sys.executable,
        "-m",
        "abdoreg.cli",
        "pipeline",
        "run",
        "--config",
        str(TINY),
        "--work",
        str(work),
        "--only",
        "registration_baseline",
        "--reg_epochs",
        "4",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (models / "checkpoint_epoch=2.pt").exists():
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # interrupted mid-way: epoch 2 saved, epochs 3-4 not done
    proc.wait()
    assert (models / "checkpoint_epoch=2.pt").exists(), "the training did not reach epoch 2 in time"
    assert not (models / "checkpoint_epoch=4.pt").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = (work / "logs" / "registration_baseline.log").read_text()
    assert "Restored all variables from" in log and "checkpoint_epoch=" in log
    trainer_epochs = [ln for ln in log.splitlines() if "SupervisedTrainer" in ln and "Complete" in ln]
    assert not any("Epoch[1] Complete" in ln or "Epoch[2] Complete" in ln for ln in trainer_epochs), (
        "restarted from scratch"
    )
    assert (models / "checkpoint_epoch=4.pt").exists()
