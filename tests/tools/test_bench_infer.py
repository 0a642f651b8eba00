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
    assert (
        row["name"] == "default" and row["grid"] == [48, 40, 64] and row["pairs"] == 3
    )  # two and the known pair
    # every phase of a pair comes from the bundle's writer; the process figures from os.wait4
    assert all(row["per_pair"][k] is not None and row["per_pair"][k] >= 0 for k in PHASES)
    assert row["per_pair"]["time_pair_s"] >= row["per_pair"]["time_field_s"] > 0
    assert row["process_wall_s"] > row["per_pair"]["time_pair_s"] and 0.2 < row["peak_rss_gb"] < 24
    assert row["dice"] is not None and data["machine"]["load_1_5_15"]
    # the startup floor is measured in the same run, and the whole process can only be slower than it
    assert 0 < data["machine"]["import_monai_s"] < row["process_wall_s"]
    assert row["known"]["field_error_mm"] >= 0 and row["known"]["field_error_initial_mm"] > 1.0
    text = (tmp_path / "bench_infer.md").read_text()
    assert "| default | 48x40x64 |" in text and "`import monai` alone:" in text


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


def test_known_pair_moves_the_fixed_scan_by_the_saved_field(tmp_path):
    """``moving(x + u(x)) = fixed(x)`` for the saved ``u``; the field error of the true field is 0 and
    that of the identity is the field's own size (so a sign or axis error in the reader would show)."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import map_coordinates

    from abdoreg.bench_infer import KNOWN_ID, field_error, make_known_pair

    shape, affine = (40, 32, 48), np.diag([4.0, 4.0, 4.0, 1.0])
    grid = np.indices(shape)
    blob = ((grid[0] - 20) ** 2 / 100 + (grid[1] - 16) ** 2 / 64 + (grid[2] - 22) ** 2 / 150) < 1
    image = np.where(blob, 60.0, -1000.0) + 20 * np.sin(grid[2] / 3.0)
    for name, data in (("fixed.nii.gz", image.astype(np.int16)), ("label.nii.gz", blob.astype(np.uint8))):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / name)
    pair = make_known_pair(tmp_path / "known", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "label.nii.gz"))
    u = np.load(tmp_path / "known" / "true_disp.npy")
    assert np.linalg.norm(u, axis=0).max() * 4.0 > 10.0  # a displacement of many mm, not a no-op
    moving_label = np.asarray(nib.load(pair["moving_label"]).dataobj)
    back = map_coordinates(moving_label, grid + u, order=0, mode="nearest")
    overlap = 2 * (back * blob).sum() / (back.sum() + blob.sum())
    assert overlap > 0.97 and (moving_label != blob).sum() > 0.05 * blob.sum()

    submission = tmp_path / "row" / "submission"
    submission.mkdir(parents=True)
    for name, field in (("truth", u), ("identity", np.zeros_like(u))):
        path = submission / f"disp_0001_{KNOWN_ID:04d}_0000.nii.gz"
        nib.save(nib.Nifti1Image(np.moveaxis(field, 0, -1), affine), path)
        error = field_error(tmp_path / "row", pair)
        if name == "truth":
            assert error["field_error_mm"] < 1e-4
        else:
            assert abs(error["field_error_mm"] - error["field_error_initial_mm"]) < 1e-4
            assert error["field_error_initial_mm"] > 3.0


def test_row_folder_is_one_path_name():
    # "60 it at 1/4" once made rows/identity + instance_opt (60 it at 1/4, ... nest three folders deep
    from abdoreg.bench_infer import Row

    name = Row("identity + instance_opt (60 it at 1/4, 20 at 1/2: the default)").folder
    assert "/" not in name and " " not in name and name.endswith("_full")
    assert name.startswith("identity_+_instance_opt")
