"""Trained weights for inference and fine-tuning: read, the network they belong to built, mismatches explained.

A ``GradientRegNet`` records its settings in its state dict (``scripts.networks``), so ``inference.json``
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
from scripts.networks import MODEL_SETTINGS, GradientRegNet, recorded_settings, settings_from_shapes

__all__ = [
    "read_state",
    "network_settings",
    "network_from_checkpoint",
    "setting_hints",
    "mismatch",
    "check_weights",
    "checkpoint_handlers",
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


def network_settings(state: Mapping[str, torch.Tensor]) -> dict | None:
    """The ``GradientRegNet`` settings a state dict records, else those its shapes tell (saved before the
    settings were recorded); None for another network."""
    return recorded_settings(state) or settings_from_shapes(state)


def network_from_checkpoint(path: str | os.PathLike | None = None, **defaults: Any) -> GradientRegNet:
    """The ``GradientRegNet`` the weights in ``path`` were trained as (not loaded: ``CheckpointLoader`` does).

    ``defaults`` fill what the checkpoint does not record: everything when there is no file at ``path`` (an
    untrained network, e.g. for instance optimisation from the identity), and the settings that weights
    saved before the settings were recorded cannot tell by their shapes (``downsample``, ``step_range``).
    """
    if not path or not os.path.isfile(str(path)):
        return GradientRegNet(**defaults)
    state = read_state(path)
    recorded = recorded_settings(state)
    if recorded is None:
        shapes = settings_from_shapes(state)
        if shapes is None:
            raise InputError(_foreign(path, state, "a GradientRegNet"))
        recorded = {**defaults, **shapes}
        logger.warning(
            "%s records no settings (saved before they were recorded): read as %s; pass --network_def#<name> "
            "for a setting it was trained with otherwise",
            path,
            recorded,
        )
    return GradientRegNet(**recorded)


def _foreign(path: Any, state: Mapping, expected: str) -> str:
    return (
        f"{path}: these weights do not fit {expected}: they share no parameter name with it (they have "
        f"{list(state)[:3]}): a checkpoint of another network (the segmentation bundle's model?); pass this "
        "bundle's models/model.pt, or the network_def it was trained with"
    )


def _cli_hint(key: str, value: Any) -> str:
    """What to pass to ``train.json`` so that its network gets ``value`` for setting ``key``."""
    if key == "in_channels":
        what = {1: "--multi_window False", 3: "--multi_window True"}.get(
            value, f"--ct_windows with {value} windows"
        )
        return f"{value} CT window(s) per scan: pass {what}"
    if key == "input_windows":
        return f'CT windows {value}: pass --ct_windows "{value}"'
    text = str(value).lower() if isinstance(value, bool) else value
    return f"{key} {value}: pass --{key} {text}"


def setting_hints(state: Mapping[str, torch.Tensor], network: torch.nn.Module) -> list[str]:
    """For each model setting in which the weights' network differs from ``network`` (a ``GradientRegNet``),
    what to pass; empty when that cannot be told."""
    net = getattr(network, "module", network)
    theirs = network_settings(state)
    if theirs is None or not hasattr(
        net, "differences"
    ):  # a GradientRegNet (by behaviour: modules may be reloaded)
        return []
    keys = net.differences(theirs)
    if "input_windows" in keys and "in_channels" in keys:
        keys.remove("input_windows")
    return [_cli_hint(k, theirs[k]) for k in keys if k in MODEL_SETTINGS]


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
