"""The segmentation bundle's configs run as a user runs them, on the tiny synthetic cohorts."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_import import bundle_dir, metadata_schema, run_bundle

SEG = bundle_dir("segmentation")
TINY_NET = {
    "network_def#channels": [8, 16, 32],
    "network_def#strides": [2, 2],
    "network_def#num_res_units": 1,
    "pixdim": [6.0, 6.0, 6.0],
    "num_workers": 0,
}
TRAIN = {
    **TINY_NET,
    "patch_size": [32, 32, 32],
    "batch_size": 2,
    "num_samples": 2,
    "samples_per_epoch": 16,
    "learning_rate": 0.005,
    "val_interval": 2,
}
FIRST_EPOCHS, EPOCHS = 4, 8
UNTRAINED_DICE = 0.015  # measured: a freshly initialised tiny net scores 0.012-0.018 on these cases


@pytest.fixture(scope="module")
def trained(tiny_preprocessed, tmp_path_factory):
    """A tiny training interrupted after FIRST_EPOCHS and resumed up to EPOCHS (two processes)."""
    work = tmp_path_factory.mktemp("segmentation")
    args = {
        **TRAIN,
        "datalist": str(tiny_preprocessed),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "eval"),
    }
    first = run_bundle("segmentation", "train.json", {**args, "max_epochs": FIRST_EPOCHS})
    second = run_bundle("segmentation", "train.json", {**args, "max_epochs": EPOCHS})
    return work, first, second, args


def _log(proc) -> str:
    return proc.stdout + proc.stderr


def test_training_reaches_clear_dice(trained):
    work, _, second, args = trained
    log = _log(second)
    best = max(float(v) for v in re.findall(r"val_mean_dice: ([0-9.]+)", log))
    assert best > 6 * UNTRAINED_DICE, log[-3000:]
    assert (work / "models" / "model.pt").is_file()
    ev = run_bundle(
        "segmentation", ["train.json", "evaluate.json"], {**args, "output_dir": str(work / "evaluate")}
    )
    report = json.loads((work / "evaluate" / "dice_per_organ.json").read_text())
    assert list(report["per_organ"])[:3] == ["spleen", "right kidney", "left kidney"]
    assert len(report["per_organ"]) == 13 and report["per_organ"]["liver"] > 0.35, report["per_organ"]
    assert report["mean_dice"] == pytest.approx(best, abs=1e-4), _log(ev)[-2000:]


def test_resume_after_interruption(trained):
    work, first, second, _ = trained
    assert f"Epoch[{FIRST_EPOCHS}] Complete" in _log(first)
    log = _log(second)
    assert f"resuming from iteration {FIRST_EPOCHS * 8}, epoch {FIRST_EPOCHS} until {EPOCHS} epochs" in log, (
        log[-3000:]
    )
    assert "Epoch[1] Complete" not in log and f"Epoch[{EPOCHS}] Complete" in log
    assert sorted(p.name for p in (work / "models").glob("checkpoint_*")) == [
        f"checkpoint_epoch={EPOCHS}.pt"
    ], "the checkpoint the resumed run started from is left behind"
    ckpt = torch.load(
        work / "models" / f"checkpoint_epoch={EPOCHS}.pt", map_location="cpu", weights_only=False
    )
    assert ckpt["trainer"]["iteration"] == EPOCHS * 8
    assert ckpt["best"]["_saved"], "best-metric tracker not saved with the training state"
    assert (
        max(s["step"] for s in ckpt["optimizer"]["state"].values()) == EPOCHS * 8
    )  # Adam moments carried over


def test_rerunning_a_finished_training_changes_nothing(trained):
    """A finished run is recognised: no epoch is trained again, no checkpoint rewritten (unless asked)."""
    work, _, _, args = trained
    files = {
        p: p.stat().st_mtime_ns for p in (work / "models").iterdir() if p.name != ".lock"
    }  # .lock: held by each run
    proc = run_bundle("segmentation", "train.json", {**args, "max_epochs": EPOCHS, "cache_rate": 0.0})
    log = _log(proc)
    assert f"training already finished (epoch {EPOCHS} of max_epochs {EPOCHS})" in log, log[-3000:]
    assert "Complete" not in log and "Saved checkpoint" not in log, log[-3000:]
    assert files == {p: p.stat().st_mtime_ns for p in (work / "models").iterdir() if p.name != ".lock"}


def test_inference_writes_pseudo_labels_for_every_cohort(trained, tiny_preprocessed):
    work = trained[0]
    out = work / "pseudo"
    run_bundle(
        "segmentation",
        "inference.json",
        {
            **TINY_NET,
            "patch_size": [48, 40, 64],
            "datalist": str(tiny_preprocessed),
            "ckpt_dir": str(work / "models"),
            "output_dir": str(out),
        },
    )
    src = json.loads(Path(tiny_preprocessed).read_text())
    new_path = out / "datalist_pseudo.json"
    new = json.loads(new_path.read_text())
    assert {k: len(v) for k, v in new.items() if isinstance(v, list)} == {
        k: len(v) for k, v in src.items() if isinstance(v, list)
    }
    cohorts = set()
    for key in ("training", "validation"):
        for old, item in zip(src[key], new[key], strict=True):
            cohorts.add(item["cohort"])
            assert item["annotated"] == [1] * 13 and item["label_annotated"] == old["annotated"]
            image = nib.load(new_path.parent / item["image"])
            label = nib.load(new_path.parent / item["pseudo"])
            assert label.shape == image.shape and np.allclose(label.affine, image.affine)
            values = np.unique(np.asarray(label.dataobj))
            assert label.get_data_dtype() == np.uint8 and values.max() <= 13 and len(values) > 1
            if "label" in old:
                assert (new_path.parent / item["label"]).is_file()
    assert cohorts == set(src["cohorts"])  # image-only cohorts (msd_colon, msd_hepaticvessel) included
    assert {"msd_colon", "msd_hepaticvessel"} <= cohorts
    for pair in new["registration_val"]:
        assert all(
            (new_path.parent / pair[k]).is_file() for k in ("fixed", "moving", "fixed_label", "moving_label")
        )


def test_ckpt_export_matches_checkpoint(trained, tmp_path):
    from monai.networks.nets import UNet

    work = trained[0]
    ts = tmp_path / "model.ts"
    run_bundle(
        "segmentation",
        "inference.json",
        {
            "net_id": "network_def",
            "filepath": str(ts),
            "ckpt_file": str(work / "models" / "model.pt"),
            **TINY_NET,
        },
        entry="ckpt_export",
    )
    scripted = torch.jit.load(str(ts), map_location="cpu").eval()
    net = UNet(3, 1, 14, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="instance")
    state = torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=False)
    net.load_state_dict(state.get("model", state))
    x = torch.rand(1, 1, 32, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net.eval()(x), atol=1e-5, rtol=1e-4)


def test_verify_metadata():
    proc = run_bundle(
        "segmentation", "inference.json", {"filepath": str(metadata_schema())}, entry="verify_metadata"
    )
    assert "verified with no error" in _log(proc)


def test_verify_net_in_out():
    proc = run_bundle(
        "segmentation", "inference.json", {"net_id": "network_def", **TINY_NET}, entry="verify_net_in_out"
    )
    assert "data shape of network is verified with no error" in _log(proc)


def test_multi_gpu_config_under_torchrun_gloo(tiny_preprocessed, tmp_path):
    args = {
        **TRAIN,
        "datalist": str(tiny_preprocessed),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
    }
    args.update(max_epochs=1, val_interval=1, samples_per_epoch=8, dist_backend="gloo")
    proc = run_bundle(
        "segmentation",
        ["train.json", "multi_gpu_train.json"],
        args,
        nproc=2,
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "val_mean_dice" in log and (tmp_path / "models" / "checkpoint_epoch=1.pt").is_file()
    assert (tmp_path / "models" / "model.pt").is_file()
    # 8 samples over 2 ranks with batch 2: 2 iterations per rank and epoch
    assert "Iter: 2/2" in log and "Iter: 3/" not in log


ORGANS = [
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland",
]  # fmt: skip


def _bundle_infer_task_parse(overrides: dict):
    """Parse inference.json the way MONAI Label's BundleInferTask does (bundle root on sys.path, fresh `scripts`)."""
    from monai.bundle import ConfigParser

    saved = {
        k: sys.modules.pop(k) for k in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]
    }
    sys.path.insert(0, str(SEG))
    parser = ConfigParser()
    parser.read_config(str(SEG / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(SEG)})
    for key, value in overrides.items():
        parser[key] = value
    try:
        yield parser
    finally:
        sys.path.remove(str(SEG))
        for k in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_monai_label_bundle_infer_task_contract(tiny_preprocessed):
    """The ids and metadata BundleInferTask reads, and its pre -> inferer -> post chain on one volume."""
    from monai.inferers import Inferer
    from monai.transforms import Compose, LoadImaged, SaveImaged

    meta = json.loads((SEG / "configs" / "metadata.json").read_text())
    key_image, image = next(iter(meta["network_data_format"]["inputs"].items()))
    key_pred, pred = next(iter(meta["network_data_format"]["outputs"].items()))
    assert (key_image, key_pred) == ("image", "pred")
    labels = {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}
    assert labels == {name: i + 1 for i, name in enumerate(ORGANS)}
    assert len(image["spatial_shape"]) == 3 and pred["num_channels"] == 14

    for parser in _bundle_infer_task_parse({k: v for k, v in TINY_NET.items() if k != "num_workers"}):
        for key in ("network_def", "preprocessing", "postprocessing", "inferer", "device", "bundle_root"):
            assert parser.get(key) is not None, key
        network = parser.get_parsed_content("network_def", instantiate=True).eval()
        pre = parser.get_parsed_content("preprocessing", instantiate=True)
        post = parser.get_parsed_content("postprocessing", instantiate=True)
        inferer = parser.get_parsed_content("inferer", instantiate=True)
    assert (
        isinstance(pre, Compose)
        and isinstance(pre.transforms[0], LoadImaged)
        and isinstance(inferer, Inferer)
    )
    assert not any(isinstance(t, SaveImaged) for t in post.transforms)  # MONAI Label adds its own writer

    item = json.loads(Path(tiny_preprocessed).read_text())["validation"][0]
    path = str(Path(tiny_preprocessed).parent / item["image"])
    data = pre({"image": path})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    out = post(data)["pred"]
    original = nib.load(path)
    assert tuple(out.shape[1:]) == original.shape and out.shape[0] == 1
    assert np.allclose(np.asarray(out.affine), original.affine, atol=1e-4)
    assert 0 <= float(out.min()) and float(out.max()) <= 13
