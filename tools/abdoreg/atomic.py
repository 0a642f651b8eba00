"""The one atomic-write helper: an output appears complete or not at all, whenever the process dies.

``atomic_write(path, write)`` calls ``write(tmp)`` on a hidden temporary path in the target's folder,
``.<name>.<pid>-<random>.tmp<ext>``, then renames it over ``path`` in one step. The target's extension
is kept at the end because some writers choose the format from it (``.nii.gz``, ``.png``, ``.pt``); no
output pattern (``*.nii.gz``, ``checkpoint_epoch=N.pt``, ``datalist_*.json``) matches a hidden name. The
temporary path may become a file or a folder. ``remove_stale_temps`` deletes what a killed process left.

This file is the same, byte for byte, in every bundle and in ``tools/abdoreg`` (a bundle imports nothing
from outside its folder; a test keeps the copies equal).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "is_temp_name", "remove_stale_temps"]

# mkstemp-like modes would leave outputs readable by the owner only; outputs get 0o666 minus the umask.
_UMASK = os.umask(0)
os.umask(_UMASK)
_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)-[0-9a-f]+\.tmp(\.[^/]*)?$")


def _extension(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create ``path`` through ``write(tmp)`` (a file or a folder at ``tmp``); on error nothing is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{_extension(path.name)}")
    try:
        write(tmp)
        if tmp.is_dir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        else:
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def is_temp_name(name: str) -> bool:
    """True for the temporary names ``atomic_write`` uses."""
    return bool(_TEMP.match(name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove the temporary files and folders of processes that no longer run; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in list(folder.rglob(".*") if recursive else folder.glob(".*")):
        m = _TEMP.match(path.name)
        if m and path.exists() and not _alive(int(m.group("pid"))):
            _remove(path)
            removed.append(path)
    return removed
