"""Chain the bundles' stages from a pipeline file, resumably.

A pipeline file (YAML) lists stages; each runs one bundle config through ``python -m monai.bundle run``
with overrides, in its own log. The shipped pipelines (demo, tiny, bench, full) name one ``graph`` file,
``ablation.yaml``, which holds the stages; they set its variables and leave out optional stages
(``skip``). A stage is skipped when a stamp (hash of its config files, overrides, input files and the
Python code it runs) matches and its outputs exist; an interrupted training stage is simply run again and
resumes from the checkpoint the bundle left. With ``jobs`` > 1, stages whose inputs do not come from each
other run at the same time (like ``make -j``): a stage waits for every earlier stage that writes one of its
inputs (a path equal to, inside, or containing an output or its folder) or that it names in ``after``.
SIGTERM or SIGINT to the runner ends every running stage with all its descendants (e.g. preprocessing
workers) before the runner exits. Stages stay in the runner's process group, so ``kill -- -PGID`` (the
only way to reach them after a SIGKILL of the runner alone) ends them too. This module holds no stage
logic: what a stage does lives in the bundle's config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_text
from .bundles import REPO, bundle_command, bundle_env, bundle_root
from .errors import UsageError
from .locks import FolderInUse, hold, release

PIPELINES = Path(__file__).resolve().parent / "pipelines"


@dataclass
class Stage:
    name: str
    bundle: str | None = None  # bundle folder under bundles/, or None for a built-in step
    configs: list[str] = field(default_factory=list)  # config files under the bundle's configs/
    overrides: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)  # files/folders whose content changes the result
    outputs: list[str] = field(default_factory=list)  # must exist once the stage is done
    builtin: str | None = None  # "synth" or "report"
    args: dict[str, Any] = field(default_factory=dict)  # arguments of a built-in step
    nproc: int = 1  # >1: run under torchrun with this many processes
    env: dict[str, str] = field(default_factory=dict)  # environment variables of the stage's process
    after: list[str] = field(default_factory=list)  # stages to wait for besides those found from paths
    row: str | None = None  # the stage's row in the report (its first output is the row's metrics.json)
    step_of: list[str] = field(
        default_factory=list
    )  # rows this row is an ablation step from (the first that runs)


def _substitute(value: Any, variables: dict[str, str]) -> Any:
    """Replace ``{name}`` in strings (recursively) with pipeline variables; other braces are kept."""
    if isinstance(value, str):
        return re.sub(r"\{(\w+)\}", lambda m: str(variables.get(m.group(1), m.group(0))), value)
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


def find_pipeline(config: str | os.PathLike) -> Path:
    """A pipeline file path, or the name of one shipped in ``abdoreg/pipelines`` (demo, tiny, bench, full)."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = PIPELINES / f"{config}.yaml"
    if shipped.is_file() and str(config) != "ablation":
        return shipped
    names = ", ".join(p.stem for p in sorted(PIPELINES.glob("*.yaml")) if p.stem != "ablation")
    raise UsageError(f"no pipeline file {str(config)!r} (shipped pipelines: {names})")


def _expand(stages: list[dict], tables: dict) -> list[dict]:
    """Stages with ``foreach: <table>`` repeated for each entry of that table: ``foreach: cohorts`` sets
    ``{cohort}`` to each key and ``{cohort_dir}`` to its value (a table's name less its final s)."""
    out = []
    for stage in stages:
        table = stage.get("foreach")
        if table is None:
            out.append(stage)
            continue
        if table not in tables:
            raise UsageError(f"stage {stage.get('name')!r}: foreach names no table {table!r}")
        body = {k: v for k, v in stage.items() if k != "foreach"}
        item = table[:-1] if table.endswith("s") else table
        for key, value in tables[table].items():
            out.append(_substitute(copy.deepcopy(body), {item: key, f"{item}_dir": value}))
    return out


