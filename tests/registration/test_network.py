"""GradientRegNet: identity at start, cumulative-sum integration, monotonicity, shapes, bundle checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

from tests.bundle_import import import_bundle_module, metadata_schema, run_bundle

networks = import_bundle_module("registration", "scripts.networks")


def _net(**kw) -> torch.nn.Module:
    """A narrow network with the field at full resolution (the paper's grid) unless ``kw`` say otherwise."""
    torch.manual_seed(0)
    return networks.GradientRegNet(**{"in_channels": 1, "channel_multiplier": 1, "downsample": 1, **kw})


def _randomise_heads(net: torch.nn.Module, std: float) -> None:
    for head in net.heads:
        torch.nn.init.normal_(head.conv.weight, std=std)
        torch.nn.init.normal_(head.conv.bias, std=std)


def _jacobian_det(ddf: np.ndarray) -> np.ndarray:
    """det of d(x + u)/dx by central differences, (3, D, H, W) -> (D, H, W)."""
    jac = (
        np.stack([np.stack(np.gradient(ddf[i]), 0) for i in range(3)], 0) + np.eye(3)[:, :, None, None, None]
    )
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def test_identity_gradient_gives_zero_field():
    g = torch.full((2, 3, 7, 5, 9), 0.5)
    assert torch.allclose(networks.gradient_to_ddf(g), torch.zeros_like(g), atol=1e-5)
    big = torch.full((1, 3, 192, 160, 256), 0.5)  # full Learn2Reg size: no drift from summing
    assert networks.gradient_to_ddf(big).abs().max() < 1e-5


def test_known_cumsum_to_ddf():
    # axis 0: first step 0.75 (1.5 voxels from -1 -> 0.5), then 0.5 (one voxel): a uniform shift of +0.5
    g = torch.full((1, 3, 6, 4, 5), 0.5)
    g[:, 0, 0] = 0.75
    ddf = networks.gradient_to_ddf(g)
    assert torch.allclose(ddf[:, 0], torch.full_like(ddf[:, 0], 0.5), atol=1e-6)
    assert torch.allclose(ddf[:, 1:], torch.zeros_like(ddf[:, 1:]), atol=1e-6)
    # axis 2: constant 0.75 -> steps of 1.5 voxels: p(k) = 1.5 (k + 1) - 1, u(k) = 0.5 k + 0.5
    g = torch.full((1, 3, 3, 3, 5), 0.5)
    g[:, 2] = 0.75
    ddf = networks.gradient_to_ddf(g)
    expected = 0.5 * torch.arange(5.0) + 0.5
    assert torch.allclose(ddf[0, 2, 1, 1], expected, atol=1e-6)
    # the field means warped(x) = moving(x + u(x)) with MONAI's Warp: a ramp moving(x) = x0 becomes x0 + 0.5
    g = torch.full((1, 3, 6, 4, 5), 0.5)
    g[:, 0, 0] = 0.75
    ramp = torch.arange(6.0).view(1, 1, 6, 1, 1).expand(1, 1, 6, 4, 5).contiguous()
    warped = Warp(mode="bilinear", padding_mode="border")(ramp, networks.gradient_to_ddf(g))
    assert torch.allclose(warped[0, 0, :-1], ramp[0, 0, :-1] + 0.5, atol=1e-5)


def test_zero_init_is_identity():
    net = _net(deep_supervision=True, symmetric=True)
    x = torch.rand(2, 2, 32, 32, 48)
    out = net(x)  # training mode: every level and both directions start at the identity
    for key in ("ddfs", "ddfs_sym"):
        for u in out[key]:
            assert u.abs().max() < 1e-5
    for g in out["gradients"]:
        assert torch.allclose(g, torch.full_like(g, 0.5))
    net.eval()
    with torch.no_grad():
        ddf = net(x)
        warped = Warp(mode="bilinear", padding_mode="border")(x[:, :1], ddf)
    assert ddf.shape == (2, 3, 32, 32, 48)
    assert ddf.abs().max() < 1e-5
    assert torch.allclose(warped, x[:, :1], atol=1e-5)


def test_shapes_any_size_and_outputs():
    net = _net(in_channels=3, deep_supervision=True, symmetric=True)
    x = torch.rand(1, 6, 48, 40, 36)  # 40 and 36 are not multiples of 16: padded inside, fields cropped back
    out = net(x)
    assert set(out) == {"ddf", "ddfs", "gradients", "ddf_sym", "ddfs_sym", "gradients_sym"}
    assert len(out["ddfs"]) == 4 and len(out["gradients"]) == 4
    assert all(u.shape == (1, 3, 48, 40, 36) for u in out["ddfs"] + out["gradients"])
    net = _net(deep_supervision=False)
    out = net(torch.rand(1, 2, 32, 32, 32))
    assert len(out["ddfs"]) == 1 and "ddf_sym" not in out
    with pytest.raises(ValueError, match="channels"):
        net(torch.rand(1, 3, 32, 32, 32))


def test_positive_gradients_monotone_and_no_folding():
    x = torch.rand(2, 2, 32, 32, 32)
    net = _net(deep_supervision=False)
    # any weights: every axis mapping x_i -> x_i + u_i is increasing (sigmoid > 0, cumulative sum);
    # with huge weights float32 sigmoid saturates to exactly 0, so test non-decreasing there
    _randomise_heads(net, std=1.0)
    net.eval()
    with torch.no_grad():
        u = net(x).numpy()
    assert u.std() > 1.0  # a large random deformation
    for i in range(3):
        assert (np.diff(u[:, i], axis=i + 1) + 1.0).min() > -1e-5  # float32 rounding of the sums
    _randomise_heads(net, std=0.1)
    with torch.no_grad():
        u = net(x).numpy()
    for i in range(3):
        assert (np.diff(u[:, i], axis=i + 1) + 1.0).min() > 0


def test_smooth_positive_gradients_do_not_fold_but_shear_can():
    """Per-axis monotonicity is what the construction guarantees. Smooth gradient fields (what the
    regulariser favours) give det > 0 everywhere even for displacements of several voxels; strong
    cross-axis variation (shear) can still fold, which the evaluation's fold fraction reports."""
    torch.manual_seed(0)
    z = torch.randn(1, 3, 4, 4, 4)
    g = torch.sigmoid(0.4 * torch.nn.functional.interpolate(z, size=(32, 32, 32), mode="trilinear"))
    u = networks.gradient_to_ddf(g)[0].numpy()
    assert np.abs(u).max() > 2.0
    assert _jacobian_det(u).min() > 0
    g = torch.full((1, 3, 32, 32, 32), 0.5)
    wave = torch.sigmoid(2 * torch.sin(torch.arange(32.0) / 3))
    g[0, 0] = wave.view(1, 32, 1)  # the step along axis 0 varies along axis 1, and vice versa
    g[0, 1] = wave.view(32, 1, 1)
    u = networks.gradient_to_ddf(g)[0].numpy()
    for i in range(3):
        assert (np.diff(u[i], axis=i) + 1.0).min() > 0
    assert _jacobian_det(u).min() < 0


def test_paper_width_parameter_count():
    net = networks.GradientRegNet(in_channels=3, channel_multiplier=8)
    n = sum(p.numel() for p in net.parameters())
    assert 29e6 < n < 32e6  # about 30.8 M, as configs/paper_train.json says


def test_verify_metadata():
    proc = run_bundle(
        "registration",
        "metadata.json",
        {"filepath": str(metadata_schema())},
        entry="verify_metadata",
        timeout=120,
    )
    assert "verified with no error" in proc.stdout + proc.stderr


def test_verify_net_in_out():
    proc = run_bundle(
        "registration",
        "inference.json",
        {"net_id": "network_def"},
        entry="verify_net_in_out",
        timeout=120,
    )
    assert "verified with no error" in proc.stdout + proc.stderr


def test_half_resolution_field_geometry():
    """downsample=2: identity at start for any size, and the coarse field is put on the input grid in
    input voxels (x2) with coarse voxel j centred on input voxel 2j + 0.5 (average-pooling centres)."""
    net = _net(downsample=2, deep_supervision=True).eval()
    with torch.no_grad():
        ddf = net(torch.rand(1, 2, 37, 30, 21))  # odd sizes, smaller than 2 * 16 at the coarse grid
    assert ddf.shape == (1, 3, 37, 30, 21) and ddf.abs().max() < 1e-5
    coarse = torch.zeros(1, 3, 16, 16, 16)
    coarse[:, 0] = 0.25 * torch.arange(16.0).view(16, 1, 1)  # a ramp of 0.25 coarse voxels per voxel
    fine = net._to_input_grid(coarse, (32, 32, 32))
    i = torch.arange(2, 30, dtype=torch.float32)
    torch.testing.assert_close(fine[0, 0, 2:30, 5, 5], 0.25 * (i - 0.5))  # 2 * 0.25 * (i - 0.5) / 2
    assert fine[:, 1:].abs().max() == 0


def test_step_range_scales_the_integrated_step_and_keeps_identity():
    """step_range r: a sigmoid change d moves voxel k by r * 2d * (k + 1), and 0.5 stays the identity."""
    g = torch.full((1, 3, 6, 5, 7), 0.5)
    for r in (1.0, 0.25):
        assert networks.gradient_to_ddf(g, r).abs().max() < 1e-6
    g[:, 2] = 0.6  # a uniform expansion along the last axis
    paper, narrow = networks.gradient_to_ddf(g), networks.gradient_to_ddf(g, 0.25)
    k = torch.arange(7, dtype=torch.float32)
    torch.testing.assert_close(paper[0, 2, 0, 0], 0.2 * (k + 1))
    torch.testing.assert_close(narrow[0, 2, 0, 0], 0.05 * (k + 1))
    # the most extreme sigmoid still gives a strictly increasing mapping (no folding along an axis)
    g[:, 2] = 0.0
    pos = networks.gradient_to_ddf(g, 0.25)[0, 2, 0, 0] + k
    assert (pos.diff() > 0.7).all()
    with pytest.raises(ValueError, match="step_range"):
        networks.GradientRegNet(in_channels=1, channel_multiplier=1, step_range=1.5)


def test_supervised_levels_limits_deep_supervision_but_not_the_weights():
    full = networks.GradientRegNet(in_channels=1, channel_multiplier=1).train()
    two = networks.GradientRegNet(in_channels=1, channel_multiplier=1, supervised_levels=2).train()
    assert set(full.state_dict()) == set(two.state_dict())  # checkpoints load either way
    x = torch.rand(1, 2, 32, 32, 32)
    assert len(full(x)["ddfs"]) == 4 and len(two(x)["ddfs"]) == 2
    two.load_state_dict(full.state_dict())
    torch.testing.assert_close(two.eval()(x), full.eval()(x))


def test_displacement_heads_predict_the_shift_itself():
    """head_type "displacement": identity at start, the same weight shapes as "gradient" and recorded settings
    that keep a checkpoint from being read with the other head type, and a constant head output of s
    prediction-grid voxels along axis 0 is a shift of s * downsample input voxels that moves a cube by exactly
    that much."""
    net = _net(head_type="displacement", downsample=2, symmetric=True).train()
    paper = _net(downsample=2, symmetric=True)
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in paper.state_dict().items()
    }
    with pytest.raises(ValueError, match="head_type: 'displacement' in the weights, 'gradient' here"):
        paper.load_state_dict(net.state_dict())
    x = torch.rand(1, 2, 32, 24, 40)
    out = net(x)
    assert "gradients" not in out and "gradients_sym" not in out  # the loss regularises the field itself
    assert all(d.abs().max() < 1e-6 for d in out["ddfs"] + out["ddfs_sym"])
    net.eval()
    with torch.no_grad():
        net.heads[-1].conv.bias.copy_(torch.tensor([1.5, 0.0, 0.0]))
        ddf = net(x)
    torch.testing.assert_close(
        ddf[:, 0], torch.full_like(ddf[:, 0], 3.0)
    )  # 1.5 coarse voxels = 3 input voxels
    assert ddf[:, 1:].abs().max() < 1e-6
    moving = torch.zeros(1, 1, 32, 24, 40)
    moving[..., 13:19, 8:14, 10:20] = 1.0
    warped = Warp(mode="nearest", padding_mode="zeros")(moving, ddf)
    torch.testing.assert_close(warped, torch.roll(moving, -3, dims=2))  # warped(x) = moving(x + 3)
    with pytest.raises(ValueError, match="head_type"):
        _net(head_type="velocity")


