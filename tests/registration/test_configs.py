"""The bundle's configs as MONAI's tools and MONAI Label read them: inference.json alone runs a trained
model of any recipe, because the weights record the network's settings."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.utils import copy_model_state

from tests.bundle_import import bundle_dir, import_bundle_module, run_bundle

networks = import_bundle_module("registration", "scripts.networks")
CONFIGS = bundle_dir("registration") / "configs"


def _raw(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def _parsed(configs: list[str], **overrides) -> ConfigParser:
    import_bundle_module("registration", "scripts.weights")  # this bundle's ``scripts`` for the config
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser["bundle_root"] = str(bundle_dir("registration"))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_network_settings_are_written_once():
    """train.json chooses the network; inference.json and its overrides name none of its settings."""
    train = _raw("train.json")
    settings = {
        "channel_multiplier",
        "downsample",
        "head_type",
        "step_range",
        "blocks_per_level",
        "base_channels",
    }
    assert settings <= set(train)
    for name in ("inference.json", "evaluate.json", "syn_baseline.json", "convexadam_baseline.json"):
        assert not settings & set(_raw(name)), name


def test_overrides_do_not_copy_inference():
    """evaluate and the baselines are small overrides: they change outputs and the field source only."""
    infer = _raw("inference.json")
    for name in ("evaluate.json", "syn_baseline.json", "convexadam_baseline.json"):
        override = _raw(name)
        assert not set(override) & {"preprocessing", "dataset", "dataloader", "evaluator", "writer"}
        assert len(override) < len(infer) / 2


@pytest.mark.parametrize(
    "recipe",
    [
        ["train.json"],  # the bundle's default: width 4, half-resolution field, gradient heads
        ["train.json", "fast_train.json"],  # the CPU recipe: displacement heads
    ],
)
def test_inference_json_alone_builds_the_network_a_checkpoint_was_trained_as(recipe, tmp_path):
    """A model of each recipe (and the paper's network, one override away) is rebuilt by inference.json alone
    from its checkpoint, windows included, and gives the trained network's field."""
    for overrides in (
        {"channel_multiplier": 1},
        {"channel_multiplier": 1, "downsample": 1, "multi_window": False},
    ):
        trained = _parsed(recipe, **overrides).get_parsed_content("network_def").eval()
        for head in trained.heads:  # a non-identity field, so the comparison means something
            torch.nn.init.normal_(head.conv.weight, std=0.05)
        ckpt = tmp_path / "model.pt"
        torch.save(trained.state_dict(), ckpt)
        parser = _parsed(["inference.json"], ckpt_path=str(ckpt))
        built = parser.get_parsed_content("network_def", lazy=False)
        assert built.settings == trained.settings
        assert parser.get_parsed_content("input_windows", lazy=False) == trained.input_windows
        built.load_state_dict(torch.load(ckpt, weights_only=True))
        x = torch.rand(1, 2 * trained.in_channels, 32, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(built.eval()(x), trained(x))
    paper = _parsed(["train.json"], channel_multiplier=8, downsample=1).get_parsed_content("network_def")
    assert paper.downsample == 1 and sum(p.numel() for p in paper.parameters()) > 29e6


def test_weights_of_other_settings_are_refused_also_by_monai_bundle_load():
    """Same weight shapes, other head type or prediction grid: MONAI's non-strict copy (what
    ``monai.bundle.load`` does) refuses them too, naming the settings."""
    displacement = networks.GradientRegNet(
        in_channels=3, channel_multiplier=1, downsample=1, head_type="displacement"
    )
    gradient = networks.GradientRegNet(in_channels=3, channel_multiplier=1, downsample=1)
    with pytest.raises(ValueError, match="head_type: 'displacement' in the weights, 'gradient' here"):
        copy_model_state(gradient, displacement.state_dict())
    half = networks.GradientRegNet(in_channels=3, channel_multiplier=1, downsample=2)
    with pytest.raises(ValueError, match="downsample: 2 in the weights, 1 here"):
        gradient.load_state_dict(half.state_dict())


def test_weights_that_record_no_settings_are_refused_naming_the_file(tmp_path):
    """inference.json builds the network a checkpoint records; weights that record none (another network's) are
    an error that names the file, before anything runs."""
    weights = import_bundle_module("registration", "scripts.weights")
    errors = import_bundle_module("registration", "scripts.errors")
    net = networks.GradientRegNet(in_channels=1, channel_multiplier=1)
    torch.save({k: v for k, v in net.state_dict().items() if k != "_extra_state"}, tmp_path / "old.pt")
    with pytest.raises(errors.InputError, match="record no GradientRegNet settings") as info:
        weights.network_from_checkpoint(str(tmp_path / "old.pt"))
    assert str(tmp_path / "old.pt") in str(info.value)


def test_inference_without_a_checkpoint_builds_the_recommended_network(tmp_path):
    """``--require_checkpoint False`` with no weights builds GradientRegNet's defaults, which are train.json's
    network (width 4, field at half resolution, gradient heads, three CT windows), not the paper's."""
    parser = _parsed(["inference.json"], ckpt_path=str(tmp_path / "none.pt"), require_checkpoint=False)
    built = parser.get_parsed_content("network_def", lazy=False)
    recommended = _parsed(["train.json"], datalist=str(tmp_path / "none.json")).get_parsed_content(
        "network_def"
    )
    recorded_by_training = ("input_windows", "input_pixdim", "input_spatial_size")  # the training data's
    assert {k: v for k, v in built.settings.items() if k not in recorded_by_training} == {
        k: v for k, v in recommended.settings.items() if k not in recorded_by_training
    }
    assert (built.settings["channel_multiplier"], built.downsample, built.head_type, built.in_channels) == (
        4,
        2,
        "gradient",
        3,
    )
    assert sum(p.numel() for p in built.parameters()) < 10e6


@pytest.mark.parametrize("recipe", [["train.json"], ["train.json", "fast_train.json"]])
def test_paper_train_builds_the_papers_network(recipe):
    """paper_train.json, listed last, gives the paper's network: width 8, the field at full resolution,
    gradient heads, about 30.8 M parameters (as its comment says)."""
    paper = _parsed([*recipe, "paper_train.json"]).get_parsed_content("network_def")
    assert (paper.settings["channel_multiplier"], paper.downsample, paper.head_type) == (8, 1, "gradient")
    assert 29e6 < sum(p.numel() for p in paper.parameters()) < 32e6


def test_ckpt_export_single_config(tmp_path):
    """``monai.bundle ckpt_export`` with inference.json alone (traced: TorchScript cannot script the
    cumulative-sum integration's slicing); the exported module gives the eager network's field."""
    torch.manual_seed(0)
    net = networks.GradientRegNet(in_channels=3, channel_multiplier=1, downsample=2).eval()
    for head in net.heads:  # a non-identity field, so the comparison means something
        torch.nn.init.normal_(head.conv.weight, std=0.05)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "model.ts"
    run_bundle(
        "registration",
        "inference.json",
        {
            "net_id": "network_def",
            "filepath": str(out),
            "ckpt_file": str(tmp_path / "model.pt"),
            "ckpt_path": str(tmp_path / "model.pt"),
            "use_trace": True,
            "input_shape": [1, 6, 32, 32, 32],
        },
        entry="ckpt_export",
        timeout=300,
    )
    exported = torch.jit.load(str(out))
    x = torch.rand(1, 6, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), atol=1e-4, rtol=1e-4)
        assert net(x).abs().max() > 0.01


def test_inference_imports_nothing_of_training():
    """Running inference.json loads no training module (data sampling, checkpoint saving, timers, Ignite
    training glue): a shared inference bundle does not depend on them."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\nfrom monai.bundle import ConfigParser\n"
        f"p = ConfigParser(); p.read_config({str(CONFIGS / 'inference.json')!r}); p['bundle_root'] = '.'\n"
        "p.get_parsed_content('network_def'); p.get_parsed_content('preprocessing')\n"
        "print(sorted(m for m in sys.modules if m.startswith('scripts')))\n"
    )
    root = bundle_dir("registration")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(eval(proc.stdout.strip().splitlines()[-1]))
    assert "scripts.writer" in loaded and "scripts.weights" in loaded
    training = {
        "scripts.training",
        "scripts.training_timer",
        "scripts.checkpoints",
        "scripts.data",
        "scripts.pretrained",
    }
    assert not loaded & training, loaded & training
