"""The demo report: bootstrap confidence interval of the DSC and paired significance tests over the same pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from abdoreg import steps


def _metrics(path, dices, runtime=None):
    cases = [
        {
            "fixed": f"/a/AbdomenCTCT_{i:04d}_0000.nii.gz",
            "moving": f"/b/AbdomenCTCT_{i + 1:04d}_0000.nii.gz",
            "dice": d,
        }
        for i, d in enumerate(dices)
    ]
    summary = {"num_pairs": len(dices), "dice": float(np.nanmean(dices)), "fold_fraction": 0.0}
    if runtime is not None:
        summary["runtime_s"] = runtime
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": summary, "cases": cases}))
    return str(path)


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_pairs():
    rng = np.random.default_rng(3)
    few, many = rng.normal(0.3, 0.05, 10), rng.normal(0.3, 0.05, 200)
    lo, hi = steps.bootstrap_ci(few)
    assert lo < few.mean() < hi
    lo2, hi2 = steps.bootstrap_ci(many)
    assert hi2 - lo2 < 0.6 * (hi - lo)
    assert all(np.isnan(steps.bootstrap_ci([0.3, float("nan")])))  # one scored pair: no interval


def test_report_marks_only_real_differences_as_significant(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.35, 45)
    methods = {
        "identity": _metrics(tmp_path / "id" / "metrics.json", base, 0.0),
        # consistently better on every pair: significant
        "better": _metrics(tmp_path / "b" / "metrics.json", base + rng.uniform(0.02, 0.06, 45), 0.5),
        # the same pairs with noise around zero: not significant
        "noise": _metrics(tmp_path / "n" / "metrics.json", base + rng.normal(0, 0.01, 45), 0.5),
        "ANTs SyN": _metrics(tmp_path / "s" / "metrics.json", base + 0.04, 2.5),
    }
    table = steps.report(
        lambda _: None, methods, str(tmp_path / "report"), compare_to=["identity", "ANTs SyN"]
    )
    rows = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rows["better"]["vs identity"]["p_wilcoxon"] < 0.001
    assert rows["better"]["vs identity"]["delta_dice"] == pytest.approx(
        rows["better"]["dice"] - rows["identity"]["dice"]
    )
    assert rows["noise"]["vs identity"]["p_wilcoxon"] > 0.05
    assert rows["identity"]["vs ANTs SyN"]["delta_dice"] == pytest.approx(-0.04)
    assert rows["better"]["dice_ci_low"] < rows["better"]["dice"] < rows["better"]["dice_ci_high"]
    assert "Wilcoxon signed-rank" in table and "DSC 95% CI" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("| better |") and "**" in ln)
    assert line  # the significant difference is marked in the markdown table


def test_paired_test_uses_only_pairs_both_methods_scored():
    a = {("f1", "m1"): 0.5, ("f2", "m2"): 0.6, ("f3", "m3"): float("nan")}
    b = {("f1", "m1"): 0.4, ("f3", "m3"): 0.2, ("f4", "m4"): 0.9}
    delta, _, n = steps.paired_test(a, b)
    assert n == 1 and delta == pytest.approx(0.1)


def test_report_over_repeated_runs_gives_spread_and_per_run_step_gains(tmp_path):
    """Three runs of the same ablation: the table shows each row's DSC per run with mean, sd and range, and each
    "+ ..." step's gain in every run, significant only where the step helps on the run's pairs."""
    rng = np.random.default_rng(1)
    works, baselines = [], []
    for run in range(3):
        work = tmp_path / f"seed{run}"
        base = rng.uniform(0.2, 0.35, 45)
        baselines.append(base.mean())
        methods = {
            "baseline": _metrics(work / "evaluation" / "baseline" / "metrics.json", base),
            "+ helps": _metrics(
                work / "evaluation" / "helps" / "metrics.json", base + rng.uniform(0.02, 0.06, 45)
            ),
            "ANTs SyN": _metrics(work / "evaluation" / "syn" / "metrics.json", base + 0.04),
            "baseline + labels": _metrics(work / "evaluation" / "labels" / "metrics.json", base - 0.05),
            "pseudo_input": _metrics(work / "evaluation" / "pseudo_input" / "metrics.json", base + 0.03),
        }
        steps.report(
            lambda _: None, methods, str(work / "report"), compare_to=[], steps={"pseudo_input": "baseline"}
        )
        works.append(str(work))
    table = steps.report_repeats(",".join(works), out_dir=str(tmp_path / "out"))
    assert (tmp_path / "out" / "repeats.md").read_text() == table
    line = next(ln for ln in table.splitlines() if ln.startswith("| baseline |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert [float(c) for c in cells[1:4]] == pytest.approx(baselines, abs=5e-4)
    assert float(cells[4]) == pytest.approx(np.mean(baselines), abs=5e-4)
    assert float(cells[5]) == pytest.approx(np.std(baselines, ddof=1), abs=5e-4)
    step = next(ln for ln in table.splitlines() if ln.startswith("| baseline -> + helps |"))
    assert step.count("**") == 6  # significant in all three runs
    assert not any(
        ln.startswith("| + helps -> ANTs SyN") for ln in table.splitlines()
    )  # not an ablation step
    named = next(ln for ln in table.splitlines() if ln.startswith("| baseline -> baseline + labels |"))
    assert named.count("-0.050") == 3 and named.count("**") == 6  # "X + ..." is measured against row X
    recorded = next(ln for ln in table.splitlines() if ln.startswith("| baseline -> pseudo_input |"))
    assert recorded.count("+0.030") == 3  # a step the pipeline graph names (step_of), whatever the row's name
    assert not any(ln.startswith("| baseline + labels -> pseudo_input") for ln in table.splitlines())

    (tmp_path / "seed1" / "report" / "report.json").unlink()
    with pytest.raises(FileNotFoundError, match="seed1"):
        steps.report_repeats(works)
