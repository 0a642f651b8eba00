"""Inference benchmark: time and peak memory per full-size pair for every way the registration bundle
makes a field (paper-size network, default network, default + instance optimisation, ANTs SyN,
ConvexAdam), and how the default grows with the volume.

Each row is one ``python -m monai.bundle run`` of the registration bundle's configs in a subprocess,
as a user runs it, on synthetic Learn2Reg-like subjects (``abdoreg synth``; made once under
``--out``). The process's wall time and peak resident memory come from ``os.wait4`` (the largest
of the process and its children); the per-pair split (loading, field = network forward with its
integration and upsampling or the classical method, warping, metrics, inverse, waiting for the files) and the
peak memory at each pair come from the ``time_*`` / ``peak_rss_gb`` / ``gpu_peak_gb`` columns that the bundle's
timing handler (``--benchmark True``, switched on here) adds to ``metrics.json``. Each row's last pair is a known deformation (the fixed subject warped by a
smooth field of up to ``KNOWN_AMPLITUDE_MM``, made once): its field error (the distance from the true
displacement, mean and 95th percentile inside the fixed scan's organs) and Dice are reported apart, and the
other columns' medians leave it out. Nothing of the bundle is imported here.

One command, printed with the machine's load so a number taken on a busy machine is read as such:

    abdoreg bench_infer --out runs/bench_infer
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundles import BUNDLES, bundle_command, bundle_env
from .errors import UsageError
from .synth import PRESETS, generate

BUNDLE = BUNDLES / "registration"
KNOWN_ID = 99  # subject id of the known-deformation moving scan (AbdomenCTCT_0099_0000)
KNOWN_AMPLITUDE_MM = 14.0  # largest true displacement of the known pair (docs/benchmarks.md, Inference speed)
PHASES = ("time_load_s", "time_field_s", "time_warp_s", "time_inverse_s", "time_metrics_s", "time_write_s")
# the bundle's switch of its timing handler (scripts.pair_timer.PairTimer)
BENCHMARK = {"benchmark": True}


@dataclass
class Row:
    """One benchmarked configuration: bundle configs after ``inference.json`` and overrides."""

    name: str
    size: str = "full"
    configs: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """Its output and log name: the row name in characters a path keeps as one name ("1/4" would nest)."""
        return re.sub(r"[^A-Za-z0-9+.-]+", "_", f"{self.name}_{self.size}").strip("_")


def machine() -> dict:
    """What the numbers were taken on: CPU, cores, threads, load (other work inflates timings)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "import_monai_s": import_seconds("monai"),
    }


