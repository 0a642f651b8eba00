"""The CLI's own pipeline steps: making synthetic data and reporting the ablation.

Everything else a pipeline does is a bundle config; the report only reads the metric files
(``metrics.json``) that the registration bundle's evaluation writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .files import atomic_path, write_text
from .synth import generate

COLUMNS = [
    ("dice", "DSC", "{:.3f}"),
    ("dice30", "DSC30", "{:.3f}"),
    ("hd95_mm", "HD95 (mm)", "{:.1f}"),
    ("hd95_mm_30", "HD95_30 (mm)", "{:.1f}"),
    ("sdlogj", "SDlogJ", "{:.3f}"),
    ("sdlogj_honest", "SDlogJ (det>0)", "{:.3f}"),
    ("fold_fraction", "folding", "{:.2%}"),
    ("runtime_s", "s / pair", "{:.1f}"),
]


def synth(log: Callable[[str], None], out: str, **kwargs) -> None:
    generate(out, log=log, **kwargs)


def report(log: Callable[[str], None], methods: dict[str, str], out_dir: str, title: str = "Ablation") -> str:
    """Markdown table and PNG bar chart of each method's ``metrics.json`` summary; returns the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, path in methods.items():
        rows[name] = json.loads(Path(path).read_text())["summary"]
    header = "| method | pairs | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [f"## {title}", "", header, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, summary in rows.items():
        cells = []
        for key, _, fmt in COLUMNS:
            value = summary.get(key)
            cells.append(fmt.format(value) if isinstance(value, (int, float)) else "-")
        lines.append(f"| {name} | {summary.get('num_pairs', '-')} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    write_text(out / "report.md", table)
    write_text(out / "report.json", json.dumps(rows, indent=2))
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
