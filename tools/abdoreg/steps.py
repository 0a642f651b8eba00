"""The CLI's own pipeline steps: making synthetic data and reporting the ablation.

Everything else a pipeline does is a bundle config; the report only reads the metric files
(``metrics.json``) that the registration bundle's evaluation writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_write, atomic_write_text
from .synth import ALL_COHORTS, generate

COLUMNS = [
    ("dice", "DSC", "{:.3f}"),
    ("dice_ci", "DSC 95% CI", "{}"),
    ("dice30", "DSC30", "{:.3f}"),
    ("hd95_mm", "HD95 (mm)", "{:.1f}"),
    ("hd95_mm_30", "HD95_30 (mm)", "{:.1f}"),
    ("sdlogj", "SDlogJ", "{:.3f}"),
    ("sdlogj_honest", "SDlogJ (det>0)", "{:.3f}"),
    ("fold_fraction", "folding", "{:.2%}"),
    ("runtime_s", "s / pair", "{:.2f}"),
]
BOOTSTRAP = 10_000  # resamples of the pairs for each confidence interval
ALPHA = 0.05


def synth(
    log: Callable[[str], None],
    out: str,
    size: str = "tiny",
    n_l2r: int = 9,
    n_other: int = 3,
    seed: int = 0,
    cohorts: str = "",
    anatomy: str = "",
    intensity: str = "ct",
) -> None:
    """Synthetic cohorts (pipeline variables arrive as text: the counts are read as integers; ``cohorts`` a
    comma-separated list, "" for the default set; ``anatomy`` "" for the phantom, else a folder of real maps)."""
    names = tuple(c for c in str(cohorts).split(",") if c) if cohorts else ALL_COHORTS
    generate(
        out,
        size=size,
        n_l2r=int(n_l2r),
        n_other=int(n_other),
        cohorts=names,
        seed=int(seed),
        log=log,
        anatomy=anatomy or None,
        intensity=intensity,
    )


def dice_by_pair(metrics: dict) -> dict[tuple[str, str], float]:
    """Per-pair DSC of a ``metrics.json``, keyed by the (fixed, moving) file names (NaN where undefined)."""
    out = {}
    for case in metrics.get("cases", []):
        value = case.get("dice")
        key = (Path(str(case["fixed"])).name, Path(str(case["moving"])).name)
        out[key] = float(value) if isinstance(value, (int, float)) else math.nan
    return out


def bootstrap_ci(values: Sequence[float], n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over pairs (pairs resampled with replacement)."""
    x = np.asarray([v for v in values if np.isfinite(v)], np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    means = x[np.random.default_rng(seed).integers(0, len(x), (n, len(x)))].mean(axis=1)
    return float(np.quantile(means, ALPHA / 2)), float(np.quantile(means, 1 - ALPHA / 2))


def paired_test(a: dict[tuple[str, str], float], b: dict[tuple[str, str], float]) -> tuple[float, float, int]:
    """Mean DSC difference a - b over the pairs both scored, and the two-sided Wilcoxon signed-rank p-value."""
    from scipy.stats import wilcoxon

    keys = [k for k in a if k in b and np.isfinite(a[k]) and np.isfinite(b[k])]
    diff = np.asarray([a[k] - b[k] for k in keys], np.float64)
    if len(diff) == 0:
        return math.nan, math.nan, 0
    if not np.any(diff != 0):
        return 0.0, 1.0, len(diff)
    return float(diff.mean()), float(wilcoxon(diff).pvalue), len(diff)


def _cell(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def report(
    log: Callable[[str], None],
    methods: dict[str, str],
    out_dir: str,
    title: str = "Ablation",
    compare_to: Sequence[str] = ("identity", "ANTs SyN"),
    steps: Mapping[str, str] | None = None,
) -> str:
    """Markdown table and PNG bar chart of each method's ``metrics.json``; returns the markdown.

    Per method: the summary metrics, a 95% bootstrap interval of the mean DSC over pairs, and for each
    method named in ``compare_to`` the mean paired DSC difference with its Wilcoxon signed-rank p-value
    over the pairs both methods scored. ``steps`` (row -> row) records which rows are ablation steps from which
    (``step_from`` in ``report.json``, what ``report_repeats`` measures).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, per_pair = {}, {}
    for name, path in methods.items():
        data = json.loads(Path(path).read_text())
        rows[name], per_pair[name] = dict(data["summary"]), dice_by_pair(data)
        if steps and steps.get(name):  # an ablation step from that row (report_repeats measures it)
            rows[name]["step_from"] = steps[name]
        rows[name]["metrics_file"] = str(Path(path).resolve())  # for per-pair comparisons across runs
        lo, hi = bootstrap_ci(list(per_pair[name].values()))
        rows[name]["dice_ci_low"], rows[name]["dice_ci_high"] = lo, hi
    refs = [r for r in compare_to if r in rows]
    header = "| method | pairs | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [f"## {title}", "", header, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, summary in rows.items():
        cells = []
        for key, _, fmt in COLUMNS:
            if key == "dice_ci":
                lo, hi = summary["dice_ci_low"], summary["dice_ci_high"]
                cells.append(f"{lo:.3f}-{hi:.3f}" if np.isfinite(lo) else "-")
            else:
                cells.append(_cell(summary.get(key), fmt))
        lines.append(f"| {name} | {summary.get('num_pairs', '-')} | " + " | ".join(cells) + " |")
    if refs:
        lines += [
            "",
            "Paired differences in DSC over the same pairs (two-sided Wilcoxon signed-rank test; "
            f"**bold**: p < {ALPHA}, uncorrected; the pairs share scans, so they are not independent "
            "and the p-values are optimistic):",
            "",
            "| method | " + " | ".join(f"ΔDSC vs {r} | p" for r in refs) + " |",
            "|---|" + "---|---|" * len(refs),
        ]
        for name in rows:
            cells = []
            for ref in refs:
                if name == ref:
                    cells += ["-", "-"]
                    continue
                delta, p, n = paired_test(per_pair[name], per_pair[ref])
                rows[name][f"vs {ref}"] = {"delta_dice": delta, "p_wilcoxon": p, "pairs": n}
                mark = "**" if np.isfinite(p) and p < ALPHA else ""
                cells += [f"{mark}{delta:+.3f}{mark}", f"{mark}{p:.2g}{mark}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", table)
    atomic_write_text(out / "report.json", json.dumps(rows, indent=2))
    _chart(rows, out / "report.png", title)
    log(table)
    print(table)
    return table


def _chart(rows: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(
        axes,
        [
            ("dice", "DSC (higher is better)"),
            ("hd95_mm", "HD95 mm (lower is better)"),
            ("sdlogj", "SDlogJ (lower is better)"),
        ],
        strict=True,
    ):
        values = [rows[n].get(key) or 0.0 for n in names]
        ax.barh(names, values, color=["#999999" if n == "identity" else "#3b7dd8" for n in names])
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def step_base(earlier: Sequence[str], row: str, step_from: str | None = None) -> str | None:
    """The row an ablation step is measured against: the row it names as ``step_from`` (the pipeline graph's
    ``step_of``), the row before for ``+ ...``, row ``X`` for ``X + ...`` (the longest such earlier row), else
    None (not a step)."""
    if step_from:
        return step_from if step_from in earlier else None
    if row.startswith("+ "):
        return earlier[-1]
    named = [r for r in earlier if row.startswith(r + " + ")]
    return max(named, key=len) if named else None


def report_repeats(works: str | Sequence[str], out_dir: str | None = None) -> str:
    """One table over repeated runs of a pipeline (``--works runs/a,runs/b,...``, e.g. the same pipeline with
    ``--reg_seed 0``, ``1``, ``2``), read from their ``report/report.json``: each row's DSC in every run with
    the mean, sample standard deviation and range; then each ablation step (a row against the row it records as
    ``step_from``, a row named ``+ ...`` against the row before it, ``X + ...`` against row ``X``) with its DSC gain in every run and the Wilcoxon p-value over that run's pairs. Returns the markdown.
    """
    paths = [Path(w) for w in (works.split(",") if isinstance(works, str) else works)]
    reports = []
    for w in paths:
        path = w / "report" / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no report (run the pipeline's report stage in {w} first)")
        reports.append(json.loads(path.read_text()))
    rows = [r for r in reports[0] if all(r in rep for rep in reports)]
    runs = " | ".join(w.name for w in paths)
    lines = [f"| method | {runs} | mean | sd | range |", "|---|" + "---|" * (len(paths) + 3)]
    for row in rows:
        values = np.asarray([rep[row]["dice"] for rep in reports], np.float64)
        sd = values.std(ddof=1) if len(values) > 1 else 0.0
        cells = " | ".join(f"{v:.3f}" for v in values)
        lines.append(
            f"| {row} | {cells} | {values.mean():.3f} | {sd:.3f} | {values.min():.3f}-{values.max():.3f} |"
        )
    bases = [
        (step_base(rows[:i], row, reports[0][row].get("step_from")), row) for i, row in enumerate(rows) if i
    ]
    steps = [(before, after) for before, after in bases if before]
    if steps:
        lines += ["", f"| step (ΔDSC, Wilcoxon p) | {runs} |", "|---|" + "---|" * len(paths)]
    for before, after in steps:
        cells = []
        for w, rep in zip(paths, reports, strict=True):
            files = [rep[r].get("metrics_file") for r in (after, before)]
            if not all(f and Path(f).is_file() for f in files):
                raise FileNotFoundError(
                    f"{w / 'report' / 'report.json'}: rows {after!r} / {before!r} do not name readable metrics "
                    "files (re-run the pipeline's report stage: --only report)"
                )
            a, b = (dice_by_pair(json.loads(Path(f).read_text())) for f in files)
            delta, p, _ = paired_test(a, b)
            mark = "**" if np.isfinite(p) and p < ALPHA else ""
            cells.append(f"{mark}{delta:+.3f} (p {p:.2g}){mark}")
        lines.append(f"| {before} -> {after} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    if out_dir:
        atomic_write_text(Path(out_dir) / "repeats.md", table)
    print(table)
    return table
