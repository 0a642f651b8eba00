"""``abdoreg export``: an archive that ``monai.bundle download`` fetches offline, ``monai.bundle.load`` reads,
that runs from an unrelated folder with nothing of the repository importable, and that fine-tuning starts from."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from abdoreg.export import ExportError, export
from tests.bundle_import import REPO, bundle_dir, import_bundle_module, metadata_schema

networks = import_bundle_module("registration", "scripts.networks")
metrics = import_bundle_module("registration", "scripts.metric_files")
pretrained = import_bundle_module("registration", "scripts.pretrained")

NAME, VERSION = "abdominal_ct_registration", "0.4.0"
WINDOWS = [[400.0, 40.0], [800.0, 100.0], [1000.0, 400.0]]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Run a command with nothing of the repository importable: its folders are dropped from sys.path (the
# editable install puts tools/ there), the virtual environment's site-packages stay.
OUTSIDE = """
import importlib.util, os, runpy, sys
repo, prefix = os.path.realpath(sys.argv[1]), os.path.realpath(sys.prefix)
def inside(p, root):
    p = os.path.realpath(p or ".")
    return p == root or p.startswith(root + os.sep)
sys.path[:] = [p for p in sys.path if not inside(p, repo) or inside(p, prefix)]
assert importlib.util.find_spec("abdoreg") is None, "the repository is importable"
if sys.argv[2] == "-m":
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    exec(sys.argv[2])
"""


def _outside(args: list[str], cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [sys.executable, "-c", OUTSIDE, str(REPO), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _tiny_net(multiplier: int = 1, seed: int = 0) -> torch.nn.Module:
    """A narrow network with random heads, so its field is not the identity and a wrong load shows; it records
    the windows and grid of the tiny data (6 mm, 48x40x64), as train.json's network does."""
    torch.manual_seed(seed)
    net = networks.GradientRegNet(
        in_channels=3,
        channel_multiplier=multiplier,
        downsample=1,
        input_windows=WINDOWS,
        input_pixdim=[6.0, 6.0, 6.0],
        input_spatial_size=[48, 40, 64],
    )
    for head in net.heads:
        torch.nn.init.normal_(head.conv.weight, std=0.01)
    return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A training checkpoint (as CheckpointSaver writes it), its evaluation and the archive exported from them."""
    tmp = tmp_path_factory.mktemp("export")
    net = _tiny_net()
    optimizer = torch.optim.Adam(net.parameters())
    ckpt = tmp / "checkpoint_epoch=3.pt"
    torch.save(
        {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "trainer": {"epoch": 3}}, ckpt
    )
    rows = [  # the evaluation's own writer, so the file has the format the bundle writes
        {"fixed": "f1", "moving": "m1", "dice": 0.30, "hd95_mm": 14.0, "sdlogj": 0.05, "runtime_s": 1.2},
        {"fixed": "f2", "moving": "m2", "dice": 0.36, "hd95_mm": 12.0, "sdlogj": 0.07, "runtime_s": 1.1},
    ]
    evaluation = metrics.write_results(tmp / "evaluation", rows)
    archive = export(
        "registration",
        model=str(ckpt),
        metrics=str(tmp / "evaluation" / "metrics.json"),
        data="tiny synthetic AbdomenCTCT-like phantoms (abdoreg synth)",
        out=str(tmp / "dist"),
        version=VERSION,
        changelog="test export",
    )
    return {"archive": Path(archive), "state": net.state_dict(), "summary": evaluation["summary"], "tmp": tmp}


def test_archive_layout_and_metadata(exported):
    archive = exported["archive"]
    assert archive.name == f"{NAME}_v{VERSION}.zip"
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        meta = json.loads(zf.read(f"{NAME}/configs/metadata.json"))
        inference = json.loads(zf.read(f"{NAME}/configs/inference.json"))
        train = json.loads(zf.read(f"{NAME}/configs/train.json"))
    assert {n.split("/")[0] for n in names} == {NAME}
    assert {f"{NAME}/LICENSE", f"{NAME}/models/model.pt", f"{NAME}/scripts/networks.py"} <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/." in n]
    assert [n for n in names if "/models/" in n] == [f"{NAME}/models/model.pt"]
    # the settings the weights record: an explicit network in inference.json (monai.bundle.load and MONAI Label
    # build it from any folder), the same network from train.json (fine-tuning from the archive)
    settings = _tiny_net().settings
    assert inference["network_def"] == {"_target_": "scripts.networks.GradientRegNet", **settings}
    assert (
        train["channel_multiplier"] == 1 and train["ct_windows"] == WINDOWS and train["multi_window"] is True
    )
    assert inference["learn2reg_pixdim"] == [2.0, 2.0, 2.0], "inference's own keys are left alone"
    with zipfile.ZipFile(archive) as zf:
        large = zf.read(f"{NAME}/large_files.yml").decode()
        weights = zf.read(f"{NAME}/models/model.pt")
    import hashlib

    assert hashlib.sha256(weights).hexdigest() in large, "large_files.yml carries the weights' sha256"
    summary = exported["summary"]
    assert meta["eval_metrics"]["val_mean_dice"] == pytest.approx(summary["dice"])
    assert meta["eval_metrics"]["val_dice30"] == pytest.approx(summary["dice30"])
    assert "val_runtime_s" not in meta["eval_metrics"]
    assert meta["version"] == VERSION and "test export" in meta["changelog"][VERSION]
    assert meta["monai_version"] == importlib.metadata.version("monai").split("+")[0]
    assert meta["pytorch_version"] == importlib.metadata.version("torch").split("+")[0]
    assert meta["required_packages_version"]["pytorch-ignite"] == importlib.metadata.version("pytorch-ignite")
    assert "optional_packages_version" not in meta
    assert meta["data_source"].startswith("tiny synthetic")


def test_exported_metadata_passes_the_monai_schema(exported):
    """The zoo's first check (`verify_metadata`), on the stamped metadata, offline against the local schema."""
    import jsonschema

    schema = metadata_schema()  # skips, with the reason, where the schema is absent
    with zipfile.ZipFile(exported["archive"]) as zf:
        meta = json.loads(zf.read(f"{NAME}/configs/metadata.json"))
    jsonschema.validate(meta, json.loads(schema.read_text()))


