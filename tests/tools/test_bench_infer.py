"""The inference benchmark reads what the bundle writes: one real row at the tiny grid (untrained
default network, two pairs), and the table's ratios. It asserts no time limit (speed is measured by
the benchmark itself, never by tests)."""

from __future__ import annotations

import json

from abdoreg.bench_infer import PHASES, bench_infer, table


def test_bench_infer_tiny_default_row(tmp_path):
    bench_infer(out=str(tmp_path), methods="default", sizes="tiny", size="tiny", pairs=2, threads=1)
    data = json.loads((tmp_path / "bench_infer.json").read_text())
    (row,) = data["rows"]
    assert row["name"] == "default" and row["grid"] == [48, 40, 64] and row["pairs"] == 2
    # every phase of a pair comes from the bundle's writer; the process figures from os.wait4
    assert all(row["per_pair"][k] is not None and row["per_pair"][k] >= 0 for k in PHASES)
    assert row["per_pair"]["time_pair_s"] >= row["per_pair"]["time_field_s"] > 0
    assert row["process_wall_s"] > row["per_pair"]["time_pair_s"] and 0.2 < row["peak_rss_gb"] < 24
    assert row["dice"] is not None and data["machine"]["load_1_5_15"]
    assert "| default | 48x40x64 |" in (tmp_path / "bench_infer.md").read_text()


def test_table_ratios_against_reference_and_syn():
    def row(name, seconds, size="full"):
        return {
            "name": name, "size": size, "grid": [192, 160, 256], "per_pair": {"time_pair_s": seconds},
            "first_pair_s": seconds, "startup_s": 5.0, "peak_rss_gb": 1.0, "gpu_peak_gb": None,
            "dice": 0.5, "dice_initial": 0.3,
        }  # fmt: skip

    info = {"cpu": "cpu", "cores": 2, "omp_num_threads": "1", "load_1_5_15": [0, 0, 0], "date": "now"}
    text = table([row("reference", 60.0), row("default", 6.0), row("ants_syn", 75.0)], info)
    default_line = next(line for line in text.splitlines() if line.startswith("| default |"))
    assert default_line.rstrip(" |").endswith("| 10.0 | 12.5")  # 60 / 6 and 75 / 6
