"""Training pairs, a tiny overfit, and train.json / resume / DDP / LocalNet runs on tiny synthetic data."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bundle_import import bundle_dir, import_bundle_module, run_bundle

networks = import_bundle_module("registration", "scripts.networks")
losses = import_bundle_module("registration", "scripts.losses")
data = import_bundle_module("registration", "scripts.data")
training = import_bundle_module("registration", "scripts.training")
transforms = import_bundle_module("registration", "scripts.transforms")

TRAIN = ["train.json"]
# a tiny, fast run: narrow network, small crops, few pairs; booleans as Python literals for MONAI's CLI
TINY_RUN = {
    "channel_multiplier": 1,
    "crop_size": [32, 32, 32],
    "batch_size": 1,
    "pairs_per_epoch": 2,
    "num_workers": 0,
    "progress_bar": "False",
}


def _run(datalist: Path, out: Path, configs=TRAIN, **overrides):
    args = {
        "datalist": str(datalist),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "logs"),
        **TINY_RUN,
        **overrides,
    }
    # one thread: oneDNN's 3D conv backward is ~50x slower with 2 threads on a shared 2-core machine
    return run_bundle("registration", configs, args, timeout=300, env={"OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------
def test_cases_cohorts_weights_and_label_key(tiny_preprocessed, tmp_path):
    cases = data.load_cases(tiny_preprocessed, "training")
    assert all(os.path.isfile(c["image"]) for c in cases)
    image_only = [c for c in cases if "label" not in c]
    assert image_only and all(sum(c["annotated"]) == 0 for c in image_only)
    l2r = data.load_cases(tiny_preprocessed, "training", cohorts=["l2r"])
    assert {c["cohort"] for c in l2r} == {"l2r"} and all(sum(c["annotated"]) == 13 for c in l2r)
    both = data.load_cases(tiny_preprocessed, "training+validation", cohorts=["l2r"])
    assert len(both) == len(l2r) + 3
    # cohort weights: l2r gets 3/4 of the draws, a zero weight drops a cohort
    probs = data.case_weights(cases, {"l2r": 3.0, "msd_colon": 0.0})
    cohorts = np.array([c["cohort"] for c in cases])
    n_other = len(set(cohorts)) - 2
    assert np.isclose(float(probs[cohorts == "l2r"].sum()), 3.0 / (3.0 + n_other))
    assert float(probs[cohorts == "msd_colon"].sum()) == 0
    # a pseudo-label key (added by the segmentation bundle): every case gets a label, all organs count
    listing = json.loads(Path(tiny_preprocessed).read_text())
    for item in listing["training"]:
        item["pseudo"] = item.get("label", listing["training"][3]["label"])
    fake = Path(tiny_preprocessed).parent / "datalist_pseudo_test.json"
    fake.write_text(json.dumps(listing))
    pseudo = data.load_cases(fake, "training", label_key="pseudo")
    assert all("label" in c and sum(c["annotated"]) == 13 for c in pseudo)
    assert data.load_cases(tiny_preprocessed, "training", label_key=None)[0].get("label") is None


def _train_config(datalist: Path, **overrides):
    """train.json parsed here, as ``monai.bundle run`` parses it."""
    from monai.bundle import ConfigParser

    import_bundle_module("registration", "scripts.data")  # this bundle's ``scripts`` for the config
    parser = ConfigParser()
    parser.read_config(str(bundle_dir("registration") / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle_dir("registration"))
    parser["datalist"] = str(datalist)
    parser["num_workers"] = 0
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_pair_dataset_one_crop_for_both(tiny_preprocessed):
    """train.json's data path: cached cases, random pairs, one crop for both scans and labels, the windows."""
    parser = _train_config(
        tiny_preprocessed, crop_size=[16, 24, 32], ct_windows=[[400, 40], [1000, 400]], pairs_per_epoch=8
    )
    pair_ds = parser.get_parsed_content("train#dataset")
    torch.manual_seed(1)
    seen = set()
    for i in range(len(pair_ds)):
        item = pair_ds[i]
        assert item["moving"].shape == item["fixed"].shape == (2, 16, 24, 32)
        assert item["moving_label"].shape == (1, 16, 24, 32)
        assert 0 <= float(item["moving"].min()) and float(item["moving"].max()) <= 1
        assert item["moving_case"] != item["fixed_case"]
        assert item["moving_annotated"].shape == (13,)
        seen.add((item["moving_case"], item["fixed_case"]))
    assert len(seen) > 1
    # the same box is cut from every key: crop a case against itself and compare
    twin = data.PairDataset(
        parser.get_parsed_content("train#case_dataset"),
        parser.get_parsed_content("train#preprocessing"),
        pairs=[(3, 3)],
    )
    item = twin[0]
    assert torch.equal(item["moving"], item["fixed"]) and torch.equal(
        item["moving_label"], item["fixed_label"]
    )
    # validation pairs: full volume, both labels
    vds = parser.get_parsed_content("validate#dataset")
    assert len(vds) == 3
    item = vds[0]
    assert item["fixed"].shape[1:] == tuple(json.loads(Path(tiny_preprocessed).read_text())["spatial_size"])
    batch = torch.utils.data.default_collate([item])
    x, target = training.TrainingBatch()(batch)
    assert x.shape[1] == 4 and target["annotated"].shape == (1, 13)
    # unsupervised training loads no labels; a null crop_size trains on whole volumes
    whole = _train_config(tiny_preprocessed, crop_size=None, use_dice=False).get_parsed_content(
        "train#dataset"
    )
    item = whole[0]
    assert "moving_label" not in item and item["moving"].shape[1:] == item["fixed"].shape[1:] == (48, 40, 64)


