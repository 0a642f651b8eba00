"""Output files of the preprocessing bundle: deterministic bytes, written only when they change.

Every output goes through ``atomic.atomic_write_bytes`` (temp file + rename). A file whose content would
not change is left alone, so its modification time (which the pipeline's stamps read) stays; the NIfTI
bytes are deterministic (gzip mtime 0) so that an unchanged case gives unchanged bytes.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import atomic_write_bytes

__all__ = ["write_if_changed", "json_bytes", "nifti_bytes"]


def write_if_changed(path: str | os.PathLike, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless it already holds exactly that; True if written."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file with ``affine`` as sform and qform (deterministic bytes: gzip mtime 0)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)
