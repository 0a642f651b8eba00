"""Checkpoints that survive a kill at any moment, resuming from the last complete one, finished runs left alone.

MONAI's ``CheckpointSaver`` writes with ``atomic=False`` and Ignite removes checkpoint N before
N+1 is written, so a kill during the write leaves nothing to resume from. ``AtomicCheckpointSaver``
writes every file atomically (``atomic.atomic_write``) and removes the files it supersedes only
once the new one is complete; that includes ``checkpoint_epoch=N.pt`` files of earlier runs (a
resumed run starts from one, which Ignite does not know about).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from .atomic import atomic_write, remove_stale_temps

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
                    old.unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        self.kept.discard(self.filename or filename)  # deleted after the next complete write


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) whose files are never partial or missing."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                fixed = ckpt.save_handler.filename
                ckpt.save_handler = _WriteThenRemove(save_dir, fixed, prune=ckpt.n_saved is not None)

    def attach(self, engine: Engine) -> None:
        for path in remove_stale_temps(self.save_dir, recursive=False):
            logger.info(f"removed {path}, left by a run killed while saving")
        super().attach(engine)


def _complete(path: Path) -> bool:
    """A ``torch.save`` file is a zip archive; a truncated one has no central directory."""
    return zipfile.is_zipfile(path)


def latest_checkpoint(
    ckpt_dir: str | os.PathLike, pattern: str = r"checkpoint_epoch=(\d+)\.pt"
) -> str | None:
    """The newest complete training checkpoint in ``ckpt_dir`` (highest epoch), or None.

    Hidden temporary files never match; an unreadable newest file (written by a non-atomic saver
    and cut short) is skipped with a warning, so a rerun resumes from the last complete one.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), f) for f in folder.iterdir() if (m := re.fullmatch(pattern, f.name))), reverse=True
    )
    for _, path in found:
        if _complete(path):
            return str(path)
        logger.warning(f"{path} is incomplete (cut short while being written): not resuming from it")
    return None


def run_unless_finished(trainer: Engine) -> None:
    """Run the trainer, unless the checkpoint it resumed from already reached ``max_epochs``.

    Ignite would start a finished run again from epoch 0 on top of the trained weights. To train
    longer, raise ``max_epochs``; to train again from scratch, pass ``--resume False``.
    """
    state = trainer.state
    if state.max_epochs is not None and 0 < state.max_epochs <= state.epoch:
        trainer.logger.info(
            f"training already finished: the checkpoint reached epoch {state.epoch} of max_epochs "
            f"{state.max_epochs}; nothing to do (raise --max_epochs to train longer, or --resume False "
            "to start over)"
        )
        return
    trainer.run()
