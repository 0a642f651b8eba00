"""The error every stage raises for bad input, and config switches as MONAI's command line passes them."""

from __future__ import annotations

__all__ = ["InputError", "as_flag"]


class InputError(ValueError):
    """Bad input for a pair or a model; the message names the file and the reason."""


def as_flag(value: bool | str | int) -> bool:
    """A config switch as a bool: MONAI's CLI (fire) passes ``--x false`` as the text "false"."""
    return str(value).strip().lower() not in ("false", "0", "no", "none", "")