def import_seconds(module: str) -> float | None:
    """Wall seconds of a fresh interpreter that only imports ``module``: the floor under every row's startup
    (a bundle run cannot start before ``import monai``, which also imports torch and ignite)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return time.perf_counter() - t0 if proc.returncode == 0 else None


def make_pairs(out: Path, size: str, n_pairs: int) -> Path:
    """Synthetic L2R subjects of one size (made once) and a pairs list: subject 1 fixed, the others moving."""
    root = out / "data" / size
    dataset = root / "AbdomenCTCT" / "AbdomenCTCT_dataset.json"
    if not dataset.is_file() or len(json.loads(dataset.read_text())["training"]) < n_pairs + 1:
        generate(root, size=size, n_l2r=n_pairs + 1, n_other=0, cohorts=("l2r",), log=lambda _: None)
    items = json.loads(dataset.read_text())["training"]
    pairs = [
        {
            "fixed": items[0]["image"],
            "moving": m["image"],
            "fixed_label": items[0]["label"],
            "moving_label": m["label"],
        }
        for m in items[1 : n_pairs + 1]
    ]
    fixed = [str(dataset.parent / items[0][k]) for k in ("image", "label")]
    pairs.append(make_known_pair(root / "known", *fixed))
    path = dataset.with_name("bench_pairs.json")
    path.write_text(json.dumps({"registration_val": pairs}, indent=1))
    return path


def smooth_displacement(shape: tuple[int, ...], amplitude_vox: float, seed: int = 7) -> np.ndarray:
    """A smooth random field (3, *shape) in voxels: Gaussian noise on a 5x4x6 grid upsampled cubically,
    scaled so its largest displacement is ``amplitude_vox``."""
    from scipy.ndimage import zoom

    coarse = np.random.default_rng(seed).normal(size=(3, 5, 4, 6))
    field = np.stack([zoom(c, [s / n for s, n in zip(shape, c.shape, strict=True)], order=3) for c in coarse])
    return (field * amplitude_vox / np.linalg.norm(field, axis=0).max()).astype(np.float32)


def invert_displacement(u: np.ndarray, iterations: int = 40) -> np.ndarray:
    """``w`` with ``w(y) = -u(y + w(y))`` (fixed-point iteration), so that ``x -> x + u(x)`` and
    ``y -> y + w(y)`` are inverse maps; converges for smooth fields (|grad u| < 1)."""
    import torch
    import torch.nn.functional as F

    shape = u.shape[1:]
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    ref = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    scale = torch.tensor([2.0 / (n - 1) for n in shape]).view(3, 1, 1, 1)
    ut = torch.from_numpy(u)[None]
    w = -torch.from_numpy(u)
    for _ in range(iterations):
        grid = ((ref + w) * scale - 1.0).permute(1, 2, 3, 0).flip(-1)[None]
        w = -F.grid_sample(ut, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    return w.numpy()


def make_known_pair(folder: Path, image: str, label: str) -> dict:
    """The fixed subject warped by a known smooth field: ``moving(x + u(x)) = fixed(x)`` with ``u`` saved
    (voxels, (3, D, H, W)) beside it as ``true_disp.npy``. Made once."""
    import nibabel as nib
    from scipy.ndimage import map_coordinates

    name = f"AbdomenCTCT_{KNOWN_ID:04d}_0000.nii.gz"
    out = {
        "image": folder / "images" / name,
        "label": folder / "labels" / name,
        "disp": folder / "true_disp.npy",
    }
    pair = {
        "fixed": image,
        "moving": str(out["image"]),
        "fixed_label": label,
        "moving_label": str(out["label"]),
    }
    if all(p.is_file() for p in out.values()):
        return pair
    fixed_img, fixed_lab = nib.load(image), nib.load(label)
    spacing = np.linalg.norm(fixed_img.affine[:3, :3], axis=0)
    u = smooth_displacement(fixed_img.shape, KNOWN_AMPLITUDE_MM / float(spacing.min()))
    w = invert_displacement(u)
    coords = np.indices(fixed_img.shape, dtype=np.float32) + w  # moving(y) = fixed(y + w(y))
    moving = map_coordinates(np.asarray(fixed_img.dataobj, np.float32), coords, order=1, mode="nearest")
    moving_lab = map_coordinates(np.asarray(fixed_lab.dataobj), coords, order=0, mode="nearest")
    for key in ("image", "label"):
        out[key].parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(moving.astype(np.int16), fixed_img.affine), out["image"])
    nib.save(nib.Nifti1Image(moving_lab.astype(np.uint8), fixed_lab.affine), out["label"])
    np.save(out["disp"], u)  # last: its presence marks the pair as complete
    return pair


def field_error(out_dir: Path, pair: dict) -> dict:
    """The known pair's field error in mm inside the fixed scan's organs: mean and 95th percentile of
    |estimated - true displacement|, and the true displacement's own mean there (the identity's error)."""
    import nibabel as nib

    truth = np.load(Path(pair["moving"]).parent.parent / "true_disp.npy")
    (path,) = sorted((out_dir / "submission").glob(f"*_{KNOWN_ID:04d}_0000.nii*"))
    estimate = np.moveaxis(np.asarray(nib.load(path).dataobj, np.float32), -1, 0)
    fixed = nib.load(pair["fixed_label"])
    spacing = np.linalg.norm(fixed.affine[:3, :3], axis=0).reshape(3, 1, 1, 1)
    organs = np.asarray(fixed.dataobj) > 0
    error = np.linalg.norm((estimate - truth) * spacing, axis=0)[organs]
    return {
        "field_error_mm": float(error.mean()),
        "field_error_p95_mm": float(np.percentile(error, 95)),
        "field_error_initial_mm": float(np.linalg.norm(truth * spacing, axis=0)[organs].mean()),
    }


def run_row(row: Row, pairs_file: Path, out: Path, threads: int | None, extra: dict) -> dict:
    """Run one row's bundle command; wall time, peak memory and the per-pair rows of its timing handler."""
    out_dir = out / "rows" / row.folder
    overrides = {
        "pairs_file": str(pairs_file),
        "pairs_key": "registration_val",
        "output_dir": str(out_dir),
        **BENCHMARK,
        **extra,
        **row.overrides,
    }
    cmd = bundle_command(BUNDLE, ["inference.json", *row.configs], overrides)
    env = bundle_env(BUNDLE)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = out / "logs" / f"{row.folder}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=BUNDLE, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"benchmark row {row.name} ({row.size}) failed, see {log}:\n{tail}")
    # ru_maxrss: KiB on Linux (bytes on macOS); for wait4 the max over the process and its waited children
    peak = usage.ru_maxrss / 1e9 if sys.platform == "darwin" else usage.ru_maxrss * 1024 / 1e9
    cases = json.loads((out_dir / "metrics.json").read_text())["cases"]
    known = json.loads(pairs_file.read_text())["registration_val"][-1]
    known_case = next(c for c in cases if Path(c["moving"]).name == Path(known["moving"]).name)
    others = [c for c in cases if c is not known_case]
    result = summarise(row, wall, usage.ru_utime + usage.ru_stime, peak, others)
    result["pairs"] = len(cases)
    result["startup_s"] = wall - sum(c.get("time_pair_s", 0.0) for c in cases)
    result["known"] = field_error(out_dir, known) | {
        "dice": known_case.get("dice"),
        "dice_initial": known_case.get("dice_initial"),
        "time_pair_s": known_case.get("time_pair_s"),
    }
    return result