def test_validation_dice_matches_learn2reg_definition():
    lab_f = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    lab_m = torch.zeros_like(lab_f)
    lab_f[..., :4, :, :] = 1
    lab_m[..., :4, :, :] = 1
    lab_f[..., 6:, :, :] = 2  # organ 2 only in fixed: NaN, not counted
    dsc = training.pair_dice(lab_m, lab_f, torch.zeros(1, 3, 8, 8, 8), [1, 2, 3])
    assert dsc[0, 0] == 1 and torch.isnan(dsc[0, 1:]).all()
    metric = training.RegistrationDice(labels=[1, 2, 3])
    metric.reset()
    metric.update((torch.zeros(1, 3, 8, 8, 8), {"moving_label": lab_m, "fixed_label": lab_f}))
    assert metric.compute() == 1.0


def test_warmup_cosine_schedule():
    f = training.warmup_cosine(total_iters=110, warmup_iters=10, final_fraction=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    constant = training.warmup_cosine(total_iters=100)  # the paper: no warm-up, no decay
    assert {constant(i) for i in (0, 50, 100)} == {1.0}


@pytest.mark.parametrize(
    "head_type, dice_downsample", [("gradient", 1), ("displacement", 2)]
)  # paper, CPU recipe
def test_tiny_overfit_lowers_loss(head_type, dice_downsample):
    """A few Adam steps on one synthetic pair (a cube shifted by two voxels) lower the loss and raise Dice."""
    torch.manual_seed(0)
    shape = (32, 32, 32)
    mov_lab = torch.zeros(1, 1, *shape, dtype=torch.long)
    fix_lab = torch.zeros_like(mov_lab)
    mov_lab[..., 10:22, 10:22, 10:22] = 1
    fix_lab[..., 12:24, 10:22, 10:22] = 1
    mov = mov_lab.float() + 0.05 * torch.rand(1, 1, *shape)
    fix = fix_lab.float() + 0.05 * torch.rand(1, 1, *shape)
    target = {
        "moving": mov,
        "fixed": fix,
        "moving_label": mov_lab,
        "fixed_label": fix_lab,
        "annotated": torch.ones(1, 1),
    }
    net = networks.GradientRegNet(
        in_channels=1,
        channel_multiplier=1,
        downsample=1,
        deep_supervision=True,
        symmetric=True,
        head_type=head_type,
    )
    loss_fn = losses.RegistrationLoss(num_organs=1, dice_downsample=dice_downsample)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x = torch.cat([mov, fix], 1)
    values = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(12):
        opt.zero_grad()
        loss = loss_fn(net(x), target)
        loss.backward()
        opt.step()
        values.append(float(loss))
    torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        dice = training.pair_dice(mov_lab, fix_lab, net(x), [1])[0, 0]
    identity = training.pair_dice(mov_lab, fix_lab, torch.zeros(1, 3, *shape), [1])[0, 0]
    assert values[-1] < 0.7 * values[0]
    assert dice > identity + 0.02


# ---------------------------------------------------------------------------------------------
# bundle runs
# ---------------------------------------------------------------------------------------------
# The one small training the resume and determinism tests share: one epoch, with the timing handler and weight
# averaging switched on by config.
TRAINED = {"max_epochs": 1, "ema_momentum": 0.5, "val_at_start": "False"}


@pytest.fixture(scope="module")
def trained(tiny_preprocessed, tmp_path_factory):
    """The folder of the shared training (``TRAINED``, its timing file in ``timing.json``) and its process."""
    out = tmp_path_factory.mktemp("registration") / "run"
    return out, _run(tiny_preprocessed, out, timing_file=str(out / "timing.json"), **TRAINED)


def test_train_runs_end_to_end_and_resumes(trained, tiny_preprocessed, tmp_path):
    """Train, resume, fine-tune; with the timing handler and weight averaging switched on by config."""
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)  # the shared training, resumed here
    timing, first = out / "timing.json", trained[1]
    models = out / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint_epoch=1.pt").is_file()
    state = torch.load(models / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "best", "ema_model"} <= set(state)
    assert state["trainer"]["iteration"] == 2
    # model.pt holds the averaged weights (what validation scored), not the last step's
    best = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    key = "heads.3.conv.weight"
    torch.testing.assert_close(best[key], state["ema_model"][key])
    assert not torch.equal(best[key], state["model"][key])
    # the timing handler's split: every part measured, their sum within the run's wall time, one curve
    # point per validation (epoch 1, after 2 iterations)
    split = json.loads(timing.read_text())
    assert split["iterations"] == 2 and split["finished"]
    assert all(split["total_s"][k] > 0 for k in ("forward", "loss", "backward_optimizer", "validation"))
    assert sum(split["total_s"].values()) <= split["wall_s"] + 0.05
    assert [p["iteration"] for p in split["curve"]] == [2]
    assert all(0 < p["metric"] < 1 and p["val_s"] > 0 for p in split["curve"])
    assert re.search(r"val_mean_dice: 0\.\d+", first.stdout + first.stderr)
    assert list((out / "logs").glob("events.out.tfevents*"))
    # the interrupted run is continued: epoch 2 only, from the saved state
    second = _run(tiny_preprocessed, out, max_epochs=2, val_at_start="False", ema_momentum=0.5)
    log = second.stdout + second.stderr
    assert "resuming from iteration 2, epoch 1" in log, log[-3000:]
    assert "Epoch: 1/2" not in log and "Epoch: 2/2" in log
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == [
        "checkpoint_epoch=2.pt",
        "model.pt",
    ]  # epoch 1's removed (.lock: the folder's lock, held by the training that writes into it)
    # the finished run is left alone: the same command again trains nothing and rewrites nothing
    before = {p.name: p.read_bytes() for p in models.iterdir() if p.name != ".lock"}
    again = _run(tiny_preprocessed, out, max_epochs=2, val_at_start="False")
    assert "already finished (epoch 2 of max_epochs 2)" in again.stdout + again.stderr
    assert "Epoch: 1/2" not in again.stdout + again.stderr
    assert {p.name: p.read_bytes() for p in models.iterdir() if p.name != ".lock"} == before
    # initial_ckpt starts a fresh run (no resume) from given weights, e.g. fine-tuning a pretrained model
    third = _run(
        tiny_preprocessed,
        tmp_path / "finetune",
        max_epochs=1,
        initial_ckpt=str(models / "model.pt"),
        cohorts=["l2r"],
        val_at_start="False",
    )
    assert (
        "loaded all" in third.stdout + third.stderr
        and "tensors of the network" in third.stdout + third.stderr
    )


