"""Training benchmark: where a training step's time goes, and the time to quality of a recipe.

It runs the registration bundle's ``configs/train.json`` as a user would (``python -m monai.bundle
run``, one OMP thread) with the bundle's ``TrainingTimer`` switched on by config (``timing_file``),
and reads the JSON that handler writes: the per-step split (data wait, forward, loss, backward +
optimiser, other handlers) and per run the validation and checkpoint time, and the validation
curve against wall time. **Time to quality** is the wall time from the trainer's start until the
validation Dice first reaches the identity's Dice (the validation at start) + ``margin``.

Recipes are plain dicts of ``train.json`` overrides (``RECIPES``); ``crops`` is the demo's training
before the CPU recipe existed, ``fast`` the recipe chosen on a tuning split (``tuning_split``), never on the
validation pairs. ``sweep`` runs many recipes at once (a GPU, or a many-core machine) and collects
their curves. Nothing here imports bundle code: it reads the files the bundle writes.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .bundles import BUNDLES, bundle_command, bundle_env
from .errors import UsageError

BUNDLE = BUNDLES / "registration"

# The demo grid and the width every recipe below shares (6 mm, 48x40x64; multiplier 1).
DEMO_GRID = {"spatial_size": [48, 40, 64], "pixdim": [6.0, 6.0, 6.0], "channel_multiplier": 1}

# Each recipe: the bundle configs it lists after train.json, and its overrides (the grid above is added).
# Validation runs every `pairs_per_epoch` pairs (batch 1: iterations).
RECIPES: dict[str, tuple[list[str], dict]] = {
    # the demo's registration training before the CPU recipe (the experiments page's long run): the paper's
    # settings but lr 1e-3, batch 1 and 32x32x48 crops
    "crops": (
        [],
        {
            "crop_size": [32, 32, 48],
            "batch_size": 1,
            "learning_rate": 0.001,
            "pairs_per_epoch": 100,
            "downsample": 1,
        },
    ),
    # configs/fast_train.json, chosen on held-out training pairs (docs/experiments/registration.md, "Training recipe
    # for CPU budgets"), with the bundle's default half-resolution field (as the demo trains it)
    "fast": (["fast_train.json"], {"pairs_per_epoch": 100, "downsample": 2}),
}

# The paper's configuration (one step is timed; a GPU's work on this CPU).
PAPER = {"channel_multiplier": 8, "downsample": 1, "crop_size": [128, 128, 128], "batch_size": 2}


def prepare_data(
    work: str | os.PathLike, size: str = "tiny", n_l2r: int = 30, spacing=(6.0, 6.0, 6.0), shape=(48, 40, 64)
) -> str:
    """Synthetic Learn2Reg-style scans (``n_l2r`` subjects: 0001, 0004, ... 0028 are validation), run through the
    preprocessing bundle onto the grid; returns the datalist. Reused when it exists."""
    from .synth import generate

    work = Path(work).resolve()
    datalist = work / "preprocessed" / "datalist.json"
    if datalist.exists():
        return str(datalist)
    generate(work / "raw", size=size, n_l2r=n_l2r, n_other=0, cohorts=("l2r",), log=lambda _: None)
    args = {
        "cohort": "l2r",
        "input_dir": str(work / "raw" / "AbdomenCTCT"),
        "output_dir": str(work / "preprocessed"),
        "pixdim": list(spacing),
        "spatial_size": list(shape),
    }
    cmd = bundle_command("preprocessing", "preprocess.json", args)
    subprocess.run(cmd, env=bundle_env("preprocessing"), check=True, capture_output=True, text=True)
    return str(datalist)


def run_train(
    overrides: Mapping,
    work: str | os.PathLike,
    configs: Sequence[str] = ("train.json",),
    threads: int = 1,
    timeout: float | None = None,
    bundle: str | os.PathLike = BUNDLE,
) -> dict:
    """Train once with ``overrides`` into ``work``; return the timing JSON plus the process wall time."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timing = work / "timing.json"
    args = {
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "logs"),
        "timing_file": str(timing),
        "num_workers": 0,
        "progress_bar": False,
        **overrides,
    }
    env = bundle_env(bundle, {**os.environ, "OMP_NUM_THREADS": str(threads)})
    t0 = time.perf_counter()
    with open(work / "train.log", "w") as log:
        proc = subprocess.run(
            bundle_command(bundle, list(configs), args),
            cwd=bundle,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    wall = time.perf_counter() - t0
    if not timing.exists():
        raise RuntimeError(f"training wrote no {timing} (exit {proc.returncode}); see {work / 'train.log'}")
    out = json.loads(timing.read_text())
    out.update(
        {"process_wall_s": round(wall, 1), "returncode": proc.returncode, "overrides": dict(overrides)}
    )
    return out


def _positive(name: str, value: object, whole: bool = False) -> None:
    """A ``UsageError`` unless ``value`` is a positive number (a whole one with ``whole``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (whole and not float(value).is_integer()):
        raise UsageError(f"--{name} {value!r}: must be a positive {'whole number' if whole else 'number'}")


def _read_recipes(path: str) -> dict:
    """A sweep's recipes file: a JSON object of recipe name -> train.json overrides."""
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(
            f"recipes file {path}: no such file (the shipped ones are in tools/abdoreg/sweeps/)"
        ) from None
    except ValueError as exc:
        raise UsageError(f"recipes file {path}: not valid JSON ({exc})") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise UsageError(f"recipes file {path}: expected an object of recipe name -> overrides")
    return table


def time_to_quality(curve: Sequence[Mapping], margin: float = 0.05) -> dict:
    """Identity Dice (first point), best Dice, and the first (iteration, wall time) at identity + margin."""
    points = [p for p in curve if p.get("metric") is not None]
    if not points:
        return {"identity": None, "best": None, "iteration": None, "wall_s": None}
    identity = points[0]["metric"]
    hit = next((p for p in points[1:] if p["metric"] >= identity + margin), None)
    return {
        "identity": identity,
        "best": max(p["metric"] for p in points),
        "iteration": hit["iteration"] if hit else None,
        "wall_s": hit["wall_s"] if hit else None,
    }


def tuning_split(
    datalist: str, out: str | None = None, n_train: int = 20, n_tune: int = 10, key: str = "registration_tune"
) -> str:
    """A copy of ``datalist`` whose ``training`` keeps the first ``n_train`` training scans, with the last
    ``n_tune`` held out as ``tuning`` and all their pairs (fixed earlier than moving) under ``key``.

    Hyper-parameters are chosen on these pairs (``--val_key registration_tune``), never on
    ``registration_val``, which the reports show.
    """
    src = Path(datalist)
    data = json.loads(src.read_text())
    cases = list(data.get("training", []))
    if n_train + n_tune > len(cases):
        raise ValueError(f"{datalist}: {len(cases)} training scans, {n_train} + {n_tune} asked for")
    tune = cases[-n_tune:]
    data["training"], data["tuning"] = cases[:n_train], tune
    data[key] = [
        {"fixed": f["image"], "moving": m["image"], "fixed_label": f["label"], "moving_label": m["label"]}
        for f, m in itertools.combinations(tune, 2)
    ]
    dst = Path(out) if out else src.with_name("datalist_tuning.json")
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, dst)
    return str(dst)


