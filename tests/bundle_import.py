"""Import a bundle's ``scripts`` package in a shared pytest process.

Every MONAI bundle names its plugin package ``scripts``; two of them collide in one
interpreter. This helper swaps ``sys.modules`` so each test gets the bundle it asks for.
Keep imports of bundle code at module level of the bundle's own files (no imports of
``scripts`` inside functions), so a later swap cannot change what was already bound.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
# The MONAI bundle metadata schema (offline validation): the file named by this variable, else
# ``shared/schemas/`` beside the repository (developers' machines and CI).
SCHEMA_VARIABLE = "ABDOREG_MONAI_SCHEMA"
SCHEMA_NAME = "meta_schema_20240725.json"


def metadata_schema() -> Path:
    """The MONAI metadata schema file, or skip the calling test with the reason (a fresh clone has none)."""
    import os

    import pytest

    named = os.environ.get(SCHEMA_VARIABLE)
    path = Path(named) if named else REPO.parent / "shared" / "schemas" / SCHEMA_NAME
    if not path.is_file():
        pytest.skip(
            f"MONAI metadata schema not found at {path}: set {SCHEMA_VARIABLE} to a copy of {SCHEMA_NAME} "
            "(the `schema` URL of the bundles' metadata.json) to validate metadata.json"
        )
    return path


def bundle_dir(name: str) -> Path:
    return BUNDLES / name


def import_bundle_module(bundle: str, module: str = "scripts"):
    """Return ``module`` (e.g. ``"scripts.losses"``) imported from ``bundles/<bundle>``."""
    root = str(bundle_dir(bundle))
    loaded = sys.modules.get("scripts")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(root):
        for key in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
            del sys.modules[key]
    for other in [str(bundle_dir(b)) for b in ("registration", "segmentation", "preprocessing")]:
        while other in sys.path:
            sys.path.remove(other)
    sys.path.insert(0, root)
    return importlib.import_module(module)


def run_bundle(
    bundle: str,
    configs: str | list[str],
    overrides: dict | None = None,
    *,
    entry: str = "run",
    env: dict | None = None,
    timeout: float = 900,
    check: bool = True,
    nproc: int = 1,
):
    """Run ``python -m monai.bundle <entry>`` for a bundle as a user would (the command line of
    ``abdoreg.bundles.bundle_command``: overrides as literals MONAI's CLI parses back; ``nproc > 1`` under
    ``torchrun --standalone``). Returns a ``subprocess.CompletedProcess`` (stdout and stderr as text).

    A one-process command is a child of the tests' fork server (``tests/bundle_server.py``): a process of its
    own, with its exit status, output and global state, without the 5-6 s of ``import monai`` a fresh
    interpreter pays; ``ABDOREG_TEST_FRESH_INTERPRETER=1`` runs every command in a fresh interpreter instead."""
    import os
    import subprocess

    from abdoreg.bundles import bundle_command, bundle_env

    root = bundle_dir(bundle)
    cmd = bundle_command(root, configs, overrides, entry=entry, nproc=nproc)
    full_env = bundle_env(root)
    full_env.update(env or {})
    if nproc == 1 and os.environ.get(FRESH_VARIABLE, "") in ("", "0"):
        proc = _server().run(cmd, cwd=root, env=full_env, timeout=timeout)
    else:
        proc = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"bundle {bundle} {entry} failed ({proc.returncode}):\n{' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


# "1": every bundle command of the tests in a fresh interpreter (as before the fork server; slower)
FRESH_VARIABLE = "ABDOREG_TEST_FRESH_INTERPRETER"


class BundleServer:
    """Client of ``tests/bundle_server.py``: one server per test process, started at its first command."""

    def __init__(self) -> None:
        import threading

        self._proc = None
        self._buffer = b""
        self._lock = threading.Lock()

    def _start(self) -> None:
        import os
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # each command brings its own
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("bundle_server.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=env,
            bufsize=0,
        )
        self._buffer = b""
        self._answer("ready", timeout=600)

    def _answer(self, key: str, timeout: float | None):
        """The next answer of the server (``key`` of its JSON line); ``TimeoutError`` after ``timeout`` s."""
        import json
        import os
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._proc.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self._proc.stdout.fileno(), 65536)
            if not chunk:
                self._proc.wait()
                self._proc = None
                raise RuntimeError("the tests' bundle server ended unexpectedly (see the captured stderr)")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)[key]

    def run(self, cmd: list[str], cwd: Path, env: dict, timeout: float):
        """``cmd`` (``python -m monai.bundle ...``) as a child of the server; like ``subprocess.run`` with
        ``capture_output=True, text=True``."""
        import json
        import os
        import signal
        import subprocess
        import tempfile

        assert cmd[1:3] == ["-m", "monai.bundle"], cmd
        with self._lock, tempfile.TemporaryDirectory(prefix="bundle-run-") as tmp:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": cmd[3:], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = self._answer("pid", timeout=60)
            try:
                returncode = self._answer("returncode", timeout=timeout)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._answer("returncode", timeout=60)
                raise subprocess.TimeoutExpired(
                    cmd, timeout, out.read_text(errors="replace"), err.read_text(errors="replace")
                ) from None
            return subprocess.CompletedProcess(
                cmd, returncode, out.read_text(errors="replace"), err.read_text(errors="replace")
            )

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
            self._proc = None


_SERVER: BundleServer | None = None


def _server() -> BundleServer:
    global _SERVER
    if _SERVER is None:
        import atexit

        _SERVER = BundleServer()
        atexit.register(_SERVER.close)
    return _SERVER