def test_a_training_run_twice_gives_the_same_weights(trained, tiny_preprocessed, tmp_path):
    """Same inputs, same settings, same seed: bit-identical weights; another seed gives other weights (so the
    comparison can fail)."""
    states = [torch.load(trained[0] / "models" / "model.pt", map_location="cpu", weights_only=True)]
    for name, seed in (("b", 0), ("c", 1)):
        timing = str(tmp_path / name / "timing.json")
        _run(tiny_preprocessed, tmp_path / name, timing_file=timing, **{**TRAINED, "seed": seed})
        states.append(
            torch.load(tmp_path / name / "models" / "model.pt", map_location="cpu", weights_only=True)
        )
    first, again, other = states
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first), "two runs of the same training differ"
    assert any(not torch.equal(first[k], other[k]) for k in first if k != "_extra_state")


def test_train_symmetric_unsupervised_image_only(tiny_preprocessed, tmp_path):
    """Unsupervised pretraining on every cohort (image-only ones included), symmetric, LNCC, weighted cohorts."""
    out = tmp_path / "unsup"
    proc = _run(
        tiny_preprocessed,
        out,
        max_epochs=1,
        use_dice="False",
        symmetric="True",
        deep_supervision="False",
        multi_window="False",
        cohort_weights={"msd_colon": 2.0, "msd_hepaticvessel": 2.0},
        similarity={"_target_": "LocalNormalizedCrossCorrelationLoss", "kernel_size": 5},
        val_at_start="False",
        cache_rate=0.0,
    )
    log = proc.stdout + proc.stderr
    assert "train_dice_loss" not in log and "train_similarity" in log
    assert (out / "models" / "model.pt").is_file()


