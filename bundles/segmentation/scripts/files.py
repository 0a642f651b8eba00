"""Writing outputs so that a reader never sees a half-written file, whatever moment the process dies.

The one atomic-write helper of this bundle: the content goes to a hidden temporary file in the
target's folder (``.<name>.<pid>.tmp``, which matches no output pattern such as ``*.nii.gz`` or
``checkpoint_epoch=N.pt``), then ``os.replace`` puts it in place in one step.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "nifti_bytes"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Create ``path`` through ``write(binary file)``: complete or absent, never partial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file with ``affine`` as sform and qform."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)
