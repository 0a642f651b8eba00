"""The metrics files of a registration run: one JSON per pair, and ``metrics.csv``/``metrics.json`` over all pairs
(the tables ``abdoreg``'s report and benchmark read). ``scripts.metrics`` computes the numbers; this writes them,
atomically (temp file + ``os.replace``), as strict JSON (no NaN tokens)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.atomic import atomic_write_text
from scripts.metrics import aggregate

__all__ = ["write_json", "write_csv", "write_results"]


def _json_safe(obj):
    """JSON without NaN/inf tokens (strict parsers reject them): they become null / "inf"."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: Path, data: object) -> None:
    """Atomic JSON write (temp file + os.replace)."""
    atomic_write_text(Path(path), json.dumps(_json_safe(data), indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Atomic per-pair CSV (union of columns in first-seen order; NaN written as 'nan')."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in columns})
    atomic_write_text(Path(path), buf.getvalue())


def write_results(
    output_dir: Path, rows: Sequence[Mapping[str, object]], name: str = "metrics", extra: dict | None = None
) -> dict:
    """Write ``<name>.csv`` (per pair) and ``<name>.json`` (``summary`` and ``aggregates`` of
    ``scripts.metrics.aggregate``, ``extra``, and the per-pair ``cases``); return the JSON data."""
    output_dir = Path(output_dir)
    write_csv(output_dir / f"{name}.csv", rows)
    data = {**aggregate(rows), **(extra or {}), "cases": list(rows)}
    write_json(output_dir / f"{name}.json", data)
    return data