def read_spec(path: str | os.PathLike) -> dict:
    """The pipeline file as a dict. A pipeline that names a ``graph`` gets the graph's stages (``foreach``
    expanded, ``skip`` left out), variables, ``env`` and ``jobs``, with its own values over them."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    graph_name = spec.get("graph")
    graph = yaml.safe_load((path.parent / graph_name).read_text()) if graph_name else spec
    own_vars = spec.get("vars", {}) or {}
    if graph_name:
        unknown = sorted(set(own_vars) - set(graph.get("vars", {}) or {}))
        if unknown:
            raise UsageError(f"{path}: variables {unknown} are not variables of its graph {graph_name}")
    tables = {k: v for k, v in graph.items() if k not in ("vars", "env") and isinstance(v, dict)}
    stages = _expand(graph.get("stages", []), tables)
    skip = list(spec.get("skip", []) or [])
    names = [s["name"] for s in stages]
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise UsageError(f"{path}: skip names no stage {unknown} (stages: {', '.join(names)})")
    return {
        "vars": {**(graph.get("vars", {}) or {}), **own_vars},
        "env": {**(graph.get("env", {}) or {}), **(spec.get("env", {}) or {})},
        "jobs": spec.get("jobs", graph.get("jobs", 1)),
        "skip": skip,
        "stages": [s for s in stages if s["name"] not in skip],
    }


def load_pipeline(
    path: str | Path, work: str | Path, extra_vars: dict | None = None
) -> tuple[dict, list[Stage]]:
    """Read a pipeline file; ``{work}``, ``{repo}`` and the file's ``vars`` are substituted."""
    spec = read_spec(path)
    variables = {"work": str(Path(work).resolve()), "repo": str(REPO)}
    for key, value in {**spec["vars"], **(extra_vars or {})}.items():
        variables[key] = str(_substitute(value, variables))
    common_env = {k: str(v) for k, v in spec["env"].items()}
    stages = [Stage(**_substitute(s, variables)) for s in spec["stages"]]
    for stage in stages:
        stage.env = {**common_env, **{k: str(v) for k, v in stage.env.items()}}
        stage.configs = [c for c in stage.configs if c]  # a variable set to "" leaves its config out
        stage.overrides = {k: v for k, v in stage.overrides.items() if v != ""}  # ... and its override
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: stage names must be unique")
    for i, stage in enumerate(stages):
        unknown = [a for a in stage.after if a not in names[:i]]
        if unknown:
            raise ValueError(f"{path}: stage {stage.name} is after {unknown}, which are not earlier stages")
    rows = {s.row: s.outputs[0] for s in stages if s.row}
    steps = {s.row: next((r for r in s.step_of if r in rows), None) for s in stages if s.row and s.step_of}
    for (
        stage
    ) in stages:  # the report lists the rows of the stages that run, and the ablation steps among them
        if stage.builtin == "report" and "methods" not in stage.args:
            stage.args["methods"] = dict(rows)
            if any(steps.values()):
                stage.args["steps"] = {row: base for row, base in steps.items() if base}
    return variables, stages


def depends_on(stage: Stage, earlier: Stage) -> bool:
    """True when ``stage`` must wait for ``earlier``: named in ``after``, or one of its inputs is inside the
    folder of one of ``earlier``'s outputs (the output itself included) or contains that output."""
    if earlier.name in stage.after:
        return True
    outs = [Path(o) for o in earlier.outputs]
    return any(Path(i).is_relative_to(o.parent) or o.is_relative_to(i) for i in stage.inputs for o in outs)


def dependencies(stages: list[Stage]) -> dict[str, set[str]]:
    """For each stage, the names of the earlier stages in ``stages`` it must wait for."""
    return {s.name: {t.name for t in stages[:i] if depends_on(s, t)} for i, s in enumerate(stages)}


def _signature(path: Path) -> list:
    """Names, sizes and mtimes of a file or every file under a folder (ignoring hidden temp files)."""
    if not path.exists():
        return [str(path), None]
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    )
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def stage_code(stage: Stage) -> dict[str, str]:
    """Hashes of the Python a stage runs: its bundle's ``scripts/``, or this package's own steps."""
    if stage.bundle:
        root = bundle_root(stage.bundle)
        files = list((root / "scripts").rglob("*.py"))
    else:
        root = Path(__file__).resolve().parent
        files = [root / "steps.py", root / "atomic.py", *(root / "synth").rglob("*.py")]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def stage_configs(stage: Stage) -> list[Path]:
    """Every file of a bundle stage's ``configs/`` that can change its result: the configs it lists, the files
    of ``configs/`` they name (``organs.json``), and the data tables in sub-folders (the cohort tables), which
    configs name through expressions (``'/configs/cohorts/' + @cohort + '.json'``)."""
    if not stage.bundle:
        return []
    cfg_dir = bundle_root(stage.bundle) / "configs"
    listed = [cfg_dir / c for c in stage.configs]
    text = "\n".join(p.read_text() for p in listed if p.is_file())
    named = [p for p in cfg_dir.iterdir() if p.is_file() and p not in listed and p.name in text]
    tables = [p for p in cfg_dir.rglob("*") if p.is_file() and p.parent != cfg_dir]
    return [*listed, *sorted(named), *sorted(tables)]


