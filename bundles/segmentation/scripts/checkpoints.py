"""Training checkpoints that survive a kill at any moment, found again by a rerun, a finished run left alone.

MONAI's ``CheckpointSaver`` saves with ``atomic=False`` and, through Ignite's ``Checkpoint``, removes the previous
file *before* the next one is written: a run killed while saving keeps no usable checkpoint.
``AtomicCheckpointSaver`` is that saver with every file written atomically (``atomic.atomic_write``) and the files
it supersedes removed only once the new one is complete, ``checkpoint_epoch=N.pt`` files of earlier runs included
(a resumed run starts from one, which Ignite does not know about).

A shared copy: the registration and segmentation bundles hold the same file (``tests/test_layout.py`` keeps them
equal), so it imports only its bundle's ``atomic`` and libraries.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from scripts.atomic import atomic_write, remove_stale_temps

__all__ = ["AtomicCheckpointSaver", "latest_checkpoint", "run_unless_finished"]

logger = logging.getLogger(__name__)
_SERIES = re.compile(r"^(?P<stem>.+=)(?P<score>-?[0-9.]+)(?P<ext>\.pt)$")  # checkpoint_epoch=3.pt


class _WriteThenRemove(BaseSaveHandler):
    """Ignite save handler: atomic writes; superseded files are removed after the next complete write."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None, prune: bool) -> None:
        self.dirname, self.filename, self.prune = Path(dirname), filename, prune
        self.kept: set[str] = set()

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != 0:  # as MONAI's DiskSaver: rank 0 writes
            return
        name = self.filename or filename  # MONAI's fixed names (``model.pt``) replace Ignite's
        atomic_write(self.dirname / name, lambda tmp: torch.save(checkpoint, tmp))
        self.kept.add(name)
        series = _SERIES.match(name)
        if series and self.prune:  # the same series, not kept by Ignite (n_saved) or left by an earlier run
            for old in self.dirname.glob(f"{series['stem']}*{series['ext']}"):
                if _SERIES.match(old.name) and old.name not in self.kept:
                    logger.info("removing %s (superseded by %s)", old, name)
                    old.unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        self.kept.discard(self.filename or filename)  # deleted after the next complete write


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) whose files are never seen half-written or missing.

    It is also the record of the best model so far: list it in a training checkpoint's ``save_dict`` (as
    ``best``) and a resumed run keeps ``model.pt`` unless it beats the recorded best metric.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                fixed = ckpt.save_handler.filename
                ckpt.save_handler = _WriteThenRemove(save_dir, fixed, prune=ckpt.n_saved is not None)

    def attach(self, engine: Engine) -> None:
        for path in remove_stale_temps(self.save_dir, recursive=False):
            logger.info("removed %s, left by a run killed while saving", path)
        super().attach(engine)

    def state_dict(self) -> Mapping:
        """The best-model record (the key-metric checkpoint's files and scores), for a training checkpoint."""
        if self._key_metric_checkpoint is None:
            raise ValueError(
                "this saver keeps no best model (save_key_metric false): it has no record to save"
            )
        return self._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        """Take the best-model record back from a training checkpoint (a resumed run)."""
        if self._key_metric_checkpoint is None:
            raise ValueError("this saver keeps no best model (save_key_metric false): it takes no record")
        self._key_metric_checkpoint.load_state_dict(state)


def latest_checkpoint(
    ckpt_dir: str | os.PathLike, pattern: str = r"checkpoint_epoch=(\d+)\.pt"
) -> str | None:
    """The newest complete training checkpoint in ``ckpt_dir`` (highest epoch), or None: what a rerun resumes from.

    Hidden temporary files never match; a file that is not a complete zip archive (``torch.save``'s format: a
    truncated copy, or a file a killed non-atomic writer left under its final name) is skipped with a warning, so
    a rerun resumes from the last complete one.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), f) for f in folder.iterdir() if (m := re.fullmatch(pattern, f.name))), reverse=True
    )
    for _, path in found:
        if zipfile.is_zipfile(path):
            return str(path)
        logger.warning("%s is incomplete (cut short while being written): not resuming from it", path)
    return None


def run_unless_finished(trainer: Engine, resume_checkpoint: str | None = None) -> None:
    """Run ``trainer``, unless the checkpoint it resumed from (``resume_checkpoint``) already reached ``max_epochs``.

    Ignite restarts a finished engine from epoch 0, so a rerun of a finished training would train ``max_epochs``
    more epochs on top of its weights and overwrite its checkpoints.
    """
    state = trainer.state
    if state.max_epochs is not None and 0 < state.max_epochs <= state.epoch:
        logger.warning(
            "%straining already finished (epoch %d of max_epochs %d); nothing to do. Pass a larger --max_epochs "
            "to train more epochs from it, or --resume False (or another --ckpt_dir) to train again from the start.",
            f"{resume_checkpoint}: " if resume_checkpoint else "",
            state.epoch,
            state.max_epochs,
        )
        return
    trainer.run()
