"""The training benchmark's helpers (tuning split, time to quality) and the shipped `bench` pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from abdoreg import bench_train
from abdoreg.pipeline import dependencies, load_pipeline

PIPELINES = Path(__file__).resolve().parents[2] / "tools" / "abdoreg" / "pipelines"
REG_CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "registration" / "configs"


def test_tuning_split_holds_out_training_subjects_and_keeps_validation(tmp_path):
    cases = [{"image": f"i{k}.nii.gz", "label": f"l{k}.nii.gz", "case": f"c{k}"} for k in range(8)]
    val = [{"fixed": "v1.nii.gz", "moving": "v2.nii.gz"}]
    src = tmp_path / "datalist.json"
    src.write_text(json.dumps({"training": cases, "registration_val": val}))
    out = json.loads(Path(bench_train.tuning_split(str(src), n_train=4, n_tune=3)).read_text())
    train = {c["image"] for c in out["training"]}
    tune = {c["image"] for c in out["tuning"]}
    assert len(train) == 4 and len(tune) == 3 and not train & tune
    pairs = out["registration_tune"]
    assert len(pairs) == 3 and all({p["fixed"], p["moving"]} <= tune for p in pairs)
    assert all(p["fixed_label"].startswith("l") for p in pairs)
    assert out["registration_val"] == val  # the pairs the reports show are untouched


def test_time_to_quality_is_the_first_validation_past_identity_plus_margin():
    curve = [
        {"iteration": 0, "wall_s": 5.0, "metric": 0.25},
        {"iteration": 100, "wall_s": 60.0, "metric": 0.29},
        {"iteration": 200, "wall_s": 120.0, "metric": 0.31},
        {"iteration": 300, "wall_s": 180.0, "metric": 0.33},
    ]
    ttq = bench_train.time_to_quality(curve, margin=0.05)
    assert ttq == {"identity": 0.25, "best": 0.33, "iteration": 200, "wall_s": 120.0}
    assert bench_train.time_to_quality(curve, margin=0.1)["wall_s"] is None


def test_bench_pipeline_trains_and_scores_every_ablation_model_with_one_recipe(tmp_path):
    """Every training lists the CPU recipe last; every evaluation runs inference.json alone (the weights say
    which network they are), scoring only models the pipeline trained."""
    _, stages = load_pipeline(PIPELINES / "bench.yaml", tmp_path)
    by_name = {s.name: s for s in stages}
    reg = [s for s in stages if s.bundle == "registration"]
    trained = {s.outputs[0] for s in reg if s.configs[0] == "train.json"}
    for s in reg:
        assert all((REG_CONFIGS / c).is_file() for c in s.configs), s.configs
        if s.configs[0] == "train.json":
            assert s.configs[-1] == "fast_train.json", s.name
        else:
            assert s.configs[0] == "inference.json" and "fast_train.json" not in s.configs, s.name
    scored = [s for s in reg if s.name.startswith("evaluate_") and "ckpt_path" in s.overrides]
    assert {s.overrides["ckpt_path"] for s in scored} <= trained
    assert {
        "registration_baseline",
        "registration_symmetric",
        "registration_unsupervised_pretraining_pretrain",
        "registration_unsupervised_pretraining",
        "registration_pseudo_pretraining_pretrain",
        "registration_pseudo_pretraining",
        "registration_pseudo_input",
    } <= set(by_name)
    deps = dependencies(stages)
    assert "registration_pseudo_pretraining_pretrain" in deps["registration_pseudo_pretraining"]
    assert list(by_name["report"].args["methods"]) == [
        "identity",
        "baseline",
        "symmetric",
        "unsupervised_pretraining",
        "pseudo_pretraining",
        "pseudo_input",
        "ANTs SyN",
        "ConvexAdam",
    ]
    # the ablation steps: each model against the row it adds to (pseudo_pretraining against unsupervised_pretraining
    # where that row runs, else symmetric), pseudo_input against the baseline
    assert by_name["report"].args["steps"] == {
        "symmetric": "baseline",
        "unsupervised_pretraining": "symmetric",
        "pseudo_pretraining": "unsupervised_pretraining",
        "pseudo_input": "baseline",
    }
    # the network reading predicted labels gets them in training and at test time, and twice the baseline's steps
    assert by_name["registration_pseudo_input"].overrides["pseudo_input"] == "True"
    assert "pseudo_datalist" in by_name["evaluate_pseudo_input"].overrides
    assert int(by_name["registration_pseudo_input"].overrides["max_epochs"]) == 2 * int(
        by_name["registration_baseline"].overrides["max_epochs"]
    )


def test_bundle_command_lists_configs_and_passes_literals():
    """Every bundle runs as a user would run it; overrides arrive as literals MONAI's CLI parses back."""
    from abdoreg.bundles import bundle_command

    cmd = bundle_command(
        "registration", ["train.json", "fast_train.json"], {"crop_size": None, "pixdim": [6.0] * 3}
    )
    assert cmd[1:4] == ["-m", "monai.bundle", "run"]
    assert json.loads(cmd[cmd.index("--config_file") + 1]) == [
        str(REG_CONFIGS / "train.json"),
        str(REG_CONFIGS / "fast_train.json"),
    ]
    assert cmd[cmd.index("--crop_size") + 1] == "None" and cmd[cmd.index("--pixdim") + 1] == "[6.0, 6.0, 6.0]"
    assert cmd[cmd.index("--bundle_root") + 1] == str(REG_CONFIGS.parent)
    assert set(bench_train.RECIPES) >= {"crops", "fast"}
    assert all((REG_CONFIGS / c).is_file() for configs, _ in bench_train.RECIPES.values() for c in configs)


def test_io_curve_scores_each_iteration_count_from_each_start_on_a_finished_run(tmp_path):
    """`io_curve` reads the demo's data, model and pseudo labels, and has one report row per start and iteration
    count, each running that many instance-optimisation iterations."""
    _, stages = load_pipeline(PIPELINES / "io_curve.yaml", tmp_path)
    evals = [s for s in stages if s.bundle == "registration"]
    iterations = {s.overrides["instance_optimiser#iterations"] for s in evals}
    assert iterations == {"10", "20", "40", "80"} and len(evals) == 12
    for s in evals:
        assert s.configs == ["inference.json", "evaluate.json"] and s.overrides["instance_opt"] == "True"
        assert s.row.endswith(f", {s.overrides['instance_optimiser#iterations']} it.")
        assert s.overrides["datalist"] == str(tmp_path / "preprocessed" / "datalist.json")
        if "identity" in s.name:
            assert s.overrides["instance_opt_start"] == "identity" and "ckpt_path" not in s.overrides
        else:
            model = tmp_path / "registration" / "pseudo_pretraining" / "models" / "model.pt"
            assert s.overrides["ckpt_path"] == str(model)
            labelled = "pseudo_datalist" in s.overrides
            assert labelled == ("pseudo" in s.name)
    assert len({s.outputs[0] for s in evals}) == 12  # no two stages write the same metrics
    (report,) = [s for s in stages if s.builtin == "report"]
    assert list(report.args["methods"]) == [s.row for s in evals]
    assert set(report.args["compare_to"]) <= set(report.args["methods"])
    deps = dependencies(stages)
    assert deps[report.name] == {s.name for s in evals}
