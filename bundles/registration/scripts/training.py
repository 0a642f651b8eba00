"""Pieces that plug the registration training into MONAI's Ignite workflows.

``SupervisedTrainer`` is used as is: ``TrainingBatch`` hands the network the concatenated
(moving, fixed) tensor and hands the loss a dict with both images, labels and the organs
annotated in both cases, so ``RegistrationLoss(pred, target)`` has everything it needs. The
validation ``SupervisedEvaluator`` uses ``RegistrationDice``, the Learn2Reg DSC (moving labels
warped by nearest neighbour, organs present in both scans, nanmean per pair, mean over pairs),
computed voxel for voxel as ``scripts.metrics`` (the reported evaluation) computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from scripts.fields import ddf_of
from scripts.losses import one_hot_organs
from scripts.metrics import LABELS

__all__ = [
    "TrainingBatch",
    "RegistrationDice",
    "warp_labels_nearest",
    "pair_dice",
    "LossTermsHandler",
    "ProgressBarHandler",
    "warmup_cosine",
    "WeightAverage",
    "averaged_network",
]


class TrainingBatch:
    """``prepare_batch``: input = moving then fixed channels; target = dict for the loss and the metric.

    With ``pseudo_channels`` > 0 each scan's channels are followed by its predicted labels (``moving_pseudo``,
    ``fixed_pseudo``) one-hot over organs 1..pseudo_channels: the input of a network built with ``pseudo_channels``.
    """

    def __init__(
        self, moving_key: str = "moving", fixed_key: str = "fixed", pseudo_channels: int = 0
    ) -> None:
        self.moving_key, self.fixed_key = moving_key, fixed_key
        self.pseudo_channels = int(pseudo_channels)

    def __call__(self, batch: Mapping, device=None, non_blocking: bool = False, **kwargs):
        def dev(x):
            return torch.as_tensor(x).to(device=device, non_blocking=non_blocking)

        moving, fixed = dev(batch[self.moving_key]).float(), dev(batch[self.fixed_key]).float()
        target: dict[str, Any] = {"moving": moving, "fixed": fixed}
        for k in ("moving_label", "fixed_label"):
            if batch.get(k) is not None:
                target[k] = dev(batch[k])
        if batch.get("moving_annotated") is not None and batch.get("fixed_annotated") is not None:
            target["annotated"] = (
                dev(batch["moving_annotated"]).float() * dev(batch["fixed_annotated"]).float()
            )
        if self.pseudo_channels:
            moving = torch.cat(
                [moving, one_hot_organs(dev(batch["moving_pseudo"]), self.pseudo_channels)], dim=1
            )
            fixed = torch.cat(
                [fixed, one_hot_organs(dev(batch["fixed_pseudo"]), self.pseudo_channels)], dim=1
            )
        return torch.cat([moving, fixed], dim=1), target


def warp_labels_nearest(labels: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) integer labels at ``x + ddf(x)``, exactly as ``scripts.metrics.warp_labels`` (the evaluator's
    warp, scipy on the CPU) but in torch on the training device: validation on a GPU picks ``model.pt`` by the
    reported DSC without moving every field to the CPU.

    The evaluator's ``map_coordinates(order=0)``: coordinates in float64, ties rounded up, 0 where a
    coordinate leaves [0, n - 1] on any axis. MONAI's ``Warp`` (``grid_sample``) rounds ties to even
    and samples up to half a voxel outside the scan, so it scores other voxels at ties and borders.
    """
    spatial = ddf.shape[2:]
    b = ddf.shape[0]
    index = torch.zeros((), dtype=torch.long, device=ddf.device)
    valid = torch.ones((), dtype=torch.bool, device=ddf.device)
    for axis, n in enumerate(spatial):
        shape = [1] * len(spatial)
        shape[axis] = n
        coord = (
            torch.arange(n, dtype=torch.float64, device=ddf.device).view(1, *shape) + ddf[:, axis].double()
        )
        valid = valid & (coord >= 0) & (coord <= n - 1)
        index = index * n + torch.floor(coord + 0.5).clamp(0, n - 1).long()
    src = labels.reshape(b, -1).long()
    warped = torch.gather(src, 1, index.reshape(b, -1)).reshape(b, *spatial)
    return torch.where(valid, warped, torch.zeros_like(warped)).unsqueeze(1)


