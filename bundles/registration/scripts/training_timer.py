"""Where training time goes, and the validation curve against wall time: the training benchmark's probe.

Switched on by ``train.json``'s ``timing_file``; ``tools/abdoreg/bench_train.py`` reads the JSON it writes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from scripts.atomic import atomic_write_text

__all__ = ["TrainingTimer"]

logger = logging.getLogger("registration.training")


class TrainingTimer:
    """Where training time goes, and the validation curve against wall time, written to a JSON file.

    Per training iteration (Ignite and MONAI ``IterationEvents``): ``data`` (waiting for the batch),
    ``forward`` (batch to device + network), ``loss``, ``backward_optimizer`` (backward + optimiser
    step) and ``other`` (per-iteration handlers: logging, progress bar); per epoch end: ``validation``
    (the validator's run, best-model save included) and ``checkpoint`` (every other epoch-end handler:
    the resume checkpoint, epoch logs). Each validation appends ``{iteration, wall_s, metric, val_s}``
    to ``curve`` (the trainer's iteration, so a resumed run continues the count), ``wall_s`` counted from the trainer's start (the validation at start, the
    identity's Dice, included). ``max_wall_s`` stops training after that much wall time (at the end of
    an iteration), which is how a benchmark or a sweep gives every recipe the same budget. On CUDA each
    mark synchronises the device, so the split is real (and slightly slower than an unobserved run).
    """

    PARTS = ("data", "forward", "loss", "backward_optimizer", "other", "validation", "checkpoint")

    def __init__(
        self,
        path: str | os.PathLike,
        validator: Engine | None = None,
        key_metric: str = "val_mean_dice",
        max_wall_s: float | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.path, self.validator, self.key_metric = Path(path), validator, key_metric
        self.max_wall_s = float(max_wall_s) if max_wall_s else None
        self.info = dict(info or {})
        self.totals = dict.fromkeys(self.PARTS, 0.0)
        self.curve: list[dict] = []
        self.iterations = 0
        self._t0 = self._mark = self._epoch_end = self._val_start = 0.0
        self._val_in_epoch_end = 0.0
        self._sync = False

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _add(self, part: str) -> None:
        now = self._now()
        self.totals[part] += now - self._mark
        self._mark = now

    def attach(self, engine: Engine) -> None:
        # registered before the other handlers (first in the list): its STARTED and EPOCH_COMPLETED run first
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, lambda e: self._add("data"))
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, lambda e: self._add("forward"))
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, lambda e: self._add("loss"))
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda e: self._add("backward_optimizer"))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_end_started)
        engine.add_event_handler(Events.COMPLETED, lambda e: self.write(e, finished=True))
        engine.add_event_handler(Events.TERMINATE, lambda e: self.write(e, finished=True))
        if self.validator is not None:
            self.validator.add_event_handler(Events.STARTED, self._val_started)
            self.validator.add_event_handler(Events.COMPLETED, self._val_completed)

    def _started(self, engine: Engine) -> None:
        self._sync = str(getattr(engine.state, "device", "")).startswith("cuda") and torch.cuda.is_available()
        self._t0 = self._mark = self._now()
        self._trainer = engine
        # the last EPOCH_COMPLETED handler (attached now, after the checkpoint saver) closes the epoch end
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_end_completed)

    def _batch_started(self, engine: Engine) -> None:
        self._add("other")  # the iteration handlers (logging, progress bar) since the optimiser step

    def _iteration_completed(self, engine: Engine) -> None:
        self.iterations += 1
        if self.max_wall_s is not None and self._now() - self._t0 >= self.max_wall_s:
            logger.info("TrainingTimer: %.0f s of wall time reached, stopping", self.max_wall_s)
            engine.terminate()

    def _epoch_end_started(self, engine: Engine) -> None:
        self._add("other")
        self._epoch_end = self._mark
        self._val_in_epoch_end = 0.0

    def _epoch_end_completed(self, engine: Engine) -> None:
        now = self._now()
        self.totals["checkpoint"] += max(now - self._epoch_end - self._val_in_epoch_end, 0.0)
        self._mark = now
        self.write(engine)

    def _val_started(self, validator: Engine) -> None:
        self._val_start = self._now()

    def _val_completed(self, validator: Engine) -> None:
        now = self._now()
        spent = now - self._val_start
        self.totals["validation"] += spent
        self._val_in_epoch_end += spent
        metric = validator.state.metrics.get(self.key_metric)
        trainer = getattr(self, "_trainer", None)
        self.curve.append(
            {
                "iteration": trainer.state.iteration if trainer is not None else self.iterations,
                "wall_s": round(now - self._t0, 3),
                "metric": None if metric is None else float(metric),
                "val_s": round(spent, 3),
            }
        )
        self._mark = now
        if trainer is not None:
            self.write(trainer)  # a reader (a sweep, a person) sees each point as it comes

    def summary(self) -> dict:
        n = max(self.iterations, 1)
        step_parts = ("data", "forward", "loss", "backward_optimizer", "other")
        return {
            "iterations": self.iterations,
            "wall_s": round(time.perf_counter() - self._t0, 3) if self._t0 else 0.0,
            "total_s": {k: round(v, 3) for k, v in self.totals.items()},
            "per_iteration_s": {k: round(self.totals[k] / n, 5) for k in step_parts},
            "step_s": round(sum(self.totals[k] for k in step_parts) / n, 5),
            "key_metric": self.key_metric,
            "curve": self.curve,
            "info": self.info,
        }

    def write(self, engine: Engine | None = None, finished: bool = False) -> None:
        out = self.summary()
        out["finished"] = finished
        if engine is not None:
            out["epoch"] = int(engine.state.epoch)
        atomic_write_text(self.path, json.dumps(out, indent=1))
