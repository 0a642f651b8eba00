"""Checks of what a client sends, answered with an HTTP 4xx status and a message that names the input.

MONAI Label turns any other exception of an infer task into a bare 500; a ``fastapi.HTTPException``
raised from the app or a task reaches the client with its status and ``detail``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
from fastapi import HTTPException

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def client_error(status: int, message: str) -> HTTPException:
    """A 4xx answer; the message is what the client sees as ``detail``."""
    return HTTPException(status_code=status, detail=message)


def volume_problem(path: str | os.PathLike) -> str | None:
    """Why the NIfTI at ``path`` is not one 3D volume (trailing singleton axes allowed), or None.

    Reads the header only. Files nibabel does not handle (DICOM folders, NRRD) are left to the task.
    """
    if not str(path).endswith(NIFTI_SUFFIXES):
        return None
    try:
        shape = tuple(nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises several types for truncated or foreign files
        return f"unreadable NIfTI ({type(exc).__name__}: {exc})"
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        return f"expected one 3D volume, got a {len(dims)}D image of shape {shape}"
    if min(dims) < 2:
        return f"expected one 3D volume, got shape {shape} (an axis of size {min(dims)})"
    return None


def path_inside(path: str | os.PathLike, root: str | os.PathLike) -> Path | None:
    """``path`` (relative to ``root`` unless absolute) resolved through symlinks, if it stays under ``root``."""
    root_real = Path(root).resolve()
    candidate = Path(path)
    candidate = (candidate if candidate.is_absolute() else root_real / candidate).resolve()
    return candidate if candidate.is_relative_to(root_real) else None
