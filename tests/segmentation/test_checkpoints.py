"""The segmentation bundle's checkpoints under a kill: the rerun always finds the last complete one.

The savers are built from ``configs/train.json`` as the bundle builds them, with a small model
instead of the trained network, and driven by a bare Ignite engine (seconds, no data).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from tests.bundle_import import bundle_dir, import_bundle_module

SEG = bundle_dir("segmentation")


def _parser(ckpt_dir: Path):
    from monai.bundle import ConfigParser

    import_bundle_module("segmentation", "scripts.data")  # the config's `scripts` is this bundle's
    parser = ConfigParser()
    parser.read_config(str(SEG / "configs" / "train.json"))
    parser["bundle_root"] = str(SEG)
    parser["ckpt_dir"] = str(ckpt_dir)
    parser["network"] = "$torch.nn.Linear(3, 2)"
    parser["optimizer"] = "$torch.optim.SGD(@network.parameters(), lr=0.1)"
    parser["train#checkpoint_saver#save_dict"] = {"model": "@network", "optimizer": "@optimizer"}
    return parser


def _engine(parser, epochs_done: int = 0) -> Engine:
    """An engine with both savers attached; its key metric improves every epoch (a new best each time)."""
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e):
        e.state.key_metric_name = "val_mean_dice"
        e.state.metrics = {"val_mean_dice": e.state.epoch / 100}

    parser.get_parsed_content("train#checkpoint_saver").attach(engine)
    parser.get_parsed_content("validate#checkpoint_saver").attach(engine)
    if epochs_done:
        engine.load_state_dict({"epoch": epochs_done, "epoch_length": 1, "max_epochs": epochs_done})
    return engine


def _killed_save(obj, f, *args, **kwargs):
    """torch.save cut short by a kill: half a file, then the process is gone."""
    data = b"PK\x03\x04" + b"\0" * 64
    if hasattr(f, "write"):
        f.write(data)
    else:
        Path(f).write_bytes(data)
    raise KeyboardInterrupt


def test_a_kill_while_saving_leaves_the_last_complete_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "models"
    parser = _parser(ckpt)
    engine = _engine(parser)
    engine.run([0], max_epochs=1)
    assert (ckpt / "checkpoint_epoch=1.pt").is_file() and (ckpt / "model.pt").is_file()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", _killed_save)
        with pytest.raises(KeyboardInterrupt):
            engine.run([0], max_epochs=2)
    resume = _parser(ckpt).get_parsed_content("train#resume_checkpoint")  # what a rerun resumes from
    assert Path(resume).name == "checkpoint_epoch=1.pt", resume
    state = torch.load(resume, map_location="cpu", weights_only=True)
    assert set(state["model"]) == {"weight", "bias"}
    best = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)  # the best model, intact
    assert set(best) == {"weight", "bias"}


def test_a_resumed_run_removes_the_checkpoint_it_started_from(tmp_path):
    ckpt = tmp_path / "models"
    _engine(_parser(ckpt)).run([0], max_epochs=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_epoch=2.pt", "model.pt"]
    _engine(_parser(ckpt), epochs_done=2).run([0], max_epochs=4)  # a second process, resumed at epoch 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_epoch=4.pt", "model.pt"]
