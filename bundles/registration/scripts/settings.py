"""A network's settings recorded in its state dict: written, read back, compared, mismatches explained.

A network class decorated with ``records_settings`` keeps its constructor arguments in its state dict
(``_extra_state``), so a checkpoint says which network it belongs to (``scripts.weights.network_from_checkpoint``
builds it), and loading weights into a network with other settings fails with the settings that differ, also
where the shapes agree (the heads, the prediction grid and the CT windows change the field, not the weights).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "MODEL_SETTINGS",
    "SETTINGS_KEY",
    "records_settings",
    "recorded_settings",
    "differences",
    "setting_hints",
]

# Settings that change the weights' shapes, the field computed from them, or the inputs they expect. The
# others (deep_supervision, symmetric, supervised_levels) only change what training mode returns.
MODEL_SETTINGS = (
    "in_channels", "channel_multiplier", "base_channels", "blocks_per_level", "downsample", "step_range",
    "head_type", "norm", "act", "input_windows", "pseudo_channels",
)  # fmt: skip
SETTINGS_KEY = "_extra_state"  # where torch's state_dict keeps a module's extra state
# The settings are stored as a fixed-length uint8 tensor (JSON padded with spaces): a tensor, because
# monai.networks.copy_model_state (monai.bundle.load) reads every entry's shape, and of fixed length, so that
# it copies the entry and the comparison in set_extra_state runs.
SETTINGS_BYTES = 2048


def _json_value(value: Any) -> Any:
    """A setting as JSON keeps it (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def _encode(settings: Mapping[str, Any]) -> torch.Tensor:
    data = json.dumps(settings, sort_keys=True).encode("utf-8")
    if len(data) > SETTINGS_BYTES:
        raise ValueError(f"the network's settings take {len(data)} bytes, more than {SETTINGS_BYTES}")
    return torch.tensor(list(data.ljust(SETTINGS_BYTES)), dtype=torch.uint8)


def recorded_settings(state: Mapping[str, Any]) -> dict | None:
    """The settings a state dict records, or None (a network that records none)."""
    value = state.get(SETTINGS_KEY)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.ndim != 1:
        return None
    try:
        settings = json.loads(bytes(value.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """The model settings (``MODEL_SETTINGS``) in which ``theirs`` differ from ``ours``; a setting one side does
    not record (None) matches any."""
    out = []
    for key in MODEL_SETTINGS:
        a, b = _json_value(theirs.get(key)), _json_value(ours.get(key))
        if a is None or b is None:
            continue
        if key in ("channel_multiplier", "step_range"):
            if float(a) != float(b):
                out.append(key)
        elif a != b:
            out.append(key)
    return out


def _get_extra_state(self: torch.nn.Module) -> torch.Tensor:
    return _encode(self.settings)


def _set_extra_state(self: torch.nn.Module, state: Any) -> None:
    """Loading weights saved with other settings is an error that names them."""
    saved = recorded_settings({SETTINGS_KEY: state})
    if saved is None:
        raise ValueError(f"the state dict's {SETTINGS_KEY} is not the settings of a {type(self).__name__}")
    diff = differences(saved, self.settings)
    if diff:
        raise ValueError(
            f"these weights were saved by a {type(self).__name__} with other settings ("
            + "; ".join(f"{k}: {saved.get(k)!r} in the weights, {self.settings.get(k)!r} here" for k in diff)
            + "): build the network from the checkpoint (scripts.weights.network_from_checkpoint) or with "
            "the same settings"
        )


def records_settings(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """Class decorator: the module keeps its constructor arguments (defaults included) as ``settings`` and in its
    state dict, and refuses weights saved with other model settings. The arguments the class names in
    ``settings_as_attributes`` are recorded as the module keeps them (its attribute of the same name: e.g. CT
    windows as floats), so that equal networks record equal bytes however their arguments were written."""
    init: Callable = cls.__init__
    signature = inspect.signature(init)
    as_attributes = set(getattr(cls, "settings_as_attributes", ()))

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        arguments = list(bound.arguments.items())[1:]  # after self
        self.settings = _json_value({k: getattr(self, k) if k in as_attributes else v for k, v in arguments})

    cls.__init__ = __init__
    cls.get_extra_state = _get_extra_state
    cls.set_extra_state = _set_extra_state
    return cls


def _cli_hint(key: str, value: Any) -> str:
    """What to pass to ``train.json`` so that its network gets ``value`` for setting ``key``."""
    if key == "in_channels":
        what = {1: "--multi_window False", 3: "--multi_window True"}.get(
            value, f"--ct_windows with {value} windows"
        )
        return f"{value} CT window(s) per scan: pass {what}"
    if key == "input_windows":
        return f'CT windows {value}: pass --ct_windows "{value}"'
    if key == "pseudo_channels":
        return f"{value} predicted-label channels per scan: pass --pseudo_input {str(bool(value)).lower()}"
    text = str(value).lower() if isinstance(value, bool) else value
    return f"{key} {value}: pass --{key} {text}"


def setting_hints(state: Mapping[str, torch.Tensor], network: torch.nn.Module) -> list[str]:
    """For each model setting in which the weights' network differs from ``network`` (one that records its
    settings), what to pass; empty when that cannot be told."""
    net = getattr(network, "module", network)
    theirs, ours = recorded_settings(state), getattr(net, "settings", None)
    if theirs is None or not isinstance(ours, Mapping):
        return []
    keys = differences(theirs, ours)
    if "input_windows" in keys and "in_channels" in keys:
        keys.remove("input_windows")
    return [_cli_hint(k, theirs[k]) for k in keys]
