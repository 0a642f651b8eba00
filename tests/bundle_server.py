"""A fork server for the tests' bundle runs: ``python -m monai.bundle ...`` without paying ``import monai``.

Every test that runs a bundle as a user does (``run_bundle``) used to start a fresh interpreter and spend
5-6 s of CPU importing torch and MONAI before its first line of work. This server imports those libraries
once and forks one child per command; the child sets up the command's working folder, environment,
``sys.path`` and ``sys.argv`` as ``python -m monai.bundle`` would and runs MONAI's own ``__main__`` (fire parses
the command line), so each run is still a process of its own: its exit status, its stdout and stderr, its
locks (released when it exits), its ITK thread count, RNG and logging set-up are its own, and nothing it
changes reaches the test process or the next run.

The server only imports third-party libraries (never a bundle's ``scripts``, nor ANTs/ITK, which fix their
thread count at their first use in a process) and stays single-threaded, so forking it is safe.

Protocol (JSON lines): the client writes ``{"argv", "cwd", "env", "stdout", "stderr"}`` (files the child
appends to; ``stderr`` null: into stdout); the server answers ``{"pid"}`` once the child runs, then
``{"returncode"}`` when it ends (negative: killed by that signal), one command at a time. The server ends when
its stdin closes. ``BundlePopen`` and ``run`` below are the client side: a pool of servers, so that commands
can run at the same time (the pipeline runner's ``jobs``).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

_LOCK = threading.Lock()  # the client's pool of servers

# What every bundle run imports first; importing more here makes each fork cheaper, but never a bundle's
# own code, ANTs or ITK (see the module docstring).
PRELOAD = (
    "numpy",
    "scipy.ndimage",
    "torch",
    "nibabel",
    "fire",
    "yaml",
    "ignite.engine",
    "monai",
    "monai.bundle",
    "monai.bundle.__main__",
    "monai.transforms",
    "monai.data",
    "monai.engines",
    "monai.handlers",
    "monai.networks.nets",
    "monai.losses",
    "monai.metrics",
    "torch.utils.tensorboard",
    "matplotlib.pyplot",
)


def _exit_code(exc: SystemExit) -> int:
    """The status Python exits with for ``SystemExit(code)`` (a message is printed to stderr, status 1)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _child(request: dict, base_path: list[str]) -> None:
    """Become ``python -m monai.bundle <argv>`` in ``cwd`` with ``env``; never returns."""
    code = 1
    try:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            if request[name] is None:  # stderr into stdout
                os.dup2(1, fd)
                continue
            target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(target, fd)
            os.close(target)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the requests' pipe is the server's, not the run's
        os.close(devnull)
        sys.stdin = open(0, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # `python -m` puts the working folder first, then PYTHONPATH, then the interpreter's own paths
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.getcwd(), *extra, *base_path]
        sys.argv = [sys.modules["monai.bundle.__main__"].__file__, *request["argv"]]
        threads = request["env"].get("OMP_NUM_THREADS")
        import numpy
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        numpy.random.seed()  # a fresh interpreter's unseeded numpy differs from run to run; so does this
        try:
            runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:
            traceback.print_exc()
            code = 1
        # what the interpreter does at exit: wait for threads, run atexit (locks are released, logs flushed)
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve() -> None:
    # answers go to a private copy of stdout; fd 1 becomes stderr so that nothing else can write into them
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for name in PRELOAD:
        __import__(name)
    base_path = [p for p in sys.path[1:] if p]  # without this script's folder (`python -m` adds the cwd)
    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            _child(request, base_path)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


# ---------------------------------------------------------------------------------------------
# client side (the test process)
# ---------------------------------------------------------------------------------------------
FRESH_VARIABLE = "ABDOREG_TEST_FRESH_INTERPRETER"  # "1": every command in a fresh interpreter (slower)


class _Server:
    """One server process and its answers."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # each command brings its own
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env=env,
            bufsize=0,
        )
        self.buffer = b""
        self.answer("ready", timeout=600)

    def answer(self, key: str, timeout: float | None):
        """The next answer (``key`` of its JSON line); ``TimeoutError`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                self.proc.wait()
                raise RuntimeError("the tests' bundle server ended unexpectedly (its stderr is the tests')")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)[key]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_IDLE: list[_Server] = []
_ALL: list[_Server] = []


def _acquire() -> _Server:
    """An idle server of this process, or a new one (the first one registers their shutdown at exit)."""
    with _LOCK:
        while _IDLE:
            server = _IDLE.pop()
            if server.proc.poll() is None:
                return server
        if not _ALL:
            atexit.register(_close_all)
    server = _Server()
    with _LOCK:
        _ALL.append(server)
    return server


def _close_all() -> None:
    for server in _ALL:
        try:
            server.close()
        except Exception:
            pass


def _path(stream) -> str:
    """The absolute path of a file given as a path or as an open file."""
    return os.path.abspath(stream if isinstance(stream, (str, os.PathLike)) else stream.name)


class BundlePopen:
    """``subprocess.Popen(cmd, cwd=, env=, stdout=, stderr=)`` for a ``python -m monai.bundle ...`` command, run
    as a child of a fork server. ``stdout``: a path or an open file (appended to); ``stderr``: a path, a file,
    or ``subprocess.STDOUT``."""

    def __init__(self, cmd: list[str], cwd=None, env=None, stdout=None, stderr=None) -> None:
        if list(cmd[1:3]) != ["-m", "monai.bundle"]:
            raise ValueError(f"not a `python -m monai.bundle` command: {cmd}")
        if stdout is None:
            raise ValueError("BundlePopen writes into files: pass stdout")
        self.args, self.returncode = cmd, None
        self._server = _acquire()
        request = {
            "argv": list(cmd[3:]),
            "cwd": os.path.abspath(cwd or os.getcwd()),
            "env": dict(os.environ if env is None else env),
            "stdout": _path(stdout),
            "stderr": None if stderr == subprocess.STDOUT else _path(stderr),
        }
        for stream in (stdout, stderr):
            if hasattr(stream, "flush"):
                stream.flush()  # what the caller wrote comes first
        self._server.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.pid = self._server.answer("pid", timeout=60)

    def _finished(self, timeout: float | None) -> bool:
        if self.returncode is None:
            try:
                self.returncode = self._server.answer("returncode", timeout=timeout)
            except TimeoutError:
                return False
            with _LOCK:
                _IDLE.append(self._server)
        return True

    def poll(self) -> int | None:
        self._finished(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._finished(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def fresh_interpreters() -> bool:
    """Whether ``ABDOREG_TEST_FRESH_INTERPRETER`` asks for a fresh interpreter per command."""
    return os.environ.get(FRESH_VARIABLE, "") not in ("", "0")


def popen(cmd: list[str], **kwargs):
    """``subprocess.Popen``, with ``python -m monai.bundle`` commands forked from a server."""
    if list(cmd[1:3]) == ["-m", "monai.bundle"] and not fresh_interpreters():
        return BundlePopen(cmd, **kwargs)
    return subprocess.Popen(cmd, **kwargs)


def run(cmd: list[str], cwd, env: dict, timeout: float):
    """``subprocess.run(cmd, cwd=, env=, capture_output=True, text=True, timeout=)`` for a ``python -m
    monai.bundle`` command, forked from a server."""
    with tempfile.TemporaryDirectory(prefix="bundle-run-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = BundlePopen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(60)
            raise subprocess.TimeoutExpired(
                cmd, timeout, out.read_text(errors="replace"), err.read_text(errors="replace")
            ) from None
        return subprocess.CompletedProcess(
            cmd, proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace")
        )


if __name__ == "__main__":
    serve()
