"""The bundle's one atomic-write helper: every output file is written to a temp file and renamed.

A reader (the Learn2Reg evaluator, a resumed run, a zip of the submission) never sees a half-written
file, and a killed run leaves at most a hidden ``.<name>.*`` temp file, which no output pattern
matches.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "is_temp_name"]

# mkstemp creates files readable by the owner only; outputs get the usual mode (0o666 minus the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)


def is_temp_name(name: str) -> bool:
    """True for the hidden temp files this module creates (and any other hidden file)."""
    return name.startswith(".")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it onto ``path``.

    The temp name keeps the target's extension (``.nii.gz``, ``.png``, ``.zip``, ``.pt``) because
    some writers choose the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (UTF-8, newlines as given)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)