def pair_dice(
    moving_label: torch.Tensor, fixed_label: torch.Tensor, ddf: torch.Tensor, labels: Sequence[int]
) -> torch.Tensor:
    """(B, len(labels)) Dice of the nearest-neighbour warped moving labels; NaN where absent in either scan."""
    warped = warp_labels_nearest(moving_label.round().long(), ddf.float())
    fixed_label, moving_label = fixed_label.long(), moving_label.long()
    out = torch.full((ddf.shape[0], len(labels)), float("nan"), device=ddf.device)
    for b in range(ddf.shape[0]):
        for j, lab in enumerate(labels):
            f, m = fixed_label[b] == lab, moving_label[b] == lab
            if f.any() and m.any():
                w = warped[b] == lab
                inter = (w & f).sum().float()
                out[b, j] = 2.0 * inter / (w.sum() + f.sum()).float()
    return out


class RegistrationDice(Metric):
    """Mean over pairs of the per-pair nanmean organ Dice (Learn2Reg DSC); DDP-safe (summed over ranks)."""

    required_output_keys = ("pred", "label")  # the evaluator's output dict; label = TrainingBatch target

    def __init__(
        self,
        labels: Sequence[int] = LABELS,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        self.labels = list(labels)
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._num = torch.tensor(0.0, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        pred, target = output
        dsc = pair_dice(target["moving_label"], target["fixed_label"], ddf_of(pred), self.labels)
        for row in dsc:
            if torch.isfinite(row).any():
                self._sum += row.nanmean().double().to(self._device)
                self._num += 1

    @sync_all_reduce("_sum", "_num")
    def compute(self) -> float:
        return float(self._sum / self._num) if self._num > 0 else math.nan


class LossTermsHandler:
    """Epoch means of the loss terms (``loss.last``) into ``engine.state.metrics`` for the loggers."""

    def __init__(self, loss: Any, prefix: str = "train_") -> None:
        self.loss, self.prefix = loss, prefix
        self._sums: dict[str, float] = {}
        self._n = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._n = {}, 0

    def _accumulate(self, engine: Engine) -> None:
        for k, v in getattr(self.loss, "last", {}).items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._sums["loss"] = self._sums.get("loss", 0.0) + float(engine.state.output["loss"].detach())
        self._n += 1

    def _publish(self, engine: Engine) -> None:
        for k, v in self._sums.items():
            engine.state.metrics[self.prefix + k] = v / max(self._n, 1)


class ProgressBarHandler:
    """Ignite's tqdm ``ProgressBar`` showing the loss, attachable from a MONAI handler list."""

    def __init__(self, enabled: bool = True, persist: bool = False) -> None:
        self.enabled, self.persist = enabled, persist

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar

        ProgressBar(persist=self.persist).attach(
            engine, output_transform=lambda out: {"loss": float(out["loss"].detach())}
        )


def warmup_cosine(
    total_iters: int, warmup_iters: int = 0, final_fraction: float = 1.0
) -> Callable[[int], float]:
    """Learning-rate factor per iteration for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up over
    ``warmup_iters``, then a cosine decay to ``final_fraction`` at ``total_iters`` (and constant after).

    ``final_fraction`` 1 keeps the rate constant after the warm-up (the paper: constant, no warm-up).
    """
    total, warm = max(int(total_iters), 1), max(int(warmup_iters), 0)

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        t = min((it - warm) / max(total - warm, 1), 1.0)
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


class WeightAverage(EMAHandler):
    """Ignite's exponential moving average of the weights, attachable from a MONAI handler list.

    With batch 1 and a high learning rate the weights follow the last few pairs; validating (and
    saving ``model.pt``) with their running average removes that noise at the cost of one in-place
    update per step. A fresh run (iteration 0) starts the average from the network's weights as they
    are when training starts, so fine-tuning averages from the pretrained weights; a resumed run
    gets the average back from its checkpoint.
    """

    def __init__(self, model: torch.nn.Module, momentum: float) -> None:
        super().__init__(model, momentum=float(momentum))

    def attach(self, engine: Engine, name: str = "ema_momentum", **kwargs) -> None:  # type: ignore[override]
        super().attach(engine, name=name, warn_if_exists=False, **kwargs)
        engine.add_event_handler(Events.STARTED, self._start_from_model)

    def _start_from_model(self, engine: Engine) -> None:
        if engine.state.iteration == 0:
            self.ema_model.load_state_dict(self.model.state_dict())


def averaged_network(network: torch.nn.Module, average: WeightAverage | None = None) -> torch.nn.Module:
    """The network that validation scores and ``model.pt`` holds: the running average of the weights where
    training keeps one (``ema_momentum``), else the trained network itself."""
    return network if average is None else average.ema_model