def _median(cases: list[dict], key: str) -> float | None:
    values = [c[key] for c in cases if isinstance(c.get(key), (int, float))]
    return statistics.median(values) if values else None


def summarise(row: Row, wall: float, cpu: float, peak_gb: float, cases: list[dict]) -> dict:
    """Per-pair medians of the bundle's timings (the first pair pays one-off set-up: reported apart)."""
    steady = cases[1:] if len(cases) > 1 else cases
    per_pair = {k: _median(steady, k) for k in (*PHASES, "time_pair_s", "cpu_pair_s")}
    return {
        "name": row.name,
        "size": row.size,
        "grid": list(PRESETS[row.size].shape),
        "pairs": len(cases),
        "process_wall_s": wall,
        "process_cpu_s": cpu,
        "startup_s": wall - sum(c.get("time_pair_s", 0.0) for c in cases),
        "first_pair_s": cases[0].get("time_pair_s"),
        "per_pair": per_pair,
        "peak_rss_gb": peak_gb,
        "peak_rss_at_pairs_gb": max(c.get("peak_rss_gb", 0.0) for c in cases),
        "gpu_peak_gb": max((c["gpu_peak_gb"] for c in cases if "gpu_peak_gb" in c), default=None),
        "dice": _median(cases, "dice"),
        "dice_initial": _median(cases, "dice_initial"),
        "overrides": row.overrides,
        "configs": row.configs,
    }


def network(**settings) -> dict:
    """Overrides of inference.json that build an untrained network with ``settings`` instead of its defaults
    (without a checkpoint inference.json builds ``GradientRegNet`` with the arguments of ``network_def``: the
    recommended network, unless overridden)."""
    return {f"network_def#{k}": v for k, v in settings.items()}


# the paper's network: channel multiplier 8, the field at full resolution, gradient heads
PAPER = {"channel_multiplier": 8, "downsample": 1, "head_type": "gradient"}
METHODS = ("reference", "default", "syn", "convexadam")
# the second instance-optimisation row of --instance_opt: one half-resolution level, the schedule before the
# coarse-to-fine default (60 steps at 1/4, then 20 at 1/2)
SINGLE_LEVEL = {"instance_optimiser#grid_spacing": 2, "instance_optimiser#iterations": 80}


