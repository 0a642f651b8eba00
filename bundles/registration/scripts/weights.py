"""Trained weights for inference and fine-tuning: read, the network they belong to built, mismatches explained,
and loaded as the start of a training (``load_initial_weights``).

A ``GradientRegNet`` records its settings in its state dict (``scripts.settings``), so ``inference.json``
builds the network a checkpoint was trained as, whatever recipe trained it (``network_from_checkpoint``).
Weights that do not fit a network (another width, another head type, another network) are an error that
names the file, the settings that differ and what to pass, before anything runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import torch
from monai.handlers import CheckpointLoader

from scripts.errors import InputError, as_flag
from scripts.networks import GradientRegNet
from scripts.settings import recorded_settings, setting_hints

__all__ = [
    "read_state",
    "network_from_checkpoint",
    "mismatch",
    "check_weights",
    "checkpoint_handlers",
    "load_initial_weights",
]

logger = logging.getLogger("registration.weights")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_state(
    source: str | os.PathLike | BinaryIO, what: str = "checkpoint", name: str | None = None
) -> Mapping[str, torch.Tensor]:
    """The network weights in ``source`` (a file, or a file object called ``name``): a plain state dict
    (``model.pt``) or a training checkpoint's ``model`` entry (``checkpoint_epoch=N.pt``); an ``InputError``
    naming the file if it holds none."""
    path = name or source
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, foreign files: many types
        raise InputError(
            f"{path}: not a readable PyTorch {what} ({type(exc).__name__}: {_first_line(exc)}); the file may be "
            "truncated (an interrupted save or copy) or not a checkpoint: pass a complete model.pt"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a training checkpoint
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise InputError(f"{path}: holds no network weights (expected a state dict of tensors, as model.pt)")
    return state


def network_from_checkpoint(path: str | os.PathLike | None = None, **defaults: Any) -> GradientRegNet:
    """The ``GradientRegNet`` the weights in ``path`` were trained as (not loaded: ``CheckpointLoader`` does).

    Without a file at ``path``, ``GradientRegNet(**defaults)``: the recommended network unless ``defaults`` say
    otherwise (an untrained network, e.g. for instance optimisation from the identity).
    """
    if not path or not os.path.isfile(str(path)):
        return GradientRegNet(**defaults)
    state = read_state(path)
    recorded = recorded_settings(state)
    if recorded is None:
        raise InputError(
            f"{path}: these weights record no GradientRegNet settings (they have {list(state)[:3]}): a checkpoint "
            "of another network (the segmentation bundle's model?); pass this bundle's models/model.pt"
        )
    return GradientRegNet(**recorded)


def _foreign(path: Any, state: Mapping, expected: str) -> str:
    return (
        f"{path}: these weights do not fit {expected}: they share no parameter name with it (they have "
        f"{list(state)[:3]}): a checkpoint of another network (the segmentation bundle's model?); pass this "
        "bundle's models/model.pt, or the network_def it was trained with"
    )


def mismatch(state: Mapping[str, torch.Tensor], network: torch.nn.Module) -> str | None:
    """Why ``state`` does not load into ``network`` as it is (None when it does): the settings that differ
    and what to pass, another network, or the first keys and shapes that differ."""
    net = getattr(network, "module", network)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        k
        for k in expected
        if k in state and k != "_extra_state" and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    hints = setting_hints(state, net)
    if hints:
        return "it was trained with " + "; ".join(hints)
    if not set(state) & (set(expected) - {"_extra_state"}):
        return "another network"
    if not (missing or unexpected or wrong):
        return None
    details = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} here" for k in wrong[:3]
    ]
    if missing:
        details.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} not in the network (e.g. {unexpected[0]})")
    return "; ".join(details) + "; pass the network settings it was trained with"


def check_weights(path: str | os.PathLike, network: torch.nn.Module) -> None:
    """Raise an ``InputError`` naming ``path`` unless its weights load into ``network`` as they are."""
    state = read_state(path)
    why = mismatch(state, network)
    if why == "another network":
        raise InputError(_foreign(path, state, f"the configured network ({type(network).__name__})"))
    if why:
        raise InputError(
            f"{path}: these weights do not fit the configured network ({type(network).__name__}): {why}"
        )


def checkpoint_handlers(
    ckpt_path: str | None,
    network: torch.nn.Module,
    required: bool | str = True,
    device: Any = None,
    used: bool | str = True,
) -> Sequence:
    """A ``CheckpointLoader`` for the trained weights, checked first (``check_weights``); a missing file is an
    error unless not ``required``, and a warning only where the network is ``used`` (instance optimisation from
    the identity never runs it)."""
    if ckpt_path and os.path.isfile(ckpt_path):
        check_weights(ckpt_path, network)
        return [
            CheckpointLoader(
                load_path=ckpt_path, load_dict={"model": network}, map_location=device, strict=True
            )
        ]
    if as_flag(required):
        raise InputError(
            f"{ckpt_path}: trained weights not found (pass --ckpt_path, or --require_checkpoint False to run untrained)"
        )
    if as_flag(used):
        logger.warning("no checkpoint at %s: running the network with its initial weights", ckpt_path)
    return []


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
