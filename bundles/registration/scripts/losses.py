"""Registration training loss: image similarity + Dice on warped labels + regulariser.

One module serves every network of the bundle. With our ``GradientRegNet`` (training mode:
a dict with the fields of every deep-supervision level and their gradient fields) the
regulariser is the L1 distance of the gradient fields to the identity value 0.5 and the image
and Dice terms are averaged over levels; with any network that returns a plain displacement
field (MONAI ``LocalNet``, ...) the regulariser falls back to a loss on the field itself
(``BendingEnergyLoss`` by default). In symmetric mode both directions are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiceLoss
from monai.networks.blocks import Warp
from torch import nn

from scripts.metrics import NUM_ORGANS
from scripts.networks import IDENTITY_GRADIENT

__all__ = ["RegistrationLoss", "masked_dice_loss", "organ_mask", "one_hot_organs", "gradient_regulariser"]


def one_hot_organs(label: torch.Tensor, num_organs: int) -> torch.Tensor:
    """(B, 1, *spatial) integer label map -> (B, num_organs, *spatial) float one-hot of organs 1..num_organs."""
    lab = label.long().squeeze(1).clamp(0, num_organs)
    onehot = F.one_hot(lab, num_organs + 1).movedim(-1, 1).float()
    return onehot[:, 1:]


def masked_dice_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, dice: nn.Module | None = None
) -> torch.Tensor:
    """Mean soft Dice loss over the (case, organ) entries where ``mask`` (B, K) is true.

    The mask must not depend on the prediction: were "present in the warped labels" part of it,
    squashing an organ out of the crop would remove its loss (a shortcut the network finds).
    A batch with no valid entry gives a zero that keeps the graph (so DDP and AMP see a loss).
    """
    dice = dice or DiceLoss(include_background=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
    per = dice(pred, target).reshape(pred.shape[0], pred.shape[1])
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1.0)


def organ_mask(oh_moving: torch.Tensor, oh_fixed: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """(B, K) organs that count: annotated in both cases (a 0 means unknown, not absent) and present
    in both (unwarped) crops, as the Learn2Reg DSC counts organs present in both scans."""
    present = (oh_moving.flatten(2).amax(-1) > 0) & (oh_fixed.flatten(2).amax(-1) > 0)
    return annotated.to(oh_fixed.dtype) * present.to(oh_fixed.dtype)


def gradient_regulariser(gradients: list[torch.Tensor]) -> torch.Tensor:
    """Mean L1 distance of the predicted gradient fields to the identity gradient, averaged over levels."""
    return torch.stack([(g - IDENTITY_GRADIENT).abs().mean() for g in gradients]).mean()


class RegistrationLoss(nn.Module):
    """``loss(pred, target)`` for MONAI's ``SupervisedTrainer``.

    ``target`` is the dict made by ``scripts.training.TrainingBatch``: ``moving``, ``fixed`` (windowed
    images), optionally ``moving_label``, ``fixed_label`` (integer maps) and ``annotated``
    ((B, num_organs), 1 where the organ is annotated in BOTH cases).

    Args:
        similarity: image loss module, ``loss(warped, fixed)`` (MSE by default; LNCC from config).
        sim_weight, dice_weight, reg_weight: term weights (paper: 1, 1, 1e-2).
        use_dice: include the Dice term when labels are in the batch.
        num_organs: organs 1..num_organs of the label maps.
        fallback_regulariser: loss on the displacement field, for networks that give no gradient field.
        dice_levels: the Dice term uses the finest ``dice_levels`` deep-supervision levels only (``None``:
            all, the paper). Warping 13 one-hot channels is the loss's main cost, and the coarse
            fields' Dice mostly repeats the finest one's signal.
        dice_downsample: compute the Dice term on a grid this many times coarser: one-hot labels
            average-pooled (soft organ fractions) and warped with the average-pooled field (1, the paper:
            the input grid). Cheaper by about ``dice_downsample**3``, and a soft boundary a pooled voxel
            wide gives a gradient where the full-resolution labels only touch.
    """

    def __init__(
        self,
        similarity: nn.Module | None = None,
        sim_weight: float = 1.0,
        dice_weight: float = 1.0,
        reg_weight: float = 1e-2,
        use_dice: bool = True,
        num_organs: int = NUM_ORGANS,
        fallback_regulariser: nn.Module | None = None,
        dice_levels: int | None = None,
        dice_downsample: int = 1,
    ) -> None:
        super().__init__()
        self.similarity = similarity if similarity is not None else nn.MSELoss()
        self.sim_weight, self.dice_weight, self.reg_weight = (
            float(sim_weight),
            float(dice_weight),
            float(reg_weight),
        )
        self.use_dice = use_dice
        if dice_levels is not None and int(dice_levels) < 1:
            raise ValueError(f"dice_levels must be at least 1 (or None for all), got {dice_levels}")
        self.dice_levels = None if dice_levels is None else int(dice_levels)
        if int(dice_downsample) < 1:
            raise ValueError(f"dice_downsample must be a positive integer, got {dice_downsample}")
        self.dice_downsample = int(dice_downsample)
        self.num_organs = num_organs
        self.fallback = fallback_regulariser if fallback_regulariser is not None else BendingEnergyLoss()
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="bilinear", padding_mode="zeros")
        self.dice = DiceLoss(include_background=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        self.last: dict[str, torch.Tensor] = {}  # detached terms of the last call, for logging

    @staticmethod
    def _directions(pred: Any) -> list[tuple[list[torch.Tensor], list[torch.Tensor] | None, bool]]:
        """(fields per level, gradient fields per level or None, reversed?) for each direction."""
        if isinstance(pred, Mapping):
            ddfs = pred.get("ddfs", [pred["ddf"]])
            dirs = [(list(ddfs), pred.get("gradients"), False)]
            if "ddf_sym" in pred:
                dirs.append((list(pred.get("ddfs_sym", [pred["ddf_sym"]])), pred.get("gradients_sym"), True))
            return dirs
        if isinstance(pred, (list, tuple)):
            pred = pred[0]
        return [([pred], None, False)]

    def _coarse(self, x: torch.Tensor) -> torch.Tensor:
        """Average-pool a (B, C, *spatial) map by ``dice_downsample`` (partial windows at the far edges)."""
        k = self.dice_downsample
        return x if k == 1 else F.avg_pool3d(x, k, ceil_mode=True)

    def _coarse_field(self, ddf: torch.Tensor) -> torch.Tensor:
        """The field on the ``_coarse`` grid, in that grid's voxels."""
        return ddf if self.dice_downsample == 1 else self._coarse(ddf) / self.dice_downsample

    def forward(self, pred: Any, target: Mapping[str, Any]) -> torch.Tensor:
        moving, fixed = target["moving"], target["fixed"]
        with_dice = (
            self.use_dice
            and self.dice_weight > 0
            and target.get("moving_label") is not None
            and target.get("fixed_label") is not None
        )
        if with_dice:
            oh_moving = one_hot_organs(target["moving_label"], self.num_organs)
            oh_fixed = one_hot_organs(target["fixed_label"], self.num_organs)
            annotated = target.get("annotated")
            if annotated is None:
                annotated = torch.ones(moving.shape[0], self.num_organs, device=moving.device)
            mask = organ_mask(oh_moving, oh_fixed, annotated)
            oh_moving, oh_fixed = self._coarse(oh_moving), self._coarse(oh_fixed)
        totals, sims, dices, regs = [], [], [], []
        for ddfs, grads, reverse in self._directions(pred):
            src, dst = (fixed, moving) if reverse else (moving, fixed)
            sim = torch.stack([self.similarity(self.warp_image(src, u), dst) for u in ddfs]).mean()
            total = self.sim_weight * sim
            if with_dice:
                lsrc, ldst = (oh_fixed, oh_moving) if reverse else (oh_moving, oh_fixed)
                dice = torch.stack(
                    [
                        masked_dice_loss(self.warp_label(lsrc, self._coarse_field(u)), ldst, mask, self.dice)
                        for u in ddfs[: self.dice_levels]
                    ]
                ).mean()
                total = total + self.dice_weight * dice
                dices.append(dice.detach())
            reg = gradient_regulariser(grads) if grads else self.fallback(ddfs[0])
            total = total + self.reg_weight * reg
            sims.append(sim.detach())
            regs.append(reg.detach())
            totals.append(total)
        loss = torch.stack(totals).mean()
        self.last = {"similarity": torch.stack(sims).mean(), "regulariser": torch.stack(regs).mean()}
        if dices:
            self.last["dice_loss"] = torch.stack(dices).mean()
        return loss
