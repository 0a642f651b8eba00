"""Training checkpoints: written atomically, found again by a rerun, a finished run left alone.

MONAI's ``CheckpointSaver`` saves with ``atomic=False`` and, through ignite's ``Checkpoint``, removes
the previous file *before* the next one is written: a run killed while saving keeps no usable
checkpoint. ``AtomicCheckpointSaver`` is that saver with every file written by the bundle's
``atomic_write`` and the removal of the replaced file deferred until its successor is complete.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from scripts.atomic import atomic_write, remove_stale_temps
from scripts.errors import as_flag
from scripts.weights import read_state

__all__ = ["AtomicCheckpointSaver", "latest_checkpoint", "run_unless_finished", "load_initial_weights"]

logger = logging.getLogger("registration.checkpoints")


class _AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler: atomic writes; a removal ignite asks for waits until the next file is complete."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname, self.filename = Path(dirname), filename  # ``filename``: fixed name (``model.pt``)
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        atomic_write(self.dirname / name, lambda tmp: torch.save(checkpoint, tmp))
        for old in self._pending:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)
        self._pending = []

    def remove(self, filename: str) -> None:
        self._pending.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose files are never seen half-written or missing.

    Every file is written to a hidden temp file and renamed; the file it replaces is removed only
    afterwards. Periodic checkpoints of the same series (``checkpoint_epoch=N.pt``) beyond
    ``n_saved`` that earlier runs in ``save_dir`` left (a resumed or restarted run does not know
    them) are removed after each save, and temp files of killed runs when the saver is attached.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = _AtomicDiskSaver(self.save_dir, ckpt.save_handler.filename)

    def attach(self, engine: Engine) -> None:
        for f in remove_stale_temps(self.save_dir, recursive=False):
            logger.info("removed %s, left by a run killed while saving", f)
        super().attach(engine)

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        ckpt = self._interval_checkpoint
        if ckpt is None or ckpt.n_saved is None:
            return
        kept = {item.filename for item in ckpt._saved}  # as MONAI reads it (_delete_previous_final_ckpt)
        series = {re.sub(r"\d+\.pt$", "", name) for name in kept}
        for f in Path(self.save_dir).iterdir():
            stem = re.sub(r"\d+\.pt$", "", f.name)
            if f.name not in kept and stem in series and f.name != stem:
                logger.info("removing %s (an earlier run's; the newest %d are kept)", f, ckpt.n_saved)
                f.unlink(missing_ok=True)


def latest_checkpoint(
    ckpt_dir: str | os.PathLike, pattern: str = r"^checkpoint_epoch=(\d+)\.pt$"
) -> str | None:
    """Newest complete training state in ``ckpt_dir`` (highest epoch), or None: what a resumed run loads.

    A file that is not a complete zip archive (``torch.save``'s format; a truncated copy, or a file a
    killed writer left under its final name) is skipped with a warning.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), f) for f in folder.iterdir() if (m := re.search(pattern, f.name))), reverse=True
    )
    for _, f in found:
        if zipfile.is_zipfile(f):
            return str(f)
        logger.warning("%s is incomplete (not a whole torch.save archive): skipped", f)
    return None


def run_unless_finished(trainer: Engine, resume_checkpoint: str | None = None) -> None:
    """Run ``trainer`` unless the checkpoint it resumed from already reached ``max_epochs``.

    Ignite restarts a finished engine from epoch 0, so a rerun of a finished training would train
    ``max_epochs`` more epochs on top of its weights and overwrite its checkpoints.
    """
    state = trainer.state
    if resume_checkpoint and state.max_epochs is not None and state.epoch >= state.max_epochs:
        logger.warning(
            "%s: this training already finished (epoch %d of max_epochs %d); nothing to do. Pass a larger "
            "--max_epochs to train more epochs from it, or --resume False (or another --ckpt_dir) to train "
            "again from the start.",
            resume_checkpoint,
            state.epoch,
            state.max_epochs,
        )
        return
    trainer.run()


def load_initial_weights(
    path: str | os.PathLike, network: torch.nn.Module, strict: bool | str = True, min_fraction: float = 0.5
) -> dict:
    """Start a fresh training from the weights in ``path`` (``initial_ckpt``, e.g. fine-tuning's pretrained
    source); returns ``{"loaded", "skipped"}`` tensor names.

    Strict: every tensor must fit, as ``load_state_dict`` checks. Not strict: the tensors whose names and shapes
    fit are loaded and the others keep their initial values; how many of each is logged (MONAI's loader says
    "Restored all variables" whatever it skipped), fewer than ``min_fraction`` of the network's tensors is
    warned about, and weights of which none fits (another network) are refused.
    """
    state = read_state(path)
    net = getattr(network, "module", network)
    if as_flag(strict):
        net.load_state_dict(state, strict=True)
        logger.info("%s: loaded all %d tensors of the network", path, len(state))
        return {"loaded": list(state), "skipped": []}
    own = net.state_dict()
    names = [k for k in own if k != "_extra_state"]
    fits = [k for k in names if k in state and tuple(state[k].shape) == tuple(own[k].shape)]
    skipped = [k for k in names if k not in fits]
    if not fits:
        raise ValueError(
            f"{path}: none of the network's {len(names)} tensors is in these weights with its shape (they hold "
            f"{len(state)}, e.g. {list(state)[:2]}): weights of another network; pass a checkpoint of this one"
        )
    net.load_state_dict({**own, **{k: state[k] for k in fits}}, strict=True)
    logger.info(
        "%s: loaded %d of the network's %d tensors; %d kept their initial values%s",
        path,
        len(fits),
        len(names),
        len(skipped),
        f" (e.g. {', '.join(skipped[:3])})" if skipped else "",
    )
    if len(fits) < min_fraction * len(names):
        logger.warning("%s: fewer than %.0f%% of the network's tensors were loaded", path, 100 * min_fraction)
    return {"loaded": fits, "skipped": skipped}
