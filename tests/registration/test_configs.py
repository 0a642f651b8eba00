"""The bundle's configs as MONAI's tools and MONAI Label read them: one file each, nothing listed before."""

from __future__ import annotations

import json

import torch
from monai.bundle import ConfigParser

from tests.bundle_import import bundle_dir, import_bundle_module, run_bundle

networks = import_bundle_module("registration", "scripts.networks")
CONFIGS = bundle_dir("registration") / "configs"
# What a model trained with train.json needs to be read by inference.json (and every override of it).
SHARED = [
    "spatial_size", "pixdim", "pad_value", "num_organs", "labels", "ct_windows", "multi_window",
    "input_windows", "in_channels", "channel_multiplier", "downsample", "base_channels", "blocks_per_level",
    "deep_supervision", "step_range", "supervised_levels", "field", "network_def",
]  # fmt: skip


def _raw(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def test_train_and_inference_share_grid_windows_and_network():
    train, infer = _raw("train.json"), _raw("inference.json")
    for key in SHARED:
        assert train[key] == infer[key], f"{key} differs between train.json and inference.json"


def test_overrides_do_not_copy_inference():
    """evaluate and the ANTs baseline are small overrides: they change outputs and the field source only."""
    infer = _raw("inference.json")
    for name in ("evaluate.json", "syn_baseline.json", "convexadam_baseline.json"):
        override = _raw(name)
        assert not set(override) & {*SHARED, "preprocessing", "dataset", "dataloader", "evaluator", "writer"}
        assert len(override) < len(infer) / 2


def test_inference_json_alone_builds_the_network():
    current = import_bundle_module("registration", "scripts.networks")  # what the parser imports now
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["bundle_root"] = str(bundle_dir("registration"))
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, current.GradientRegNet)
    # the lean default (issue #11): width 4, field predicted at half resolution
    assert net.downsample == 2 and 6e6 < sum(p.numel() for p in net.parameters()) < 9e6
    parser["channel_multiplier"], parser["downsample"] = 8, 1  # the paper's network, one override away
    paper = parser.get_parsed_content("network_def", lazy=False)
    assert paper.downsample == 1 and sum(p.numel() for p in paper.parameters()) > 29e6


def test_ckpt_export_single_config(tmp_path):
    """``monai.bundle ckpt_export`` with inference.json alone (traced: TorchScript cannot script the
    cumulative-sum integration's slicing); the exported module gives the eager network's field."""
    torch.manual_seed(0)
    net = networks.GradientRegNet(
        in_channels=3, channel_multiplier=1, downsample=2
    ).eval()  # as inference.json
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
            "channel_multiplier": 1,
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
