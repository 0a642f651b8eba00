"""Test-time instance optimisation: refine each pair's displacement field with Adam (ConvexAdam's recipe).

Why: a network trained within a small budget gives a coarse field, and a classical method is slow. A few
dozen Adam steps on a coarse displacement grid (ConvexAdam, Siebert et al. 2021: half resolution, lr 1,
~80 iterations, three 3x3x3 average-pool smoothings, squared finite differences as regulariser, trilinear
upsampling) close most of the gap per pair in well under a second at the demo grid. The image term uses the
network's own input channels (the CT windows); an optional Dice term uses the segmentation bundle's
*predicted* organ labels of both scans (its pseudo labels, at test time), never the true labels of the
pairs being evaluated, which only the metrics read.

The refinement is a residual on top of the starting field (the network's, or the identity), so zero
iterations give exactly the starting field.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.losses import DiceLoss
from monai.networks.utils import eval_mode
from torch import nn

from scripts.errors import InputError, as_flag
from scripts.fields import ddf_of
from scripts.losses import masked_dice_loss, one_hot_organs, organ_mask
from scripts.transforms import PSEUDO, PSEUDO_HINT

__all__ = [
    "InstanceOptimiser",
    "InstanceOptIteration",
    "MINDFeatures",
    "diffusion",
    "GridWarp",
]

STARTS = ("network", "identity")


def smoothing_matrix(n: int, passes: int = 3, device=None) -> torch.Tensor:
    """(n, n) matrix of ``passes`` length-3 box filters along one axis, edges replicated.

    ConvexAdam pads with zeros; on the coarse grids of small volumes (20-30 voxels a side) that drags
    the outer third of the field towards zero, so a plain translation could not be represented.
    Replicating the edge keeps every row summing to one (constants pass unchanged).
    """
    box = torch.eye(n, device=device) + torch.diag(torch.ones(n - 1, device=device), 1)
    box = box + torch.diag(torch.ones(n - 1, device=device), -1)
    box[0, 0] += 1.0
    box[-1, -1] += 1.0
    return torch.linalg.matrix_power(box / 3.0, passes)


def apply_smoothing(ddf: torch.Tensor, mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Repeated 3x3x3 box filters (stride 1, edges replicated), as ConvexAdam smooths its grid: the per-axis
    matrices of ``smoothing_matrix`` applied to a (B, C, D, H, W) ddf.

    The filter is separable and linear, so it is applied as one small matrix per axis: an order of
    magnitude faster (forward + backward) on a CPU than repeated ``avg_pool3d``, whose backward dominated
    an iteration.
    """
    ddf = torch.einsum("id,bcdhw->bcihw", mats[0], ddf)
    ddf = torch.einsum("jh,bcdhw->bcdjw", mats[1], ddf)
    return torch.einsum("kw,bcdhw->bcdhk", mats[2], ddf)


def diffusion(ddf: torch.Tensor) -> torch.Tensor:
    """Sum over axes of the mean squared forward difference of a (B, 3, D, H, W) ddf (ConvexAdam's
    regulariser). Not MONAI's ``DiffusionLoss``: its central differences index with lists, whose backward
    cost more than the rest of an iteration on a CPU."""
    return sum(ddf.diff(dim=d).pow(2).mean() for d in range(2, ddf.ndim))


