"""The segmentation bundle passes MONAI's own checks with `configs/inference.json` alone and its defaults.

MONAI Label's BundleInferTask, `verify_net_in_out` and `ckpt_export` read that one file with nothing before
it; the shapes they try come from `network_data_format` in metadata.json (MONAI's default `n` = 1), so the
metadata must only allow shapes the default network takes.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.bundle_import import bundle_dir, run_bundle

SEG = bundle_dir("segmentation")


def _default_unet() -> torch.nn.Module:
    """The network `configs/inference.json` defines, with its default hyper-parameters."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(SEG / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def", instantiate=True).eval()


def test_verify_net_in_out_default_network_and_n():
    proc = run_bundle("segmentation", "inference.json", {"net_id": "network_def"}, entry="verify_net_in_out")
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_metadata_shapes_are_what_the_network_takes():
    """Every shape the metadata allows (n = 1, 2, 3) runs through the default network; 16 voxels does not."""
    from monai.bundle.scripts import _get_fake_spatial_shape

    meta = json.loads((SEG / "configs" / "metadata.json").read_text())
    assert "optional_packages_version" not in meta  # deprecated: MONAI maps it to required_packages_version
    image = meta["network_data_format"]["inputs"]["image"]
    net = _default_unet()
    shapes = [_get_fake_spatial_shape(image["spatial_shape"], n=n) for n in (1, 2, 3)]
    assert shapes[0] == (32, 32, 32) and len(set(shapes)) == 3
    with torch.no_grad():
        for shape in shapes[:2]:
            assert net(torch.rand(1, 1, *shape)).shape == (1, 14, *shape)
        with pytest.raises(ValueError, match="spatial element"):
            net(torch.rand(1, 1, 16, 16, 16))  # why 16*n was wrong: instance norm on a 1x1x1 map


def test_ckpt_export_single_config(tmp_path):
    """`ckpt_export` (traced with the metadata's input shape) of a plain state dict reproduces the network."""
    net = _default_unet()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    run_bundle(
        "segmentation",
        "inference.json",
        {"net_id": "network_def", "filepath": str(ts), "ckpt_file": str(ckpt), "use_trace": True},
        entry="ckpt_export",
    )
    exported = torch.jit.load(str(ts), map_location="cpu").eval()
    x = torch.rand(1, 1, 48, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), atol=1e-5, rtol=1e-4)
