"""RegistrationLoss: organ masking, regulariser, symmetric/deep-supervision averaging, MONAI-network fallback."""

from __future__ import annotations

import torch

from tests.bundle_import import import_bundle_module

losses = import_bundle_module("registration", "scripts.losses")
networks = import_bundle_module("registration", "scripts.networks")


def _cube(shape, lo, hi, value: int) -> torch.Tensor:
    lab = torch.zeros(1, 1, *shape, dtype=torch.long)
    lab[..., lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return lab


def _target(moving_label, fixed_label, annotated) -> dict:
    img = torch.rand(1, 1, *moving_label.shape[2:])
    return {
        "moving": img,
        "fixed": img.clone(),
        "moving_label": moving_label,
        "fixed_label": fixed_label,
        "annotated": torch.as_tensor(annotated, dtype=torch.float32).view(1, -1),
    }


def test_dice_counts_only_organs_annotated_in_both():
    shape = (16, 16, 16)
    # organ 1 aligned; organ 2 completely misaligned
    mov = _cube(shape, (2, 2, 2), (6, 6, 6), 1) + _cube(shape, (10, 10, 10), (14, 14, 14), 2)
    fix = _cube(shape, (2, 2, 2), (6, 6, 6), 1) + _cube(shape, (2, 10, 2), (6, 14, 6), 2)
    loss = losses.RegistrationLoss(sim_weight=0.0, reg_weight=0.0, num_organs=3)
    zero = torch.zeros(1, 3, *shape)
    both = loss(zero, _target(mov, fix, [1, 1, 0]))
    only_moving = [1, 0, 0]  # organ 2 unknown in the fixed case: it must not count
    masked = loss(zero, _target(mov, fix, only_moving))
    assert both > 0.4  # mean of 0 (organ 1) and 1 (organ 2)
    assert masked < 1e-4
    # an organ annotated in both but absent from both crops does not dilute the mean
    assert torch.isclose(loss(zero, _target(mov, fix, [1, 1, 1])), both)
    # present in the moving crop only: not counted, whatever the field does with it (squashing it
    # out of the crop must not be a way to lower the loss)
    fix_no2 = _cube(shape, (2, 2, 2), (6, 6, 6), 1)
    assert loss(zero, _target(mov, fix_no2, [1, 1, 0])) < 1e-4
    squash = torch.zeros(1, 3, *shape)
    squash[:, 0, 8:] = 8.0  # samples the moving image outside organ 2
    assert loss(squash, _target(mov, fix_no2, [1, 1, 0])) < 1e-4
    # nothing annotated in both: zero loss that still backpropagates
    u = torch.zeros(1, 3, *shape, requires_grad=True)
    none = loss(u, _target(mov, fix, [0, 0, 0]))
    none.backward()
    assert none == 0 and u.grad is not None


def test_dice_gradient_flows_through_warped_labels():
    shape = (16, 16, 16)
    mov = _cube(shape, (4, 4, 4), (10, 10, 10), 1)
    fix = _cube(shape, (5, 4, 4), (11, 10, 10), 1)
    loss = losses.RegistrationLoss(sim_weight=0.0, reg_weight=0.0, num_organs=1)
    u = torch.zeros(1, 3, *shape, requires_grad=True)
    loss(u, _target(mov, fix, [1])).backward()
    # warped(x) = moving(x + u): the fixed cube is one voxel further along axis 0, so u_0 should go negative
    assert u.grad[0, 0].sum() > 0


def test_regulariser_and_deep_supervision_and_symmetric_average():
    shape = (8, 8, 8)
    g_id = torch.full((1, 3, *shape), 0.5)
    assert losses.gradient_regulariser([g_id]) == 0
    g = g_id + 0.1
    assert torch.isclose(losses.gradient_regulariser([g_id, g]), torch.tensor(0.05))
    img_m, img_f = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    target = {"moving": img_m, "fixed": img_f}
    loss = losses.RegistrationLoss(reg_weight=1.0)
    u = networks.gradient_to_ddf(g)
    one = loss({"ddf": u, "ddfs": [u], "gradients": [g]}, target)
    ident = loss({"ddf": 0 * u, "ddfs": [0 * u], "gradients": [g_id]}, target)
    two_levels = loss({"ddf": u, "ddfs": [u, 0 * u], "gradients": [g, g_id]}, target)
    assert torch.isclose(two_levels, (one + ident) / 2, atol=1e-6)
    # symmetric: mean of both directions; the reverse direction swaps the images
    sym = loss(
        {
            "ddf": u,
            "ddfs": [u],
            "gradients": [g],
            "ddf_sym": 0 * u,
            "ddfs_sym": [0 * u],
            "gradients_sym": [g_id],
        },
        target,
    )
    reverse_identity = torch.nn.functional.mse_loss(img_f, img_m)
    assert torch.isclose(sym, (one + reverse_identity) / 2, atol=1e-6)
    assert set(loss.last) == {"similarity", "regulariser"}


def test_plain_ddf_network_uses_fallback_regulariser():
    shape = (16, 16, 16)
    target = {"moving": torch.rand(1, 1, *shape), "fixed": torch.rand(1, 1, *shape)}
    loss = losses.RegistrationLoss(reg_weight=1.0)
    smooth = torch.zeros(1, 3, *shape)
    bumpy = torch.randn(1, 3, *shape)
    assert loss(smooth, target) < loss(bumpy, target)
    assert loss.last["regulariser"] > 0  # bending energy of the bumpy field


def test_lncc_similarity_from_monai():
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    shape = (16, 16, 16)
    img = torch.rand(1, 1, *shape)
    loss = losses.RegistrationLoss(
        similarity=LocalNormalizedCrossCorrelationLoss(kernel_size=5), reg_weight=0.0
    )
    assert loss(torch.zeros(1, 3, *shape), {"moving": img, "fixed": img}) < -0.99


def test_dice_levels_warps_labels_at_the_finest_levels_only():
    """dice_levels 1: a coarse level's field changes the image term but not the Dice term."""
    mov, fix = (
        _cube((16, 16, 16), (4, 4, 4), (10, 10, 10), 1),
        _cube((16, 16, 16), (6, 4, 4), (12, 10, 10), 1),
    )
    target = _target(mov, fix, [1])
    fine, coarse = torch.zeros(1, 3, 16, 16, 16), torch.zeros(1, 3, 16, 16, 16)
    coarse[:, 0] = -2.0  # the coarse level aligns the cube; the finest stays at the identity
    pred = {"ddfs": [fine, coarse], "ddf": fine}
    all_levels = losses.RegistrationLoss(num_organs=1, reg_weight=0.0)
    finest = losses.RegistrationLoss(num_organs=1, reg_weight=0.0, dice_levels=1)
    all_levels(pred, target), finest(pred, target)
    identity = losses.RegistrationLoss(num_organs=1, reg_weight=0.0)
    identity({"ddfs": [fine], "ddf": fine}, target)
    assert all_levels.last["dice_loss"] < finest.last["dice_loss"] - 0.1
    torch.testing.assert_close(finest.last["dice_loss"], identity.last["dice_loss"])


def test_dice_downsample_scores_the_shift_on_the_coarse_grid():
    """dice_downsample 2: the true 2-voxel shift (in input voxels) aligns the pooled labels, and a field
    one voxel short gets a gradient towards it."""
    mov, fix = (
        _cube((16, 16, 16), (4, 4, 4), (10, 10, 10), 1),
        _cube((16, 16, 16), (6, 4, 4), (12, 10, 10), 1),
    )
    target = _target(mov, fix, [1])
    coarse = losses.RegistrationLoss(num_organs=1, reg_weight=0.0, sim_weight=0.0, dice_downsample=2)
    shift = torch.zeros(1, 3, 16, 16, 16)
    shift[:, 0] = -2.0  # warped(x) = moving(x - 2): the cube moves 2 voxels up axis 0, onto the fixed one
    assert coarse(shift, target) < 1e-3 < coarse(torch.zeros_like(shift), target)
    short = torch.full((1, 3, 16, 16, 16), 0.0)
    short[:, 0] = -1.0
    short.requires_grad_(True)
    coarse(short, target).backward()
    assert short.grad[:, 0].sum() > 0  # descending moves axis 0 further negative, towards -2