def test_download_offline_load_and_run_outside_the_repository(exported, tiny_cohorts, tmp_path):
    """`monai.bundle download --url file://`, `monai.bundle.load`, then inference from an unrelated folder."""
    downloads, work = tmp_path / "bundles", tmp_path / "work"
    work.mkdir()
    url = exported["archive"].resolve().as_uri()
    _outside(
        ["-m", "monai.bundle", "download", "--name", NAME, "--version", VERSION, "--url", url,
         "--bundle_dir", str(downloads)],
        cwd=work,
    )  # fmt: skip
    bundle = downloads / NAME
    assert (bundle / "models" / "model.pt").is_file()

    loaded = tmp_path / "loaded.pt"
    code = (
        "import torch, scripts\nfrom monai.bundle import load\n"
        f"net = load(name={NAME!r}, bundle_dir={str(downloads)!r}, workflow_type='inference', device='cpu')\n"
        f"torch.save(net.state_dict(), {str(loaded)!r})\nprint('scripts from', scripts.__file__)\n"
    )
    proc = _outside([code], cwd=work, pythonpath=bundle)
    assert f"scripts from {bundle}" in proc.stdout
    state = torch.load(loaded, weights_only=True)
    assert state.keys() == exported["state"].keys()
    assert all(torch.equal(state[k], exported["state"][k]) for k in state), "load() returned other weights"

    raw = tiny_cohorts / "AbdomenCTCT"
    scans = {
        f"{role}{kind}": str(raw / folder / f"AbdomenCTCT_{sid}_0000.nii.gz")
        for role, sid in (("fixed", "0001"), ("moving", "0002"))
        for kind, folder in (("", "imagesTr"), ("_label", "labelsTr"))
    }
    args = ["--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle)]
    args += [x for k, v in {**scans, "output_dir": str(work / "out")}.items() for x in (f"--{k}", v)]
    _outside(["-m", "monai.bundle", "run", *args], cwd=work, pythonpath=bundle)
    field = nib.load(work / "out" / "submission" / "disp_0001_0000_0002_0000.nii.gz").get_fdata()
    assert field.shape == (48, 40, 64, 3) and np.isfinite(field).all()
    assert np.abs(field).max() > 0.05, "the exported weights (random heads) give a non-identity field"
    result = json.loads((work / "out" / "metrics.json").read_text())
    assert 0.0 < result["summary"]["dice"] <= 1.0


def test_finetune_starts_from_an_exported_archive(exported, tiny_preprocessed, tmp_path):
    """Fine-tuning from the archive (as a file:// URL) for one step: its weights at step 0 are the exported ones."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    import_bundle_module("registration", "scripts.training")
    root = bundle_dir("registration")
    wf = ConfigWorkflow(
        config_file=[str(root / "configs" / c) for c in ("train.json", "finetune.json")],
        meta_file=str(root / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(root),
        pretrained=exported["archive"].resolve().as_uri(),
        datalist=str(tiny_preprocessed),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "logs"),
        crop_size=[32, 32, 32],
        batch_size=1,
        pairs_per_epoch=1,
        max_epochs=1,
        val_interval=2,
        val_at_start=False,
        num_workers=0,
        cache_rate=0.0,
        progress_bar=False,
        learning_rate=0.01,
        channel_multiplier=1,
        downsample=1,
    )
    wf.initialize()
    trainer, net = wf.parser.get_parsed_content("train#trainer"), wf.parser.get_parsed_content("network")
    at_start: dict = {}
    trainer.add_event_handler(
        Events.ITERATION_STARTED(once=1),
        lambda _: at_start.update({k: v.detach().clone() for k, v in net.state_dict().items()}),
    )
    wf.run()
    expected = exported["state"]
    assert at_start.keys() == expected.keys()
    assert all(torch.equal(at_start[k].cpu(), expected[k]) for k in expected)
    after = net.state_dict()
    assert any(not torch.equal(after[k].cpu(), expected[k]) for k in expected), "the step changed nothing"
    # the archive's path resolves to the same extracted bundle (cached by content, extracted once)
    cache = tmp_path / "models" / "pretrained"
    assert pretrained.resolve_pretrained(str(exported["archive"]), cache) == pretrained.resolve_pretrained(
        exported["archive"].resolve().as_uri(), cache
    )
    assert len(list(cache.iterdir())) == 1


def _chain(exc: BaseException | None) -> str:
    """The messages of an exception and its causes (MONAI wraps what a config expression raises)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_a_failed_fine_tuning_leaves_nothing_behind(exported, tiny_preprocessed, tmp_path):
    """Fine-tuning from an archive whose weights do not fit (another width): refused before the archive is
    extracted or a log is started; a truncated archive is named as such."""
    from monai.bundle import ConfigWorkflow

    import_bundle_module("registration", "scripts.training")
    root = bundle_dir("registration")

    def finetune(source: Path, ckpt_dir: Path) -> None:
        wf = ConfigWorkflow(
            config_file=[str(root / "configs" / c) for c in ("train.json", "finetune.json")],
            meta_file=str(root / "configs" / "metadata.json"),
            workflow_type="train",
            bundle_root=str(root),
            pretrained=str(source),
            datalist=str(tiny_preprocessed),
            ckpt_dir=str(ckpt_dir),
            output_dir=str(tmp_path / "logs"),
            channel_multiplier=2,
            num_workers=0,
        )
        wf.initialize()

    with pytest.raises(Exception) as info:
        finetune(exported["archive"], tmp_path / "models")
    assert "does not fit" in _chain(info.value)
    assert [p.name for p in (tmp_path / "models").rglob("*") if p.name != ".lock"] == []
    assert not (tmp_path / "logs").exists()
    truncated = tmp_path / f"{NAME}_v9.9.9.zip"
    truncated.write_bytes(exported["archive"].read_bytes()[:5000])
    with pytest.raises(Exception) as info:
        finetune(truncated, tmp_path / "models2")
    text = _chain(info.value)
    assert str(truncated) in text and "truncated" in text, text


def test_source_of_another_architecture_is_a_clear_error(exported, tmp_path):
    archive = exported["archive"]
    with pytest.raises(ValueError, match=rf"{archive.name}.*does not fit.*channel_multiplier"):
        pretrained.resolve_pretrained(str(archive), tmp_path, network=_tiny_net(multiplier=2))
    # a plain checkpoint, a ckpt_dir and a bundle folder are sources too
    torch.save(exported["state"], tmp_path / "model.pt")
    fit = _tiny_net()
    assert pretrained.resolve_pretrained(str(tmp_path / "model.pt"), tmp_path, fit) == str(
        tmp_path / "model.pt"
    )
    assert pretrained.resolve_pretrained(str(tmp_path), tmp_path, fit) == str(tmp_path / "model.pt")
    displacement = networks.GradientRegNet(
        in_channels=3, channel_multiplier=1, downsample=1, head_type="displacement"
    )
    with pytest.raises(ValueError, match="head_type gradient: pass --head_type gradient"):
        pretrained.resolve_pretrained(str(tmp_path / "model.pt"), tmp_path, displacement)
    with pytest.raises(FileNotFoundError, match="no_such.zip"):
        pretrained.resolve_pretrained(str(tmp_path / "no_such.zip"), tmp_path)
    with pytest.raises(ValueError, match="only file:// and https://"):
        pretrained.resolve_pretrained("ftp://host/x.zip", tmp_path)


def test_export_refuses_what_it_cannot_publish_honestly(exported, tmp_path):
    tmp = exported["tmp"]
    model, evaluation = str(tmp / "checkpoint_epoch=3.pt"), str(tmp / "evaluation" / "metrics.json")
    common = {"model": model, "data": "tiny", "out": str(tmp_path)}
    with pytest.raises(ExportError, match="no measured validation figures"):
        export("registration", **common)
    with pytest.raises(ExportError, match="'_v'"):
        export("registration", metrics=evaluation, name="reg_v2", **common)
    with pytest.raises(ExportError, match="channel_multiplyer: the registration weights record"):
        export("registration", metrics=evaluation, channel_multiplyer=1, model=model, data="tiny")
    with pytest.raises(ExportError, match="exists"):
        export("registration", metrics=evaluation, version=VERSION, **{**common, "out": str(tmp / "dist")})
    with pytest.raises(ExportError, match="registration_baseline is not done"):  # nothing ran in tmp_path
        export("registration", stage="registration_baseline", pipeline="tiny", work=str(tmp_path), data="x")
    fields = tmp_path / "fields.json"  # an evaluation of a folder of fields is not this network's
    fields.write_text(json.dumps({"summary": {"num_pairs": 2, "dice": 0.4}, "method": "fields: /x"}))
    with pytest.raises(ExportError, match="not a network"):
        export("registration", metrics=str(fields), **common)
    # settings the weights record are not taken from the command line (they could only disagree)
    with pytest.raises(ExportError, match="channel_multiplier: the registration weights record"):
        export("registration", metrics=evaluation, **{**common, "channel_multiplier": 2})
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob(".*"))


