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

Protocol (JSON lines): the client writes ``{"argv", "cwd", "env", "stdout", "stderr"}``; the server answers
``{"pid"}`` once the child runs, then ``{"returncode"}`` when it ends (negative: killed by that signal).
The server ends when its stdin closes.
"""

from __future__ import annotations

import json
import os
import sys

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
            target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
        import runpy

        try:
            runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        # what the interpreter does at exit: wait for threads, run atexit (locks are released, logs flushed)
        import atexit
        import threading

        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        import traceback

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


if __name__ == "__main__":
    serve()