def sweep(
    recipes: str,
    datalist: str,
    out: str,
    jobs: int = 8,
    wall_s: float = 200.0,
    threads: int = 1,
    val_key: str = "registration_tune",
    margin: float = 0.05,
) -> str:
    """Train every recipe of the JSON file ``recipes`` (name -> overrides, the demo grid added) at once,
    ``jobs`` at a time, each stopped after ``wall_s`` seconds; write ``out/sweep.json`` with the curves."""
    table = _read_recipes(recipes)
    _positive("jobs", jobs, whole=True)
    _positive("wall_s", wall_s)
    _positive("threads", threads, whole=True)
    if not Path(datalist).is_file():
        raise UsageError(
            f"datalist {datalist}: no such file (make one with `abdoreg bench_train tuning_split`)"
        )
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    base = {**DEMO_GRID, "datalist": str(Path(datalist).resolve()), "val_key": val_key, "max_epochs": 10000}

    def one(item):
        name, overrides = item
        try:
            res = run_train({**base, "max_train_wall_s": wall_s, **overrides}, root / name, threads=threads)
        except Exception as err:  # one broken recipe must not lose the others' curves
            return name, {"error": str(err)}
        res["ttq"] = time_to_quality(res["curve"], margin)
        return name, res

    results: dict = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, res in pool.map(one, table.items()):
            results[name] = res
            ttq = res.get("ttq", {})
            print(f"{name}: {res.get('error') or ttq}", flush=True)
            (root / "sweep.json").write_text(json.dumps(results, indent=1))
    return str(root / "sweep.json")