def test_train_and_infer_with_predicted_labels_as_input(tiny_preprocessed, tmp_path):
    """pseudo_input: the network reads both scans' predicted labels in training and in inference (found through the
    segmentation bundle's pseudo datalist); a scan without them is an error that names it. The stand-in
    pseudo labels are label maps, for plumbing only."""
    listing = json.loads(Path(tiny_preprocessed).read_text())
    stand_in = next(it["label"] for it in listing["training"] if it.get("label"))
    for key in ("training", "validation"):
        for item in listing[key]:
            item["pseudo"] = item.get("label") or stand_in
    pseudo = Path(tiny_preprocessed).parent / "datalist_pseudo_input.json"
    pseudo.write_text(json.dumps(listing))
    out = tmp_path / "pseudo_input"
    proc = _run(pseudo, out, max_epochs=1, pseudo_input="True", crop_size=None, val_at_start="False")
    assert re.search(r"val_mean_dice: 0\.\d+", proc.stdout + proc.stderr)
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["input_block.convs.0.conv.weight"].shape[1] == 3 + 13  # three CT windows + 13 organs
    infer = {
        "datalist": str(tiny_preprocessed),
        "ckpt_path": str(out / "models" / "model.pt"),
        "write_qc": False,
        "write_images": False,
        "num_workers": 0,
    }
    run_bundle(
        "registration",
        ["inference.json", "evaluate.json"],
        {**infer, "pseudo_datalist": str(pseudo), "output_dir": str(tmp_path / "eval")},
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["summary"]["num_pairs"] == len(listing["registration_val"])
    failed = run_bundle(
        "registration",
        ["inference.json", "evaluate.json"],
        {**infer, "output_dir": str(tmp_path / "no")},
        check=False,
    )
    first = Path(listing["registration_val"][0]["moving"]).name
    assert failed.returncode != 0
    assert "reads predicted labels" in failed.stderr and first in failed.stderr, failed.stderr[-2000:]
    # training without them names the case
    del listing["training"][0]["pseudo"]
    pseudo.write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=f"{listing['training'][0]['case']} has no 'pseudo'"):
        data.load_cases(pseudo, "training", pseudo_input=True)


def test_train_localnet_baseline(tiny_preprocessed, tmp_path):
    out = tmp_path / "localnet"
    _run(tiny_preprocessed, out, configs=[*TRAIN, "train_localnet.json"], max_epochs=1, val_at_start="False")
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=False)
    assert any(k.startswith("decode_deconvs") or "deconv" in k for k in state)


def test_multi_gpu_train_torchrun_gloo(tiny_preprocessed, tmp_path):
    out = tmp_path / "ddp"
    args = {
        **TINY_RUN,
        "datalist": str(tiny_preprocessed),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "logs"),
    }
    args.update(max_epochs=1, pairs_per_epoch=4, val_at_start="False", dist_backend="gloo")
    proc = run_bundle(
        "registration",
        [*TRAIN, "multi_gpu_train.json"],
        args,
        nproc=2,
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (out / "models" / "checkpoint_epoch=1.pt").is_file()
    # 4 pairs split over 2 ranks: each rank does 2 iterations per epoch
    assert "Iter: 2/2" in proc.stdout + proc.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
