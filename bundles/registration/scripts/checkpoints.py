"""Loading trained weights into the inference network, with an error that says what to pass."""

from __future__ import annotations

import logging
import os

import torch

from scripts.inputs import InputError

__all__ = ["checkpoint_handlers"]

logger = logging.getLogger("registration.infer")


def checkpoint_handlers(
    ckpt_path: str | None, network: torch.nn.Module, required: bool = True, device=None
) -> list:
    """A ``CheckpointLoader`` for the trained weights; a missing file is an error unless not ``required``."""
    from monai.handlers import CheckpointLoader

    required = str(required).strip().lower() not in ("false", "0", "no")  # the CLI may pass "false" as text
    if ckpt_path and os.path.isfile(ckpt_path):
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
