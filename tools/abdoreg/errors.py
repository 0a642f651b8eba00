"""The CLI's error for a bad argument or pipeline file: printed as one message (exit 2), without a traceback."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A mistake on the command line or in a pipeline file, with what to do about it."""