def stage_stamp(stage: Stage) -> str:
    """Hash of everything that determines a stage's result: settings, configs and the data tables they read,
    code and inputs."""
    content: dict[str, Any] = {"stage": stage.__dict__}
    if stage.bundle:
        root = bundle_root(stage.bundle)
        content["configs"] = {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in stage_configs(stage)
        }
    content["code"] = stage_code(stage)
    content["inputs"] = [_signature(Path(p)) for p in stage.inputs]
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def exception_lines(log: str, max_lines: int = 40) -> list[str]:
    """The exception lines of every Python traceback in ``log``, the root cause first (as Python prints
    chained exceptions): what went wrong, without the frames of MONAI's config machinery around it."""
    found: list[str] = []
    state = "text"  # text -> frames (after "Traceback ...") -> message (the exception lines)
    for line in log.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            state = "frames"
        elif state == "frames" and line and not line[0].isspace():
            state = "message"
            found.append(line)
        elif state == "message":
            if not line.strip() or line.startswith(("The above exception", "During handling")):
                state = "text"
            else:
                found.append(line)
    return found[:max_lines]


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an ended one waiting to be reaped is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)  # no /proc (not Linux): existence is all we can tell
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, parents first (Linux ``/proc``; elsewhere ``pid`` alone)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        found.append(queue.pop(0))
        queue += children.get(found[-1], [])
    return found


class StageFailed(RuntimeError):
    """A stage's process failed; the message names its log and quotes the exception lines."""