class GridWarp:
    """``warped(x) = image(x + ddf(x))`` on one fixed grid (voxel units), MONAI ``Warp``'s convention.

    The identity grid and the voxel-to-normalised scaling are computed once, so an iteration costs one
    ``grid_sample``; MONAI's ``Warp`` rebuilds and rescales the grid in several small ops per call.
    """

    def __init__(self, spatial: Sequence[int], device=None) -> None:
        sizes = torch.tensor([max(int(s) - 1, 1) for s in spatial], dtype=torch.float32, device=device)
        axes = [torch.arange(int(s), dtype=torch.float32, device=device) for s in spatial]
        ref = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3), ij order
        self.scale = (2.0 / sizes).flip(-1)  # grid_sample wants (x, y, z) = (W, H, D) order
        self.ref = (ref * (2.0 / sizes) - 1.0).flip(-1).unsqueeze(0)

    def __call__(self, image: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
        grid = self.ref + ddf.permute(0, 2, 3, 4, 1).flip(-1) * self.scale
        return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


class MINDFeatures(nn.Module):
    """ConvexAdam's image features for the similarity term: the MIND-SSC descriptor (12 channels, the
    ``convexadam`` package's ``MINDSSC``) of the mean of a scan's windowed channels, on a grid ``spacing``
    times coarser than the scan (average-pooled first).

    Why: MIND compares each voxel's neighbourhood with itself, so it is insensitive to the contrast and
    intensity offsets between two patients' scans, which an intensity MSE fits as deformation. On the pooled
    grid it costs ``1 / spacing**3`` of the full-resolution descriptor, and the optimiser's levels are no finer.
    """

    def __init__(self, radius: int = 1, dilation: int = 2, spacing: int = 1) -> None:
        super().__init__()
        self.radius, self.dilation, self.spacing = int(radius), int(dilation), int(spacing)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from convexAdam.convex_adam_utils import MINDSSC  # imported only where MIND is used

        image = torch.as_tensor(image).float().mean(1, keepdim=True)
        if self.spacing > 1:
            image = F.adaptive_avg_pool3d(image, [math.ceil(s / self.spacing) for s in image.shape[2:]])
        return MINDSSC(image, self.radius, self.dilation, device=image.device)


class InstanceOptimiser:
    """Adam on a residual displacement grid at ``1 / grid_spacing`` resolution for one pair.

    Loss = ``sim_weight`` x ``similarity``(warped moving, fixed) + ``reg_weight`` x ``diffusion`` (squared
    forward differences, in coarse voxels) of the coarse field + ``dice_weight`` x soft Dice (MONAI ``DiceLoss``) of the
    warped one-hot predicted labels, over the organs present in both label maps. Images and labels are
    average-pooled onto the coarse grid once; every iteration works there (as ConvexAdam), and the result is
    upsampled trilinearly and added to the starting field.

    Coarse to fine: with lists, ``grid_spacing`` ``[4, 2]`` and ``iterations`` ``[40, 20]`` run 40 steps on a
    quarter-resolution grid, then 20 on a half-resolution grid started from the result (a level costs about
    ``1 / grid_spacing**3`` of the full-resolution grid per step, so most steps belong on the coarse level).

    Args:
        iterations: Adam steps per pair (one per level with a list of ``grid_spacing``).
        lr: Adam learning rate, in coarse voxels (ConvexAdam: 1).
        grid_spacing: full-resolution voxels per coarse voxel (ConvexAdam: 2); a list gives the levels, coarse first.
        reg_weight: weight of the diffusion regulariser (ConvexAdam: 1.25, on coarse-voxel displacements).
        smooth_passes: 3x3x3 average pools applied to the grid at every step (ConvexAdam: 3).
        similarity: image loss ``loss(warped, fixed)`` on the coarse images (default MSE).
        sim_weight: weight of the image term.
        features: applied once to both scans before the levels (``MINDFeatures``: ConvexAdam's MIND-SSC);
            None compares the windowed channels themselves.
        dice_weight: weight of the Dice term; > 0 needs predicted labels of both scans.
        num_organs: organs 1..num_organs of the label maps.
    """

    def __init__(
        self,
        iterations: int | Sequence[int] = 80,
        lr: float = 1.0,
        grid_spacing: int | Sequence[int] = 2,
        reg_weight: float = 1.25,
        smooth_passes: int = 3,
        similarity: nn.Module | None = None,
        sim_weight: float = 1.0,
        dice_weight: float = 0.0,
        num_organs: int = 13,
        features: nn.Module | None = None,
    ) -> None:
        spacings = (
            [int(grid_spacing)] if isinstance(grid_spacing, (int, float)) else [int(g) for g in grid_spacing]
        )
        steps = [int(iterations)] if isinstance(iterations, (int, float)) else [int(i) for i in iterations]
        if len(steps) != len(spacings) or not spacings or min(spacings) < 1 or min(steps) < 0:
            raise ValueError(
                f"instance optimisation: grid_spacing {grid_spacing!r} and iterations {iterations!r} need one "
                "whole number of iterations (>= 0) per grid spacing (>= 1)"
            )
        self.levels = list(zip(spacings, steps, strict=True))
        self.lr = float(lr)
        self.smooth_passes = int(smooth_passes)
        self.reg_weight, self.sim_weight, self.dice_weight = (
            float(reg_weight),
            float(sim_weight),
            float(dice_weight),
        )
        self.num_organs = int(num_organs)
        self.similarity = similarity if similarity is not None else nn.MSELoss()
        self.features = features
        self.dice = DiceLoss(include_background=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)

    @property
    def uses_labels(self) -> bool:
        return self.dice_weight > 0

    def __call__(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        init: torch.Tensor | None = None,
        moving_pseudo: torch.Tensor | None = None,
        fixed_pseudo: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The refined ddf (1, 3, *spatial) in voxels, ``warped(x) = moving(x + ddf(x))``.

        ``moving``/``fixed``: (1, C, *spatial) images (the network's windowed channels); ``init``: the
        starting ddf (1, 3, *spatial) or None for the identity; ``moving_pseudo``/``fixed_pseudo``: (1, 1, *spatial)
        predicted label maps, needed when ``dice_weight`` > 0.
        """
        moving, fixed = torch.as_tensor(moving).float(), torch.as_tensor(fixed).float()
        spatial = tuple(fixed.shape[2:])
        base = torch.zeros(1, 3, *spatial, device=fixed.device) if init is None else torch.as_tensor(init)
        base = (
            base.detach().float().clone()
        )  # a plain tensor: the network's output may be an inference tensor
        if self.features is not None and any(iterations > 0 for _, iterations in self.levels):
            moving, fixed = self.features(moving), self.features(fixed)  # possibly on a coarser grid
        for spacing, iterations in self.levels:
            if iterations > 0:
                base = self._refine(moving, fixed, base, spacing, iterations, moving_pseudo, fixed_pseudo)
        return base

    def _refine(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        base: torch.Tensor,
        grid_spacing: int,
        iterations: int,
        moving_pseudo: torch.Tensor | None,
        fixed_pseudo: torch.Tensor | None,
    ) -> torch.Tensor:
        """One level: ``iterations`` Adam steps on a grid ``grid_spacing`` times coarser, added to ``base``."""
        spatial = tuple(base.shape[2:])  # the field's grid (the images may be pooled features)
        coarse = tuple(max(3, math.ceil(s / grid_spacing)) for s in spatial)
        scale = torch.tensor([s / c for s, c in zip(spatial, coarse, strict=True)], device=fixed.device)
        scale = scale.view(1, 3, 1, 1, 1)

        def pool(x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_avg_pool3d(x, coarse)

        with_labels = self.uses_labels
        with torch.no_grad():
            mov_c, fix_c = pool(moving), pool(fixed)
            base_c = pool(base) / scale  # coarse-voxel units
            if with_labels:
                if moving_pseudo is None or fixed_pseudo is None:
                    raise ValueError("dice_weight > 0 needs the predicted labels of both scans")
                oh_mov = pool(
                    one_hot_organs(torch.as_tensor(moving_pseudo).to(fixed.device), self.num_organs)
                )
                oh_fix = pool(one_hot_organs(torch.as_tensor(fixed_pseudo).to(fixed.device), self.num_organs))
                # only organs present in both label maps count (as the Learn2Reg DSC): warp just those,
                # as each warped channel costs as much as the whole image term
                keep = organ_mask(oh_mov, oh_fix, torch.ones(1, self.num_organs, device=fixed.device))[0] > 0
                oh_mov, oh_fix = oh_mov[:, keep], oh_fix[:, keep]
                mask = torch.ones(1, oh_fix.shape[1], device=fixed.device)
                with_labels = bool(keep.any())
        mats = [smoothing_matrix(n, self.smooth_passes, fixed.device) for n in coarse]
        warp = GridWarp(coarse, fixed.device)
        residual = torch.zeros(1, 3, *coarse, device=fixed.device, requires_grad=True)
        optimiser = torch.optim.Adam([residual], lr=self.lr)
        with torch.enable_grad():
            for _ in range(iterations):
                optimiser.zero_grad(set_to_none=True)
                ddf = base_c + apply_smoothing(residual, mats)
                loss = self.sim_weight * self.similarity(warp(mov_c, ddf), fix_c)
                loss = loss + self.reg_weight * diffusion(ddf)
                if with_labels:
                    warped = warp(oh_mov, ddf, padding_mode="zeros")
                    loss = loss + self.dice_weight * masked_dice_loss(warped, oh_fix, mask, self.dice)
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            refined = apply_smoothing(residual, mats) * scale
            refined = F.interpolate(refined, size=spatial, mode="trilinear", align_corners=False)
        return base + refined


class InstanceOptIteration:
    """``iteration_update`` of the inference evaluator: the starting field, optionally refined per pair.

    ``start="network"`` runs MONAI's own ``SupervisedEvaluator`` iteration (same inferer, eval mode, events),
    so with ``enabled`` false (or no optimiser) the output is exactly the network's; ``"identity"`` starts from a zero field
    and never calls the network. The time per pair (forward + refinement, not loading or writing) goes to
    the metrics as ``runtime_s``, as for the classical baselines.
    """

    def __init__(
        self,
        optimiser: InstanceOptimiser | None = None,
        enabled: bool | str = True,
        start: str = "network",
        image_keys: Sequence[str] = ("input_moving", "input_fixed"),
        label_keys: Sequence[str] = (PSEUDO["moving"], PSEUDO["fixed"]),
    ) -> None:
        if start not in STARTS:
            raise ValueError(f"instance optimisation starts from one of {STARTS}, got {start!r}")
        self.optimiser = optimiser if as_flag(enabled) else None
        self.start = start
        self.image_keys, self.label_keys = tuple(image_keys), tuple(label_keys)

    @property
    def method(self) -> str:
        """What this iteration runs, the label of its outputs: ``network`` or ``identity``, and
        ``<start> + instance_opt`` when it refines (`` (pseudo)``: with the Dice term on predicted labels)."""
        if self.optimiser is None:
            return self.start
        return f"{self.start} + instance_opt" + (" (pseudo)" if self.optimiser.uses_labels else "")

    def __call__(self, engine: Engine, batch: dict) -> dict:
        t0 = time.perf_counter()
        device = engine.state.device
        moving, fixed = (torch.as_tensor(batch[k]) for k in self.image_keys)
        net = getattr(engine.network, "module", engine.network)
        if self.start == "network" and self.optimiser is None and getattr(net, "symmetric", False):
            # a symmetric network also gives the fixed -> moving field: the writer starts the inverse from it
            inputs, _ = engine.prepare_batch(batch, device, engine.non_blocking, **engine.to_kwargs)
            with eval_mode(net):
                forward, inverse = net.forward_and_inverse(inputs)
            output = {"pred": forward, "pred_inverse": inverse}
        elif self.start == "network":
            output = engine._iteration(engine, batch)  # MONAI's forward pass, unchanged
        else:
            output = {"pred": torch.zeros(fixed.shape[0], 3, *fixed.shape[2:], device=device)}
        if self.optimiser is not None:
            ddf = ddf_of(output["pred"])
            if self.optimiser.uses_labels:
                self._check_labels(batch)
            refined = []
            for b in range(fixed.shape[0]):
                pseudo = (
                    [torch.as_tensor(batch[k][b : b + 1]).to(device) for k in self.label_keys]
                    if self.optimiser.uses_labels
                    else [None, None]
                )
                refined.append(
                    self.optimiser(
                        moving[b : b + 1].to(device), fixed[b : b + 1].to(device), ddf[b : b + 1], *pseudo
                    )
                )
            output["pred"] = torch.cat(refined)
        seconds = (time.perf_counter() - t0) / fixed.shape[0]
        output["runtime_s"] = [seconds] * fixed.shape[0]
        return output

    def _check_labels(self, batch: dict) -> None:
        missing = [k for k in self.label_keys if k not in batch]
        if missing:
            names = ", ".join(f"{batch.get('path_' + k, [k])[0]}" for k in ("moving", "fixed"))
            raise InputError(
                f"instance optimisation with a Dice term needs predicted labels of both scans ({names}); "
                f"{PSEUDO_HINT}, or set --instance_opt_dice_weight 0"
            )