def _split_row(name: str, res: Mapping, margin: float) -> str:
    per = res["per_iteration_s"]
    tot = res["total_s"]
    n = max(res["iterations"], 1)
    ttq = time_to_quality(res["curve"], margin)
    reached = f"{ttq['wall_s']:.0f} s ({ttq['iteration']} it)" if ttq["wall_s"] is not None else "not reached"
    cells = [
        name,
        str(res["iterations"]),
        *(f"{per[k]:.3f}" for k in ("data", "forward", "loss", "backward_optimizer", "other")),
        f"{tot['validation'] / n:.3f}",
        f"{tot['checkpoint'] / n:.3f}",
        f"{ttq['identity']:.3f}" if ttq["identity"] is not None else "-",
        f"{ttq['best']:.3f}" if ttq["best"] is not None else "-",
        reached,
    ]
    return "| " + " | ".join(cells) + " |"


def bench(
    datalist: str | None = None,
    out: str = "runs/bench_train",
    recipes: str = "crops,fast",
    minutes: float = 30.0,
    jobs: int = 2,
    margin: float = 0.05,
    val_key: str = "registration_val",
    paper: bool = False,
    paper_datalist: str | None = None,
) -> str:
    """Time to quality of each recipe side by side (at most ``minutes`` of training each, ``jobs`` at
    once on one thread each) and, with ``paper`` (or a 2 mm ``paper_datalist``), one paper-size step.

    Without ``datalist`` it makes the demo-grid data itself (30 synthetic Learn2Reg-style subjects: 20
    training scans, 45 validation pairs of 10 scans; with ``paper``, 4 subjects at 2 mm, 192x160x256).
    Prints a Markdown table (seconds per training iteration, split); returns the path of
    ``out/bench_train.json``, which holds it, every run's split and curve.
    """
    names = [r for r in (recipes.split(",") if isinstance(recipes, str) else recipes) if r]
    unknown = [r for r in names if r not in RECIPES]
    if unknown:
        raise UsageError(
            f"--recipes {','.join(unknown)}: not recipes of the benchmark (choose from {', '.join(RECIPES)})"
        )
    _positive("minutes", minutes)
    _positive("jobs", jobs, whole=True)
    for name, path in (("datalist", datalist), ("paper_datalist", paper_datalist)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"--{name} {path}: no such file")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if paper and paper_datalist is None:
        paper_datalist = prepare_data(
            root / "data_2mm", size="full", n_l2r=4, spacing=(2.0, 2.0, 2.0), shape=(192, 160, 256)
        )
    runs: dict = {}
    if names:  # the demo-grid data only when a recipe trains on it
        if datalist is None:
            datalist = prepare_data(root / "data_6mm")
        base = {
            **DEMO_GRID,
            "datalist": str(Path(datalist).resolve()),
            "val_key": val_key,
            "max_epochs": 10000,
        }
        runs = {
            n: (RECIPES[n][0], {**base, "max_train_wall_s": minutes * 60, **RECIPES[n][1]}) for n in names
        }
    if paper_datalist:
        runs["paper_size_step"] = (
            [],
            {
                "datalist": str(Path(paper_datalist).resolve()),
                **PAPER,
                "pairs_per_epoch": PAPER["batch_size"],
                "max_epochs": 1,
                "val_at_start": False,
            },
        )
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            n: pool.submit(run_train, o, root / n, configs=("train.json", *c), timeout=minutes * 60 + 900)
            for n, (c, o) in runs.items()
        }
        results = {n: f.result() for n, f in futures.items()}
    header = (
        "| recipe | iterations | data | forward | loss | backward+optimiser | other | validation | checkpoint "
        "| identity DSC | best DSC | time to identity+" + f"{margin:g}" + " |"
    )
    lines = [
        "Seconds per training iteration (validation and checkpoint spread over the iterations), one thread each:",
        "",
        header,
        "|" + "---|" * 12,
    ]
    lines += [_split_row(n, r, margin) for n, r in results.items()]
    table = "\n".join(lines)
    print(table)
    summary = {"margin": margin, "val_key": val_key, "results": results, "table": table}
    (root / "bench_train.json").write_text(json.dumps(summary, indent=1))
    return str(root / "bench_train.json")


if (
    __name__ == "__main__"
):  # a GPU machine without the CLI installed: PYTHONPATH=tools python -m abdoreg.bench_train sweep ...
    import fire

    fire.Fire({"sweep": sweep, "bench": bench, "tuning_split": tuning_split})
