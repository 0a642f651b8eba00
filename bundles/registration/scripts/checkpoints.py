"""Checkpoints: written atomically, found again by a rerun, a finished run left alone, and trained
weights loaded with an error that says which file, which setting differs and what to pass.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver

from scripts.atomic import atomic_write
from scripts.inputs import InputError
from scripts.networks import FIELD_MARK

__all__ = [
    "AtomicCheckpointSaver",
    "latest_checkpoint",
    "run_unless_finished",
    "check_weights",
    "checkpoint_handlers",
    "setting_hints",
]

logger = logging.getLogger("registration.checkpoints")

# a temp file that atomic_write leaves when the process is killed while writing ``<name>.pt``
_STALE_TEMP = re.compile(r"^\..+\.pt\.[^.]+\.pt$")


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
        folder = Path(self.save_dir)
        for f in folder.iterdir() if folder.is_dir() else []:
            if _STALE_TEMP.match(f.name):
                logger.info("removing %s, left by a run killed while saving", f)
                f.unlink(missing_ok=True)
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


# ----------------------------------------------------------------------------------------------
# trained weights for inference: checked before anything runs
# ----------------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _gradientregnet_settings(state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """Settings of a ``GradientRegNet`` read from its tensor shapes (None for another network)."""
    first = state.get("input_block.convs.0.conv.weight")
    if first is None or first.ndim != 5:
        return None
    widths = [int(first.shape[0])]
    blocks = []
    level = 0
    while f"down.{level}.down.conv.weight" in state:
        widths.append(int(state[f"down.{level}.down.conv.weight"].shape[0]))
        n = 0
        while f"down.{level}.stack.convs.{n}.conv.weight" in state:
            n += 1
        blocks.append(n)
        level += 1
    field = "displacement" if FIELD_MARK in state else "gradient"
    return {"in_channels": int(first.shape[1]), "widths": widths, "blocks_per_level": blocks, "field": field}


def _setting_hints(
    found: Mapping[str, Any], wanted: Mapping[str, Any], channel_multiplier: float | None
) -> list[str]:
    """What to pass so that the configured network matches the checkpoint's settings."""
    hints = []
    if found["in_channels"] != wanted["in_channels"]:
        c = found["in_channels"]
        what = {1: "--multi_window False", 3: "--multi_window True"}.get(c, f"--ct_windows with {c} windows")
        hints.append(f"{c} CT window(s) per scan where this config uses {wanted['in_channels']}: pass {what}")
    if found["blocks_per_level"] != wanted["blocks_per_level"]:
        hints.append(
            f"blocks_per_level {found['blocks_per_level']} (config: {wanted['blocks_per_level']}): pass "
            f'--blocks_per_level "{found["blocks_per_level"]}"'
        )
    if found["field"] != wanted["field"]:
        hints.append(
            f"{found['field']} heads where this network has {wanted['field']} heads: pass --field "
            f"{found['field']}, or list configs/fast_train.json after the configs if it was trained with it"
        )
    fw, ww = found["widths"], wanted["widths"]
    if fw != ww and len(fw) == len(ww):
        ratios = {f / w for f, w in zip(fw, ww, strict=True)}
        if len(ratios) == 1 and channel_multiplier:
            mult = channel_multiplier * ratios.pop()
            mult_text = f"{mult:g}"
            hints.append(
                f"channel_multiplier {mult_text} (widths {fw}; config: {channel_multiplier:g}, widths {ww}): "
                f"pass --channel_multiplier {mult_text}"
            )
        else:
            hints.append(
                f"layer widths {fw} where this config builds {ww}: set --base_channels/--channel_multiplier"
            )
    elif len(fw) != len(ww):
        hints.append(
            f"{len(fw) - 1} levels where this config builds {len(ww) - 1}: set --base_channels and --blocks_per_level"
        )
    return hints


def setting_hints(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    channel_multiplier: float | None = None,
) -> list[str]:
    """What to pass so that a network with the ``expected`` state dict reads ``state`` (both
    ``GradientRegNet``s, settings read from their shapes); empty when that cannot be told."""
    found, wanted = _gradientregnet_settings(state), _gradientregnet_settings(expected)
    return _setting_hints(found, wanted, channel_multiplier) if found and wanted else []


def check_weights(
    path: str | os.PathLike, network: torch.nn.Module, channel_multiplier: float | None = None
) -> None:
    """Raise an ``InputError`` naming ``path`` unless its weights load into ``network`` as they are.

    Reads a plain state dict (``model.pt``) or a training checkpoint (``checkpoint_epoch=N.pt``, its
    ``model`` entry). The message says whether the file is unreadable (truncated), from another
    network, or from this network with other settings, and then which ones and what to pass.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, foreign files: many types
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)}); the file "
            "may be truncated (an interrupted save or copy) or not a checkpoint: pass --ckpt_path with a complete "
            "model.pt"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a training checkpoint
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise InputError(f"{path}: holds no network weights (expected a state dict of tensors, as model.pt)")
    net = getattr(network, "module", network)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    head = f"{path}: these weights do not fit the configured network ({type(net).__name__})"
    if hints := setting_hints(state, expected, channel_multiplier):
        raise InputError(f"{head}: the checkpoint was trained with " + "; ".join(hints))
    if not set(state) & set(expected):
        raise InputError(
            f"{head}: it shares no parameter name with it (it has {list(state)[:3]}, the network "
            f"{list(expected)[:3]}): a checkpoint of another network (the segmentation bundle's model?); "
            "pass --ckpt_path with this bundle's models/model.pt, or the network_def it was trained with"
        )
    details = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} here" for k in wrong[:3]
    ]
    if missing:
        details.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} not in the network (e.g. {unexpected[0]})")
    raise InputError(f"{head}: " + "; ".join(details) + "; pass the network settings it was trained with")


def checkpoint_handlers(
    ckpt_path: str | None,
    network: torch.nn.Module,
    required: bool = True,
    device: Any = None,
    channel_multiplier: float | None = None,
) -> Sequence:
    """A ``CheckpointLoader`` for the trained weights, checked first (``check_weights``); a missing file
    is an error unless not ``required``."""
    required = str(required).strip().lower() not in ("false", "0", "no")  # the CLI may pass "false" as text
    if ckpt_path and os.path.isfile(ckpt_path):
        check_weights(ckpt_path, network, channel_multiplier)
        return [
            CheckpointLoader(
                load_path=ckpt_path, load_dict={"model": network}, map_location=device, strict=True
            )
        ]
    if required:
        raise InputError(
            f"{ckpt_path}: trained weights not found (pass --ckpt_path, or --require_checkpoint False to run untrained)"
        )
    logger.warning("no checkpoint at %s: running the network with its initial weights", ckpt_path)
    return []
