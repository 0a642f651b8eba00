"""Per-organ Dice report with organ names, from the CSV that MONAI's ``MetricsSaver`` writes."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from .atomic import atomic_write_text

__all__ = ["organ_names", "write_organ_dice"]


def organ_names(meta_file: str | os.PathLike) -> list[str]:
    """Organ names 1..13 from ``metadata.json``'s ``outputs.pred.channel_def`` (the one place of the label order)."""
    meta = json.loads(Path(meta_file).read_text())
    channel_def = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
    return [channel_def[k] for k in sorted(channel_def, key=int) if int(k) > 0]


def write_organ_dice(
    raw_csv: str | os.PathLike, meta_file: str | os.PathLike, out_json: str | os.PathLike
) -> dict:
    """Name the ``class0..`` columns of ``<metric>_raw.csv`` (background excluded) and write per-organ means as JSON."""
    names = organ_names(meta_file)
    with open(raw_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    per_case = {
        row["filename"]: {names[i]: float(row[f"class{i}"]) for i in range(len(names)) if f"class{i}" in row}
        for row in rows
    }

    def _mean(values: list[float]) -> float:
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    per_organ = {n: _mean([case[n] for case in per_case.values() if n in case]) for n in names}
    report = {"mean_dice": _mean(list(per_organ.values())), "per_organ": per_organ, "per_case": per_case}
    atomic_write_text(out_json, json.dumps(report, indent=2) + "\n")
    return report