class Interrupted(KeyboardInterrupt):
    """The runner got SIGTERM or SIGINT: its running stages were ended, it stops."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; running stages were ended")
        self.signum = signum


class Runner:
    """Runs the stages of one pipeline in one working folder (logs and stamps live there)."""

    def __init__(
        self,
        pipeline: str | Path,
        work: str | Path,
        extra_vars: dict | None = None,
        echo=print,
        jobs: int | None = None,
        launch=subprocess.Popen,
    ):
        """``launch``: how a bundle stage's command starts (``subprocess.Popen``'s signature and result; the
        tests pass one that forks stages from a server that imported MONAI once)."""
        self.work = Path(work).resolve()
        self.launch = launch
        self.pipeline = Path(pipeline)
        self.variables, self.stages = load_pipeline(pipeline, self.work, extra_vars)
        jobs = jobs if jobs is not None else read_spec(pipeline)["jobs"]
        try:
            self.jobs = int(jobs)
        except (TypeError, ValueError):
            raise UsageError(
                f"--jobs must be a whole number of stages to run at once, got {jobs!r}"
            ) from None
        if self.jobs < 1:
            raise UsageError(f"--jobs must be at least 1, got {self.jobs}")
        self.echo = echo
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def select(self, start: str | None = None, only: str | list[str] | None = None) -> list[Stage]:
        names = [s.name for s in self.stages]
        wanted = [only] if isinstance(only, str) else list(only or [])
        wanted = [w for item in wanted for w in str(item).split(",") if w]
        for name in [*wanted, *([start] if start else [])]:
            if name not in names:
                raise ValueError(f"unknown stage {name!r}; stages: {', '.join(names)}")
        if wanted:
            return [s for s in self.stages if s.name in wanted]
        return self.stages[names.index(start) :] if start else list(self.stages)

    def is_done(self, stage: Stage) -> bool:
        stamp = self.work / "stamps" / f"{stage.name}.json"
        if not stamp.exists() or not all(Path(p).exists() for p in stage.outputs):
            return False
        return json.loads(stamp.read_text()).get("hash") == stage_stamp(stage)

    def run(
        self, start: str | None = None, only: str | list[str] | None = None
    ) -> list[tuple[str, str, float]]:
        """Run the selected stages (in file order, ``jobs`` at a time where they do not depend on each
        other); returns (stage, status, seconds) rows in the order the stages finished. After a failure
        no new stage starts; those running finish, then the first error is raised."""
        selected = self.select(start, only)
        self._prepare_work()
        try:
            hold(self.work, f"abdoreg pipeline run ({self.pipeline.name})")
        except FolderInUse as exc:
            raise UsageError(str(exc).replace("another folder", "another --work folder")) from None
        restore = self._forward_signals()
        try:
            return self._run(selected)
        except BaseException:
            self._end_children()
            raise
        finally:
            restore()
            release(self.work)

    def _prepare_work(self) -> None:
        """The working folder with its logs/ and stamps/, or a ``UsageError`` saying why it cannot be one."""
        if self.work.exists() and not self.work.is_dir():
            raise UsageError(
                f"--work {self.work} is a file, not a folder: pass a folder for the pipeline's outputs"
            )
        try:
            for sub in ("logs", "stamps"):
                (self.work / sub).mkdir(parents=True, exist_ok=True)
            probe = self.work / "stamps" / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UsageError(
                f"--work {self.work} cannot be written ({exc.strerror or exc}): pass a folder you can write to"
            ) from None

    def _forward_signals(self):
        """On SIGTERM/SIGINT (main thread only), end the running stages and raise ``Interrupted``."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            raise Interrupted(signum)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(sig, h) for sig, h in previous.items()]

    def _end_children(self, grace: float = 10.0) -> None:
        """SIGTERM to every running stage and its descendants, SIGKILL to those left after ``grace`` s."""
        with self._lock:
            children = list(self._children)
        targets = [pid for proc in children for pid in descendants(proc.pid)]  # before any is reparented
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                for proc in children:
                    proc.poll()  # reaps our own children
                targets = [pid for pid in targets if _running(pid)]
                if not targets:
                    return
                time.sleep(0.05)

    def _run(self, selected: list[Stage]) -> list[tuple[str, str, float]]:
        deps = dependencies(selected)
        rows: list[tuple[str, str, float]] = []
        finished: set[str] = set()
        errors: list[BaseException] = []
        pending, running = list(selected), {}
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            while pending or running:
                for stage in list(pending):
                    if errors or len(running) >= self.jobs:
                        break
                    if not deps[stage.name] <= finished:
                        continue
                    pending.remove(stage)
                    if self.is_done(stage):
                        self.echo(f"[skip] {stage.name}: unchanged")
                        rows.append((stage.name, "skipped", 0.0))
                        finished.add(stage.name)
                        continue
                    running[pool.submit(self._run_stage, stage)] = stage
                if not running:
                    break  # nothing can start: an error stopped the run (or every stage is finished)
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    stage = running.pop(future)
                    try:
                        rows.append(future.result())
                        finished.add(stage.name)
                    except Exception as exc:  # re-raised once the running stages end
                        errors.append(exc)
                        self.echo(f"[fail] {stage.name}")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on an interrupt, do not wait for stages
        if errors:
            raise errors[0]
        return rows

    def _run_stage(self, stage: Stage) -> tuple[str, str, float]:
        t0 = time.time()
        self.echo(f"[run ] {stage.name} (log: {self.work / 'logs' / (stage.name + '.log')})")
        self._forget_stale_run(stage)
        self._execute(stage)
        missing = [p for p in stage.outputs if not Path(p).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name} finished but did not write {', '.join(missing)}")
        stamp = self.work / "stamps" / f"{stage.name}.json"
        atomic_write_text(
            stamp, json.dumps({"hash": stage_stamp(stage), "seconds": round(time.time() - t0, 1)})
        )
        self.echo(f"[done] {stage.name} in {time.time() - t0:.0f} s")
        return stage.name, "done", time.time() - t0

    def _forget_stale_run(self, stage: Stage) -> None:
        """A stage that finished before with other inputs, configs or code starts afresh.

        Its resumable state (the ``ckpt_dir`` a bundle stage writes checkpoints to) is removed with its
        stamp; a stage with no stamp was interrupted, so its state stays and the bundle resumes from it.
        Without this a bundle would see its finished checkpoint and leave the old result in place.
        """
        stamp = self.work / "stamps" / f"{stage.name}.json"
        if not stamp.exists():
            return
        state = stage.overrides.get("ckpt_dir") if stage.bundle else None
        if state and Path(state).is_dir():
            self.echo(
                f"[new ] {stage.name}: inputs, configs or code changed since it finished; removing {state}"
            )
            shutil.rmtree(state)
        stamp.unlink()

    def _execute(self, stage: Stage) -> None:
        log = self.work / "logs" / f"{stage.name}.log"
        if stage.builtin:
            from . import steps  # the CLI's own steps: synthetic data and the report

            with log.open("w") as fh:
                getattr(steps, stage.builtin)(log=lambda msg: print(msg, file=fh, flush=True), **stage.args)
            return
        cmd = bundle_command(stage.bundle, stage.configs, stage.overrides, nproc=stage.nproc)
        env = bundle_env(stage.bundle, {**os.environ, **stage.env})
        with log.open("w") as fh:
            fh.write(" ".join(shlex.quote(c) for c in cmd) + "\n\n")
            fh.flush()
            proc = self.launch(cmd, cwd=self.work, env=env, stdout=fh, stderr=subprocess.STDOUT)
            with self._lock:
                self._children.add(proc)
            try:
                proc.wait()
            finally:
                with self._lock:
                    self._children.discard(proc)
        if proc.returncode != 0:
            text = log.read_text(errors="replace")
            cause = exception_lines(text)
            tail = "".join(text.splitlines(keepends=True)[-15:])
            because = "\n".join(["cause (the exception lines of the log):", *cause, ""]) if cause else ""
            raise StageFailed(
                f"stage {stage.name} failed (exit {proc.returncode}), log {log}\n{because}"
                f"last lines of the log:\n{tail}"
            )