def check_arguments(
    methods: list[str], sizes: list[str], pairs: object, threads: object, ckpt_path: str | None
) -> None:
    """Every argument checked before any data is made or any row runs (a ``UsageError`` saying what to pass)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"--methods {','.join(unknown) or '(none)'}: choose from {', '.join(METHODS)}")
    bad_sizes = [s for s in sizes if s not in PRESETS]
    if bad_sizes:
        raise UsageError(f"--sizes/--size {','.join(bad_sizes)}: choose from {', '.join(PRESETS)}")
    if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1:
        raise UsageError(f"--pairs {pairs!r}: the number of pairs per row, a whole number of at least 1")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise UsageError(f"--threads {threads!r}: a whole number of at least 1 (or leave it out)")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise UsageError(f"--ckpt_path {ckpt_path}: no such file")


def rows_for(
    methods: list[str], sizes: list[str], instance_opt: bool, main: str = "full", trained: bool = False
) -> list[Row]:
    """The benchmark's rows: every method at the ``main`` size (with ``instance_opt`` instance optimisation with
    the bundle's coarse-to-fine schedule and with one half-resolution level, from the network when ``trained``
    else from the identity), then the default (and reference) at the other sizes."""
    baseline = ["evaluate.json"]  # the classical methods are mixins of evaluate.json
    catalogue = {
        "reference": Row("reference", main, overrides=network(**PAPER)),
        "default": Row("default", main),
        "syn": Row("ants_syn", main, configs=[*baseline, "syn_baseline.json"]),
        "convexadam": Row("convexadam", main, configs=[*baseline, "convexadam_baseline.json"]),
    }
    rows = [catalogue[m] for m in methods]
    if instance_opt:
        at = methods.index("default") + 1 if "default" in methods else 0
        start = "default" if trained else "identity"  # untrained weights make no start worth refining
        io = {"instance_opt": True, "instance_opt_start": "network" if trained else "identity"}
        rows[at:at] = [
            Row(f"{start} + instance_opt (60 it at 1/4, 20 at 1/2: the default)", main, overrides=io),
            Row(f"{start} + instance_opt (80 it at 1/2)", main, overrides={**io, **SINGLE_LEVEL}),
        ]
    for size in sizes:
        if size == main:
            continue
        for m in ("default", "reference"):
            if m in methods:
                base = catalogue[m]
                rows.append(Row(base.name, size, list(base.configs), dict(base.overrides)))
    return rows


def table(results: list[dict], info: dict, main: str = "full") -> str:
    """Markdown table: per-pair split, peak memory, Dice, and ratios (at the ``main`` size) to the
    reference and to ANTs SyN: how many times faster per pair."""
    full = {r["name"]: r for r in results if r["size"] == main}
    ref = full.get("reference", {}).get("per_pair", {}).get("time_pair_s")
    syn = full.get("ants_syn", {}).get("per_pair", {}).get("time_pair_s")
    head = (
        "| method | grid | s / pair | CPU s / pair | load | field | warp | inverse | metrics | write | first pair | startup "
        "| peak RSS GB | GPU GB | Dice (initial) | known: Dice | known: field error mm (p95) "
        "| x faster than reference | x faster than SyN |"
    )
    lines = [head, "|" + "---|" * 19]

    def f(v, fmt="{:.1f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    for r in results:
        p = r["per_pair"]
        t = p.get("time_pair_s")
        dice = f"{f(r['dice'], '{:.3f}')} ({f(r['dice_initial'], '{:.3f}')})"
        known = r.get("known", {})
        error = f"{f(known.get('field_error_mm'), '{:.2f}')} ({f(known.get('field_error_p95_mm'), '{:.2f}')})"
        lines.append(
            f"| {r['name']} | {'x'.join(map(str, r['grid']))} | {f(t)} | {f(p.get('cpu_pair_s'))} | "
            + " | ".join(f(p.get(k)) for k in PHASES)
            + f" | {f(r['first_pair_s'])} | {f(r['startup_s'])} | {f(r['peak_rss_gb'], '{:.2f}')} | "
            f"{f(r['gpu_peak_gb'], '{:.2f}')} | {dice} | {f(known.get('dice'), '{:.3f}')} | {error} | "
            f"{f(ref / t if ref and t and r['size'] == main else None, '{:.1f}')} | "
            f"{f(syn / t if syn and t and r['size'] == main else None, '{:.1f}')} |"
        )
    load = info["load_1_5_15"]
    lines.append("")
    lines.append(
        f"{info['cpu']}, {info['cores']} cores, OMP_NUM_THREADS={info['omp_num_threads']}, "
        f"load average before {load} / after {info.get('load_after')}; {info['date']}. "
        "s / pair: median over the pairs after the first (load + field + warp + metrics + inverse + write; the "
        "bundle's write_threads background threads write each file while the next steps run, 'write' is the time "
        "left waiting for them after the last step); CPU s / pair: "
        "CPU seconds of all the process's threads for a pair (what the pair costs on a loaded machine); "
        "startup: imports, config and network set-up once per process"
        + (f" (of which `import monai` alone: {v:.1f} s)" if (v := info.get("import_monai_s")) else "")
        + "; peak RSS: whole process. "
        "known: the pair whose moving scan is the fixed one warped by a known smooth field (up to "
        f"{KNOWN_AMPLITUDE_MM:g} mm; left out of the other columns): Dice, and the mean (95th percentile) distance "
        "in mm between the estimated and the true displacement inside the fixed scan's organs"
        + (f" (identity: {initial:.2f} mm)." if (initial := _initial_error(results)) is not None else ".")
    )
    return "\n".join(lines) + "\n"


def _initial_error(results: list[dict]) -> float | None:
    return next((r["known"]["field_error_initial_mm"] for r in results if "known" in r), None)


def bench_infer(
    out: str = "runs/bench_infer",
    methods: str | tuple[str, ...] = "reference,default,syn,convexadam",
    sizes: str | tuple[str, ...] = "demo,small,full",
    pairs: int = 2,
    threads: int | None = None,
    instance_opt: bool = False,
    ckpt_path: str | None = None,
    device: str | None = None,
    size: str = "full",
) -> None:
    """Run the inference benchmark; print the table and write ``<out>/bench_infer.json`` and ``.md``.

    methods: any of reference (paper size: multiplier 8, full-resolution field), default
    (the bundle's default network, the recommended one), syn (ANTs SyN), convexadam. sizes: synthetic grids for
    the scaling rows (tiny 48x40x64, demo 72x60x96, small 96x80x128, full 192x160x256). pairs: pairs per row.
    threads: OMP_NUM_THREADS of the bundle processes (default: inherited). instance_opt: add two rows of
    test-time instance optimisation (the bundle's coarse-to-fine schedule: 60 steps on a quarter-resolution grid
    then 20 on a half-resolution one; and 80 steps on a half-resolution grid), from the network with
    ``ckpt_path``, else from the identity. ckpt_path: trained weights of the default network (else its
    initial weights: the time is the same, the Dice is not). device: the bundle's ``device`` (e.g.
    ``cuda``; default: cuda when available). size: the grid of the method rows (full: 192x160x256).
    """
    out_dir = Path(out).resolve()
    method_list = methods.split(",") if isinstance(methods, str) else list(methods)
    size_list = sizes.split(",") if isinstance(sizes, str) else list(sizes)
    check_arguments(method_list, size_list + [size], pairs, threads, ckpt_path)
    info = machine()
    if threads:
        info["omp_num_threads"] = str(threads)
    extra: dict = {"require_checkpoint": False}
    if device:
        extra["device"] = f"$torch.device('{device}')"
    results = []
    for row in rows_for(method_list, size_list, instance_opt, size, trained=bool(ckpt_path)):
        row_extra = dict(extra)
        if ckpt_path and row.name.startswith("default"):
            row_extra.update({"ckpt_path": str(Path(ckpt_path).resolve()), "require_checkpoint": True})
        pairs_file = make_pairs(out_dir, row.size, pairs)
        print(f"[bench_infer] {row.name} at {row.size} ...", flush=True)
        results.append(run_row(row, pairs_file, out_dir, threads, row_extra))
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = table(results, info, size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_infer.md").write_text(text)
    data = {"machine": info, "rows": results}
    (out_dir / "bench_infer.json").write_text(json.dumps(data, indent=2))
    print(text)
    print(f"[bench_infer] written {out_dir / 'bench_infer.json'} and {out_dir / 'bench_infer.md'}")