def test_segmentation_export_carries_the_narrow_unet(tmp_path):
    """The segmentation bundle exports the same way; network_def sub-keys given as MONAI overrides are stamped."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    unet = UNet(3, 1, 14, channels=[8, 16, 32], strides=[2, 2], num_res_units=1, norm="instance")
    torch.save(unet.state_dict(), tmp_path / "model.pt")
    dice = {
        "mean_dice": 0.41,
        "per_organ": {"spleen": 0.6, "right kidney": None},
        "per_case": {"a": {}, "b": {}},
    }
    (tmp_path / "dice_per_organ.json").write_text(json.dumps(dice))
    archive = export(
        "segmentation",
        model=str(tmp_path / "model.pt"),
        metrics=str(tmp_path / "dice_per_organ.json"),
        data="tiny synthetic cohorts",
        out=str(tmp_path / "dist"),
        **{
            "network_def#channels": [8, 16, 32],
            "network_def#strides": [2, 2],
            "network_def#num_res_units": 1,
        },
    )
    name = "abdominal_ct_segmentation"
    with zipfile.ZipFile(archive) as zf:
        inference = json.loads(zf.read(f"{name}/configs/inference.json"))
        meta = json.loads(zf.read(f"{name}/configs/metadata.json"))
    assert (
        inference["network_def"]["channels"] == [8, 16, 32] and inference["network_def"]["num_res_units"] == 1
    )
    assert meta["eval_metrics"] == {"val_mean_dice": 0.41, "val_dice_spleen": 0.6, "val_num_cases": 2}


def test_register_one_pair_with_an_exported_archive(exported, tiny_cohorts, tmp_path, monkeypatch):
    """`abdoreg register --bundle <archive>`: the archive's own network (its recorded grid: 6 mm, 48x40x64) on a
    raw pair, extracted once into the cache."""
    monkeypatch.setenv("ABDOREG_CACHE", str(tmp_path / "cache"))
    raw = tiny_cohorts / "AbdomenCTCT" / "imagesTr"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "abdoreg.cli", "register", str(raw / "AbdomenCTCT_0001_0000.nii.gz"),
           str(raw / "AbdomenCTCT_0002_0000.nii.gz"), "--bundle", str(exported["archive"]), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**ENV, "ABDOREG_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "instance_opt_start" not in proc.stdout, "the archive's weights were not used"
    (field,) = (out / "submission").iterdir()
    assert nib.load(field).shape == (48, 40, 64, 3)
    extracted = list((tmp_path / "cache" / "bundles").iterdir())
    assert len(extracted) == 1 and (extracted[0] / NAME / "models" / "model.pt").is_file()
