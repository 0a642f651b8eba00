"""Partial-label Dice + cross-entropy: each case is scored only on the organs its cohort annotates.

A cohort that annotates only the liver labels every other organ as 0. Scoring those voxels as
background would teach the network that kidneys, spleen, ... are background. Here the classes a
case does not annotate are merged with background before the loss ("marginal" loss, Shi et al.
2021; Fang & Yan 2020): the merged background probability is p(background) + the sum of the
probabilities of the un-annotated organs, so the loss cannot tell background from an
un-annotated organ, while annotated-organ voxels still push every other class down.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PartialLabelDiceCELoss", "merged_log_probs", "annotated_mask"]


def annotated_mask(annotated: torch.Tensor | None, batch: int, num_classes: int, device) -> torch.Tensor:
    """(B, C) bool: background (channel 0) plus the organs each case annotates; all if ``annotated`` is None."""
    if annotated is None:
        return torch.ones(batch, num_classes, dtype=torch.bool, device=device)
    annotated = torch.as_tensor(annotated, device=device).reshape(batch, -1).bool()
    if annotated.shape[1] != num_classes - 1:
        raise ValueError(f"annotated has {annotated.shape[1]} organs, the network {num_classes - 1}")
    return torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), annotated], dim=1)


def merged_log_probs(logits: torch.Tensor, keep: torch.Tensor, mode: str = "marginal") -> torch.Tensor:
    """Log-probabilities with the un-annotated classes folded into channel 0 (their channels become -inf).

    ``mode="marginal"``: softmax over all classes, background channel = log of the summed
    probabilities of background and every un-annotated organ.
    ``mode="exclude"``: softmax over background and the annotated organs only; the un-annotated
    channels get exactly zero gradient (but annotated voxels no longer push them down).
    """
    view = keep.reshape(*keep.shape, *([1] * (logits.ndim - 2)))
    if mode == "exclude":
        return F.log_softmax(logits.masked_fill(~view, float("-inf")), dim=1)
    if mode != "marginal":
        raise ValueError(f"mode must be 'marginal' or 'exclude', got {mode!r}")
    logp = F.log_softmax(logits, dim=1)
    merged = view.clone()
    merged[:, 1:] = ~view[:, 1:]  # background + un-annotated organs
    background = torch.logsumexp(logp.masked_fill(~merged, float("-inf")), dim=1, keepdim=True)
    organs = logp[:, 1:].masked_fill(~view[:, 1:], float("-inf"))
    return torch.cat([background, organs], dim=1)


class PartialLabelDiceCELoss(nn.Module):
    """Dice + cross-entropy on merged classes, with per-case annotated-organ vectors.

    Call as ``loss(logits, label, annotated)`` or ``loss(logits, {"label": ..., "annotated": ...})``
    (the form the trainer's ``prepare_batch`` hands over). ``logits``: (B, C, *spatial);
    ``label``: (B, 1, *spatial) or (B, *spatial) integer map; ``annotated``: (B, C - 1) 0/1,
    None = every organ annotated (plain Dice-CE).
    Dice is averaged over the annotated organs only (``batch=True``: organ-wise sums over the cases
    of the batch that annotate the organ); background joins Dice only if ``dice_background``.
    """

    def __init__(
        self,
        num_classes: int = 14,
        mode: str = "marginal",
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        batch: bool = True,
        dice_background: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.mode = mode
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.batch = batch
        self.dice_background = dice_background
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor | Mapping,
        annotated: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(target, Mapping):
            annotated = target.get("annotated", annotated)
            target = target["label"]
        b, c = input.shape[:2]
        if c != self.num_classes:
            raise ValueError(f"expected {self.num_classes} channels, got {c}")
        keep = annotated_mask(annotated, b, c, input.device)
        label = torch.as_tensor(target, device=input.device).long()
        if label.ndim == input.ndim:
            label = label[:, 0]
        # labels of organs the case does not annotate should not exist; if they do, they are unknown = merged.
        label = label * keep.gather(1, label.reshape(b, -1)).reshape(label.shape)
        logq = merged_log_probs(input.float(), keep, self.mode)

        ce = -logq.gather(1, label[:, None]).mean()

        q = logq.exp()
        onehot = F.one_hot(label, c).movedim(-1, 1).to(q.dtype)
        dims = tuple(range(2, q.ndim))
        inter = (q * onehot).sum(dims)
        denom = q.sum(dims) + onehot.sum(dims)
        weight = keep.to(q.dtype)
        first = 0 if self.dice_background else 1
        inter, denom, weight = inter[:, first:], denom[:, first:], weight[:, first:]
        if self.batch:
            inter, denom = (inter * weight).sum(0), (denom * weight).sum(0)
            weight = (weight.sum(0) > 0).to(q.dtype)
        dice = 1.0 - (2.0 * inter + self.smooth_nr) / (denom + self.smooth_dr)
        dice = (dice * weight).sum() / weight.sum().clamp_min(1.0)
        return self.lambda_dice * dice + self.lambda_ce * ce
