"""The one atomic-write helper: an output appears complete or not at all, whenever the process dies.

``atomic_write(path, write)`` calls ``write(tmp)``, where ``tmp`` has the target's own name inside a hidden
folder beside it (``.tmp-<pid>-<random>/<name>``), then renames ``tmp`` over ``path`` in one step. The name
keeps its extension because some writers choose the format from it (``.nii.gz``, ``.png``, ``.npz``), and
no reader of the target's folder sees it: ``*.nii.gz`` or ``checkpoint_epoch=N.pt`` in that folder match no
file inside a subfolder. ``tmp`` may become a file or a folder. ``scratch(parent)`` is such a hidden folder for
a library's own temporary files (ANTs' transforms), removed when the block ends. ``remove_stale_temps``
deletes what a killed process left of either.

This file is the same, byte for byte, in every bundle and in ``tools/abdoreg`` (a bundle imports nothing
from outside its folder; a test keeps the copies equal).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "scratch",
    "is_temp_name",
    "remove_stale_temps",
]

# ``.tmp-<pid>-<random>`` (this module), and ``.<name>.<pid>.tmp`` files of earlier versions
_TEMP = re.compile(r"^\.tmp-(?P<pid>\d+)-.+$|^\..+\.(?P<old_pid>\d+)\.tmp$")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _new_temp_folder(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    folder = parent / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


@contextmanager
def scratch(parent: str | os.PathLike) -> Iterator[Path]:
    """A new hidden folder in ``parent`` for temporary files, removed (with its content) when the block ends."""
    folder = _new_temp_folder(Path(parent))
    try:
        yield folder
    finally:
        _remove(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create ``path`` through ``write(tmp)`` (a file or a folder at ``tmp``); on error nothing is left."""
    path = Path(path)
    folder = _new_temp_folder(path.parent)
    tmp = folder / path.name
    try:
        write(tmp)
        if tmp.is_dir() and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
    finally:
        _remove(folder)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def is_temp_name(name: str) -> bool:
    """True for the temporary names ``atomic_write`` uses (a path with such a part is not an output)."""
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
        if m and path.exists() and not _alive(int(m.group("pid") or m.group("old_pid"))):
            _remove(path)
            removed.append(path)
    return removed