def test_pseudo_channels_are_read_recorded_and_rebuilt(tmp_path):
    """A network reading predicted labels takes each scan's organ channels after its windows, records how many,
    and inference rebuilds it from the checkpoint alone; the labels change its field."""
    weights = import_bundle_module("registration", "scripts.weights")
    net = _net(pseudo_channels=13, downsample=2, head_type="displacement").eval()
    _randomise_heads(net, 0.1)
    image = torch.rand(1, 1, 16, 16, 16)
    seg = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    seg[..., 4:10, 4:10, 4:10] = 6
    losses = import_bundle_module("registration", "scripts.losses")
    moving = torch.cat([image, losses.one_hot_organs(seg, 13)], 1)
    fixed = torch.cat([image, losses.one_hot_organs(torch.roll(seg, 3, 2), 13)], 1)
    assert moving.shape[1] == 14 and moving[0, 6, 5, 5, 5] == 1 and moving[0, 1:, 0, 0, 0].sum() == 0
    with torch.no_grad():
        with_labels = net(torch.cat([moving, fixed], 1))
        same_labels = net(torch.cat([moving, moving], 1))
    assert with_labels.shape == (1, 3, 16, 16, 16)
    assert not torch.allclose(with_labels, same_labels)  # the organ channels feed the field
    with pytest.raises(ValueError, match="1 windows \\+ 13 organs each"):
        net(torch.cat([image, image], 1))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    rebuilt = weights.network_from_checkpoint(str(tmp_path / "model.pt")).eval()
    assert rebuilt.pseudo_channels == 13
    rebuilt.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(torch.cat([moving, fixed], 1)), with_labels)
