"""Folder locks: one run at a time writes into a folder; a second run is refused and told which one holds it.

``hold(folder, what)`` takes an exclusive ``fcntl.flock`` on ``<folder>/.lock`` for the life of the process
(or until ``release``). The kernel drops the lock when its process ends, however it ends, so a killed run
leaves nothing to clear by hand: the next run takes the folder over and says so. The file records the
holder's PID, what it does, its command line and its start time, for the message a second run gets; a run that
ends normally (``release``, or at interpreter exit) empties it, so only a run that died leaves a record behind.

This file is the same, byte for byte, in every bundle and in ``tools/abdoreg`` (a test keeps the copies equal).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderInUse", "hold", "release", "locked"]

LOCK_NAME = ".lock"
logger = logging.getLogger("abdoreg.locks")
_HELD: dict[str, int] = {}  # folder -> descriptor of its lock file, for the life of this process


class FolderInUse(RuntimeError):
    """Another live process holds the folder; the message names it and what to do."""


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except ValueError:
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hold(folder: str | os.PathLike, what: str = "a run") -> Path:
    """Lock ``folder`` (created if needed) for this process; ``FolderInUse`` when another process holds it."""
    folder = Path(folder).resolve()
    key = str(folder)
    if key in _HELD:
        return folder / LOCK_NAME
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        raise FolderInUse(
            f"{folder} is in use by {holder.get('what', 'another run')} (PID {holder.get('pid', '?')}, since "
            f"{since}: {holder.get('command', '?')}). Wait for it to finish, stop it (kill "
            f"{holder.get('pid', '<pid>')}), or write into another folder."
        ) from None
    previous = _read(fd)
    if previous.get("pid") and previous["pid"] != os.getpid() and not _alive(int(previous["pid"])):
        logger.warning(
            "%s: taking over from %s (PID %s), which ended without finishing",
            folder,
            previous.get("what"),
            previous["pid"],
        )
    record = {"pid": os.getpid(), "what": what, "command": " ".join(sys.argv)[:500], "since": time.time()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())
    _HELD[key] = fd
    return folder / LOCK_NAME


def release(folder: str | os.PathLike) -> None:
    """Give ``folder`` back: the record is emptied (this run finished), the lock file stays."""
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _release_all() -> None:
    """At interpreter exit: the folders this process still holds, released as finished."""
    for folder in list(_HELD):
        release(folder)


atexit.register(_release_all)


@contextmanager
def locked(folder: str | os.PathLike, what: str = "a run") -> Iterator[Path]:
    """``hold`` for the duration of a ``with`` block."""
    path = hold(folder, what)
    try:
        yield path
    finally:
        release(folder)
