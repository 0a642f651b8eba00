"""``abdoreg``: the command line that makes synthetic data and chains the bundles' stages."""

from __future__ import annotations

import time
from pathlib import Path

import fire

from . import bench_train
from .pipeline import PIPELINES, Runner
from .synth import ALL_COHORTS, generate


def synth(
    out: str = "data/synthetic",
    size: str = "tiny",
    n_l2r: int = 9,
    n_other: int = 3,
    cohorts: str | tuple[str, ...] = ALL_COHORTS,
    seed: int = 0,
) -> str:
    """Generate synthetic cohorts in their native layouts (sizes: tiny, demo, small, full)."""
    names = cohorts.split(",") if isinstance(cohorts, str) else tuple(cohorts)
    return str(generate(out, size=size, n_l2r=n_l2r, n_other=n_other, cohorts=names, seed=seed))


def _pipeline_file(config: str) -> Path:
    """A pipeline file path, or the name of one shipped in ``abdoreg/pipelines`` (demo, tiny, full)."""
    path = Path(config)
    if path.exists():
        return path
    shipped = PIPELINES / f"{config}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(p.stem for p in sorted(PIPELINES.glob("*.yaml")))
    raise FileNotFoundError(f"no pipeline file {config!r} (shipped pipelines: {names})")


class Pipeline:
    """Run the stages of a pipeline file: ``abdoreg pipeline run --config demo --work runs/demo``."""

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
        skipped; ``--jobs N`` runs up to N independent stages at once (default: the file's ``jobs``)."""
        runner = Runner(_pipeline_file(config), work, extra_vars=vars, jobs=jobs)
        runner.run(start=start, only=only)
        return None

    def list(self, config: str = "demo", work: str = "runs/demo", **vars) -> None:
        """Print the stages and whether each is done (stamp matches and outputs exist)."""
        runner = Runner(_pipeline_file(config), work, extra_vars=vars)
        for stage in runner.stages:
            print(f"{'done   ' if runner.is_done(stage) else 'pending'}  {stage.name}")


def demo(work: str = "runs/demo", jobs: int | None = None) -> None:
    """The synthetic end-to-end demo: all five stages at small size on CPU, then the ablation table."""
    t0 = time.time()
    Pipeline().run(config="demo", work=work, jobs=jobs)
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min")
    print(f"report: {Path(work) / 'report' / 'report.md'} and report.png")


class BenchTrain:
    """Training benchmark (``abdoreg bench_train run --datalist ...``): step split and time to quality."""

    run = staticmethod(bench_train.bench)
    sweep = staticmethod(bench_train.sweep)
    tuning_split = staticmethod(bench_train.tuning_split)


COMMANDS = {"synth": synth, "pipeline": Pipeline, "demo": demo, "bench_train": BenchTrain}


def main() -> None:
    fire.Fire(COMMANDS)


if __name__ == "__main__":
    main()
