"""Writing outputs so that no reader ever sees a half-written or temporary file.

Every output goes through ``atomic_write``: the bytes go to a hidden temporary file in the same
folder (``.<name>.<pid>.tmp``, a name no output pattern such as ``*.nii.gz`` or
``datalist_*.json`` matches), which is then renamed over the target. A file whose content would
not change is left alone, so its modification time (which the pipeline's stamps read) stays.
Temporary files left by a killed run are removed by the next run (``remove_stale_temps``).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

# ``.<name>.<pid>.tmp`` (this module) and ``.tmp-<pid>-<name>`` (written by earlier versions).
_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$|^\.tmp-(\d+)-.+$")


def temp_path(path: Path) -> Path:
    """The temporary file ``path`` is written through: hidden, and ending in ``.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, data: bytes) -> bool:
    """Write ``data`` to ``path`` (temp file + rename) unless it already holds exactly that; True if written."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file with ``affine`` as sform and qform (deterministic bytes: gzip mtime 0)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: Path, recursive: bool = True) -> list[Path]:
    """Remove temporary files of processes that no longer run (a killed run's leftovers); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*") if recursive else folder.glob(".*"):
        m = _TEMP.match(path.name)
        if m and path.is_file() and not _alive(int(m.group(1) or m.group(2))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
