"""Exact outputs and clear failures of the registration bundle: no lost checkpoint, no silent wrong
result, errors that name the file. The inference configs run in this process (``ConfigParser``, as
``monai.bundle run`` builds them) to stay cheap; a stand-in network returns a KNOWN displacement so
that an axis, sign or unit error anywhere between the network and the written files shows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from tests.bundle_import import REPO, bundle_dir, import_bundle_module, run_bundle
from tests.registration.test_inference import _scan

F = import_bundle_module("registration", "scripts.fields")
S = import_bundle_module("registration", "scripts.syn")
M = import_bundle_module("registration", "scripts.metrics")
training = import_bundle_module("registration", "scripts.training")
data = import_bundle_module("registration", "scripts.data")
networks = import_bundle_module("registration", "scripts.networks")
ckpts = import_bundle_module("registration", "scripts.checkpoints")
weights = import_bundle_module("registration", "scripts.weights")
errors = import_bundle_module("registration", "scripts.errors")

ROOT = bundle_dir("registration")
CONFIGS = ROOT / "configs"
SHIFT = (2.0, -3.0, 1.0)  # voxels along array axes 0, 1, 2: distinct magnitudes and signs
# voxel axes -> world: a flipped, permuted, anisotropic grid (axis 1 runs along z, axis 2 along -y)
AFFINE = np.array([[-3.0, 0, 0, 40.0], [0, 0, -5.0, 60.0], [0, 4.0, 0, -80.0], [0, 0, 0, 1]])


class ShiftNet(torch.nn.Module):
    """Stand-in network: the same displacement (voxels, one value per array axis) everywhere."""

    def __init__(self, shift=SHIFT) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift.expand(x.shape[0], 3, *x.shape[2:]).clone()


def shift_net(shift=SHIFT) -> dict:
    return {
        "_target_": "tests.registration.test_exact_outputs_and_clear_failures.ShiftNet",
        "shift": list(shift),
    }


def run_configs(configs: list[str], overrides: dict) -> None:
    """Build and run registration configs here, as ``monai.bundle run`` would (no stand-in checkpoint)."""
    import_bundle_module("registration", "scripts.writer")  # this bundle's ``scripts`` for the config
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser["bundle_root"] = str(ROOT)
    parser["require_checkpoint"] = False
    parser["write_qc"] = False
    for key, value in overrides.items():
        parser[key] = value
    parser.get_parsed_content("run")


def error_text(exc: BaseException) -> str:
    """Messages of an exception and of its causes (MONAI wraps errors raised in config expressions)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def write_pairs(path: Path, pairs: list[dict], key: str = "registration_test") -> Path:
    path.write_text(json.dumps({key: pairs}))
    return path


# ---------------------------------------------------------------------------------------------
# a pair related by a known shift: fixed(x) = moving(x + SHIFT)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shift_pair(tiny_preprocessed, tmp_path_factory) -> Path:
    """``images/``+``labels/`` of a tiny L2R case (moving) and of it moved by ``-SHIFT`` (fixed), on ``AFFINE``."""
    data = json.loads(Path(tiny_preprocessed).read_text())
    case = data["registration_val"][0]["moving"]
    root = Path(tiny_preprocessed).parent
    img = np.asarray(nib.load(root / case).dataobj).astype(np.int16)
    lab = np.asarray(nib.load(root / case.replace("images", "labels")).dataobj).astype(np.uint8)
    out = tmp_path_factory.mktemp("shift")
    d, h, w = img.shape
    src = (slice(2, d), slice(0, h - 3), slice(1, w))  # x + SHIFT for x in dst
    dst = (slice(0, d - 2), slice(3, h), slice(0, w - 1))
    for name, arr, fill in (("images", img, -1024), ("labels", lab, 0)):
        fixed = np.full_like(arr, fill)
        fixed[dst] = arr[src]
        (out / name).mkdir()
        nib.save(nib.Nifti1Image(fixed, AFFINE), out / name / "ShiftCT_0001_0000.nii.gz")
        nib.save(nib.Nifti1Image(arr, AFFINE), out / name / "ShiftCT_0002_0000.nii.gz")
    pair = {"fixed": "images/ShiftCT_0001_0000.nii.gz", "moving": "images/ShiftCT_0002_0000.nii.gz"}
    write_pairs(out / "pairs.json", [pair])
    return out


@pytest.fixture(scope="module")
def shifted_run(shift_pair, tmp_path_factory) -> Path:
    """inference.json with the stand-in network returning SHIFT, every output on."""
    out = tmp_path_factory.mktemp("shift_inference")
    run_configs(
        ["inference.json"],
        {
            "network_def": shift_net(),
            "pairs_file": str(shift_pair / "pairs.json"),
            "output_dir": str(out),
            "write_qc": True,
        },
    )
    return out


TAG = "0001_0000_0002_0000"


def test_known_shift_fields_images_and_metrics(shift_pair, shifted_run):
    """a known non-zero displacement comes out right in voxels, in mm (ITK), in the warped
    image and labels, and in the metrics."""
    fixed = nib.load(shift_pair / "images/ShiftCT_0001_0000.nii.gz")
    fixed_lab = np.asarray(nib.load(shift_pair / "labels/ShiftCT_0001_0000.nii.gz").dataobj)
    moving = nib.load(shift_pair / "images/ShiftCT_0002_0000.nii.gz")
    # Learn2Reg field: voxels, (D, H, W, 3), component i = displacement along array axis i
    field = nib.load(shifted_run / "submission" / f"disp_{TAG}.nii.gz").get_fdata()
    assert field.shape == (*fixed.shape, 3)
    np.testing.assert_array_equal(field.reshape(-1, 3), np.broadcast_to(SHIFT, (field[..., 0].size, 3)))
    # ITK transform: mm in LPS, fixed point -> moving point = A @ shift for this permuted, flipped grid
    pair_dir = shifted_run / "pairs" / TAG
    itk_field = nib.load(pair_dir / "itk_displacement.nii.gz").get_fdata()[:, :, :, 0, :]
    expected_lps = np.diag([-1.0, -1.0, 1.0]) @ AFFINE[:3, :3] @ np.asarray(SHIFT)  # (6, 20, -5) RAS -> LPS
    np.testing.assert_allclose(
        itk_field.reshape(-1, 3), np.broadcast_to(expected_lps, (itk_field[..., 0].size, 3))
    )

    # ANTs applying that transform to the moving scan gives the fixed scan (it is fixed moved by -SHIFT)
    def ants_warp(onto: nib.Nifti1Image, image: nib.Nifti1Image, transform: str) -> np.ndarray:
        """``image`` resampled onto ``onto``'s grid by antsApplyTransforms with the pair's ITK ``transform``."""
        return ants.apply_transforms(
            fixed=S.to_ants(onto.get_fdata().astype(np.float32), onto.affine),
            moving=S.to_ants(image.get_fdata().astype(np.float32), image.affine),
            transformlist=[str(pair_dir / transform)],
            defaultvalue=-1024,
        ).numpy()

    res = ants_warp(fixed, moving, "itk_displacement.nii.gz")
    inner = (slice(1, -3), slice(4, -1), slice(1, -2))
    np.testing.assert_allclose(res[inner], fixed.get_fdata()[inner], atol=1e-2)
    # warped image and labels: exactly the fixed ones (integer shift), with the fixed affine
    warped = nib.load(pair_dir / "warped_image.nii.gz")
    np.testing.assert_array_equal(warped.get_fdata(), fixed.get_fdata())
    np.testing.assert_allclose(warped.affine, AFFINE, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nib.load(pair_dir / "warped_label.nii.gz").dataobj), fixed_lab)
    # metrics: every organ overlaps perfectly, the field is a rigid shift (no folding)
    metrics = json.loads((pair_dir / "metrics.json").read_text())
    assert metrics["dice"] == 1.0 and metrics["hd95"] == 0.0 and metrics["dice_initial"] < 0.8
    assert metrics["sdlogj"] == pytest.approx(0.0, abs=1e-9) and metrics["fold_fraction"] == 0.0
    # the inverse: -SHIFT in voxels (moving -> fixed), and in mm through ITK, which maps moving points to fixed ones
    inverse = nib.load(pair_dir / "disp_inverse.nii.gz").get_fdata()
    np.testing.assert_allclose(
        inverse.reshape(-1, 3), np.broadcast_to(-np.asarray(SHIFT), (inverse[..., 0].size, 3)), atol=1e-3
    )
    itk_inverse = nib.load(pair_dir / "itk_inverse_displacement.nii.gz").get_fdata()[:, :, :, 0, :]
    np.testing.assert_allclose(
        itk_inverse.reshape(-1, 3), np.broadcast_to(-expected_lps, (itk_inverse[..., 0].size, 3)), atol=1e-2
    )
    back = ants_warp(moving, fixed, "itk_inverse_displacement.nii.gz")
    inner_m = (
        slice(3, -1),
        slice(1, -4),
        slice(2, -1),
    )  # where the moving scan's content is in the fixed one
    np.testing.assert_allclose(back[inner_m], moving.get_fdata()[inner_m], atol=1e-2)
    assert metrics["ic_mean_mm"] == pytest.approx(0.0, abs=1e-2) and metrics["ic_p95_mm"] < 0.05
    assert metrics["qc_flags"] == "" and metrics["image_overlap"] > 0.9


def test_known_shift_from_a_field_folder(shift_pair, shifted_run, tmp_path):
    """the same shift read from a folder of Learn2Reg fields is scored the same."""
    fields = tmp_path / "fields"
    shape = nib.load(shift_pair / "images/ShiftCT_0001_0000.nii.gz").shape
    F.save_field(fields / f"disp_{TAG}.npz", np.broadcast_to(SHIFT, (*shape, 3)).astype(np.float32))
    out = tmp_path / "scored"
    run_configs(
        ["inference.json", "evaluate.json", "field_folder.json"],
        {
            "pairs_file": str(shift_pair / "pairs.json"),
            "pairs_key": "registration_test",
            "field_dir": str(fields),
            "output_dir": str(out),
        },
    )
    scored = json.loads((out / "metrics.json").read_text())["cases"][0]
    network = json.loads((shifted_run / "pairs" / TAG / "metrics.json").read_text())
    assert scored["dice"] == 1.0
    for key in ("dice", "dice_initial", "hd95", "hd95_mm", "sdlogj"):
        assert scored[key] == pytest.approx(network[key])


def test_inference_docs_list_the_written_files(shifted_run):
    """every path in the docs' inference output table is where inference writes it (a bare
    file name after a path in the same cell is in that path's folder, as a reader takes it)."""
    text = (ROOT / "docs" / "README.md").read_text()
    table = text.split("Outputs (each file written atomically):", 1)[1].split("\n\n", 2)[1]
    documented = []
    for row in table.splitlines()[2:]:
        folder = ""
        for path in re.findall(r"`([^`]+)`", row.split("|")[1]):
            folder = str(Path(path).parent) if "/" in path else folder
            documented.append(path if "/" in path else str(Path(folder) / path))
    assert len(documented) >= 8
    for path in documented:
        real = path.replace("<tag>", TAG).replace("FFFF_0000_MMMM_0000", TAG)
        assert (shifted_run / real).is_file(), f"docs list {path}, inference wrote no {real}"


def test_output_switches_as_the_command_line_passes_them():
    """``--write_inverse false`` (text: MONAI's command line passes it so) drops the inverse steps, and the timing
    handler is there only with ``--benchmark True``."""
    import_bundle_module("registration", "scripts.postprocessing")
    for value, inverse in (("false", False), (False, False), ("True", True), (True, True)):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "inference.json"))
        parser.update({"bundle_root": str(ROOT), "write_inverse": value, "benchmark": value})
        steps = [type(t).__name__ for t in parser.get_parsed_content("postprocessing").transforms]
        assert ("InverseDdfd" in steps and "InverseConsistencyd" in steps) == inverse, (value, steps)
        assert (parser.get_parsed_content("pair_handlers#0") is not None) == inverse, value


# ---------------------------------------------------------------------------------------------
# raw pairs: centre alignment from the original geometry
# ---------------------------------------------------------------------------------------------
def test_same_scan_other_orientation_registers_to_itself(tmp_path):
    """one scan given RAS-stored and LPS-stored at the same world position: identity Dice 1.0,
    with centre alignment on and a grid whose crop moves the fixed centre by half a voxel."""
    _scan(tmp_path / "img_f.nii.gz", False, (4.0, 4.0, 4.0), (40, 32, 48), (10, -20, 30))
    _scan(tmp_path / "img_m.nii.gz", True, (4.0, 4.0, 4.0), (40, 32, 48), (10, -20, 30))
    out = tmp_path / "out"
    run_configs(
        ["inference.json"],
        {
            "network_def": shift_net((0.0, 0.0, 0.0)),
            "fixed": str(tmp_path / "img_f.nii.gz"),
            "moving": str(tmp_path / "img_m.nii.gz"),
            "fixed_label": str(tmp_path / "lab_f.nii.gz"),
            "moving_label": str(tmp_path / "lab_m.nii.gz"),
            "preprocessed": False,
            "pixdim": [4.0, 4.0, 4.0],
            "spatial_size": [37, 31, 45],
            "output_dir": str(out),
        },
    )
    metrics = json.loads((out / "pairs" / "img_f_img_m" / "metrics.json").read_text())
    assert metrics["dice"] == 1.0


# ---------------------------------------------------------------------------------------------
# bad pair lists: refused before anything is written, naming the files
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_scans(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    for sub in ("p1", "p2"):
        (root / sub).mkdir()
    _scan(root / "p1" / "img_ct.nii.gz", False, (6.0, 6.0, 6.0), (20, 16, 24), (0, 0, 0))
    _scan(root / "p2" / "img_ct.nii.gz", False, (6.0, 6.0, 6.0), (20, 16, 24), (0, 0, 0), offset=(6, 0, 0))
    _scan(root / "img_m.nii.gz", False, (6.0, 6.0, 6.0), (20, 16, 24), (0, 0, 0), offset=(0, 6, 0))
    _scan(root / "img_lps.nii.gz", True, (6.0, 6.0, 6.0), (20, 16, 24), (0, 0, 0))
    return root


def _refused(small_scans: Path, tmp_path: Path, pairs: list[dict]) -> tuple[str, Path]:
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        run_configs(
            ["inference.json"],
            {
                "network_def": shift_net(),
                "pairs_file": str(write_pairs(tmp_path / "pairs.json", pairs)),
                "output_dir": str(out),
            },
        )
    return error_text(info.value), out


def test_same_file_names_in_two_folders_are_refused(small_scans, tmp_path):
    """two pairs that would get the same output names are refused before the first is written."""
    pairs = [{"fixed": f"{s}/img_ct.nii.gz", "moving": "img_m.nii.gz"} for s in ("p1", "p2")]
    pairs = [{k: str(small_scans / v) for k, v in p.items()} for p in pairs]
    text, out = _refused(small_scans, tmp_path, pairs)
    assert str(small_scans / "p1/img_ct.nii.gz") in text and str(small_scans / "p2/img_ct.nii.gz") in text
    assert not out.exists()


def test_missing_file_is_found_before_the_first_pair(small_scans, tmp_path):
    """a pair list naming a missing file stops before the first (good) pair is registered."""
    missing = str(small_scans / "img_gone.nii.gz")
    pairs = [
        {"fixed": str(small_scans / "p1/img_ct.nii.gz"), "moving": str(small_scans / "img_m.nii.gz")},
        {"fixed": str(small_scans / "p2/img_ct.nii.gz"), "moving": missing},
    ]
    text, out = _refused(small_scans, tmp_path, pairs)
    assert missing in text and not out.exists()


def test_preprocessed_pair_on_another_grid_is_refused(small_scans, tmp_path):
    """same shape, other orientation (LPS vs RAS): not registered array to array, both files named."""
    pair = {"fixed": str(small_scans / "p1/img_ct.nii.gz"), "moving": str(small_scans / "img_lps.nii.gz")}
    text, out = _refused(small_scans, tmp_path, [pair])
    assert pair["fixed"] in text and pair["moving"] in text and "preprocessed=False" in text
    assert not (out / "submission").exists()


def test_another_run_into_the_same_output_folder_is_refused_or_replaces_it(small_scans, tmp_path):
    """A second run with other pairs would mix its per-pair files, fields and tables with the first's: refused,
    naming both; ``--overwrite True`` replaces the first run's results, and the zip holds only this run's
    fields. A rerun of the same pairs is allowed."""
    out = tmp_path / "out"
    first = [{"fixed": str(small_scans / "p1/img_ct.nii.gz"), "moving": str(small_scans / "img_m.nii.gz")}]
    second = [{"fixed": str(small_scans / "img_m.nii.gz"), "moving": str(small_scans / "p1/img_ct.nii.gz")}]

    def run(pairs, name, **extra):
        pairs_file = str(write_pairs(tmp_path / f"{name}.json", pairs))
        run_configs(
            ["inference.json"],
            {"network_def": shift_net(), "pairs_file": pairs_file, "output_dir": str(out), **extra},
        )

    run(first, "first")
    run(first, "again")  # the same pairs: a rerun
    with pytest.raises(Exception) as info:
        run(second, "second")
    text = error_text(info.value)
    assert "holds the results of another run" in text and "img_ct.nii.gz" in text and "--overwrite" in text
    assert (out / "pairs" / "img_ct_img_m").is_dir(), "the refused run removed nothing"
    run(second, "second", overwrite=True)
    assert not (out / "pairs" / "img_ct_img_m").exists() and (out / "pairs" / "img_m_img_ct").is_dir()
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert zf.namelist() == ["disp_img_m_img_ct.nii.gz"]
    assert json.loads((out / "metrics.json").read_text())["summary"]["num_pairs"] == 1


def test_an_input_where_an_output_goes_is_refused(small_scans, tmp_path):
    """A scan that lies in the output folders of the run would be overwritten: refused before anything runs."""
    out = tmp_path / "out"
    inside = out / "pairs" / "img_ct_img_m" / "warped_image.nii.gz"
    inside.parent.mkdir(parents=True)
    inside.write_bytes((small_scans / "img_m.nii.gz").read_bytes())
    before = inside.read_bytes()
    text, _ = _refused(
        small_scans, tmp_path, [{"fixed": str(small_scans / "p1/img_ct.nii.gz"), "moving": str(inside)}]
    )
    assert str(inside) in text and "where this run writes its outputs" in text
    assert inside.read_bytes() == before


@pytest.mark.parametrize("bad_id", [262, 200, -1])
def test_label_ids_outside_the_organ_range_are_refused_naming_the_file(small_scans, tmp_path, bad_id):
    """In an int16 label map id 262 would wrap to 6 (the spleen scored and written as liver), and id 200 would
    silently drop an organ from the Dice: both, and negative ids, are an error naming the file and the ids."""
    bad = tmp_path / "lab_bad.nii.gz"
    img = nib.load(small_scans / "p1" / "lab_ct.nii.gz")
    data = np.asarray(img.dataobj).astype(np.int16)
    data[data == 1] = bad_id
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    pairs = [
        {
            "fixed": str(small_scans / "p1" / "img_ct.nii.gz"),
            "moving": str(small_scans / "p2" / "img_ct.nii.gz"),
            "fixed_label": str(bad),
            "moving_label": str(small_scans / "p2" / "lab_ct.nii.gz"),
        }
    ]
    text, out = _refused(small_scans, tmp_path, pairs)
    assert str(bad) in text and str(bad_id) in text and "0..13" in text, text
    assert not (out / "metrics.json").exists()


def test_training_refuses_a_label_map_with_ids_outside_the_organ_range(tiny_preprocessed, tmp_path):
    """The training's label cache (uint8) would wrap id 262 to 6: the case's file is named before training."""
    listing = json.loads(Path(tiny_preprocessed).read_text())
    root = Path(tiny_preprocessed).parent
    case = next(it for it in listing["training"] if it.get("cohort") == "l2r")
    img = nib.load(root / case["label"])
    data = np.asarray(img.dataobj).astype(np.int16)
    data[data == 1] = 262
    bad = tmp_path / "bad_label.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    case["label"] = str(bad)
    for items in listing.values():  # the copy lives elsewhere: every path absolute
        for it in items if isinstance(items, list) else []:
            for k in ("image", "label", "fixed", "moving", "fixed_label", "moving_label"):
                if isinstance(it, dict) and it.get(k) and not Path(it[k]).is_absolute():
                    it[k] = str(root / it[k])
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(listing))
    import_bundle_module("registration", "scripts.data")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["bundle_root"] = str(ROOT)
    parser["datalist"] = str(datalist)
    parser["num_workers"] = 0
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train#case_dataset")
    text = error_text(info.value)
    assert str(bad) in text and "262" in text, text


def test_partial_initial_weights_report_what_was_loaded_and_refuse_another_network(tmp_path, caplog):
    """``--initial_ckpt_strict False`` loads the tensors that fit and says how many; weights of another network
    (the segmentation bundle's U-Net), of which none fits, are refused instead of "Restored all variables"."""
    net = networks.GradientRegNet(in_channels=3, channel_multiplier=1)
    foreign = tmp_path / "unet.pt"
    torch.save(_unet_state(), foreign)
    with pytest.raises(ValueError, match="none of the network's .* tensors"):
        weights.load_initial_weights(str(foreign), net, strict=False)
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("heads.")}
    wider = networks.GradientRegNet(in_channels=3, channel_multiplier=2).state_dict()
    partial["input_block.convs.0.conv.weight"] = wider[
        "input_block.convs.0.conv.weight"
    ]  # a shape that differs
    torch.save(partial, tmp_path / "partial.pt")
    with caplog.at_level("INFO"):
        report = weights.load_initial_weights(str(tmp_path / "partial.pt"), net, strict=False)
    assert (
        "input_block.convs.0.conv.weight" in report["skipped"] and "heads.0.conv.weight" in report["skipped"]
    )
    assert len(report["loaded"]) == len([k for k in net.state_dict() if k != "_extra_state"]) - len(
        report["skipped"]
    )
    assert f"loaded {len(report['loaded'])} of the network's" in caplog.text


def test_a_second_training_into_the_same_checkpoint_folder_is_refused(tiny_preprocessed, tmp_path):
    """Two trainings resuming from and writing into one checkpoint folder would corrupt each other: the second
    is refused, naming the first's PID, before it writes anything."""
    ckpt_dir = tmp_path / "models"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(ckpt_dir)], stdout=subprocess.PIPE, text=True, env=_ENV_TOOLS
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_bundle(
            "registration",
            "train.json",
            {"datalist": str(tiny_preprocessed), "ckpt_dir": str(ckpt_dir), "output_dir": str(tmp_path / "logs"),
             "channel_multiplier": 1, "num_workers": 0, "max_epochs": 1},
            check=False,
            timeout=300,
        )  # fmt: skip
        log = proc.stdout + proc.stderr
        assert proc.returncode != 0 and f"PID {holder.pid}" in log and "in use" in log, log[-3000:]
        assert sorted(p.name for p in ckpt_dir.iterdir()) == [".lock"]
        assert not (tmp_path / "logs").exists(), "the refused training wrote its logs"
    finally:
        holder.kill()
        holder.wait()


# A process that holds a folder's lock (as a running training does) until it is killed.
_HOLDER = "import sys, time; from abdoreg.locks import hold; hold(sys.argv[1], 'a registration training'); print('held', flush=True); time.sleep(600)"
_ENV_TOOLS = {**os.environ, "PYTHONPATH": str(REPO / "tools")}


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _saver(name: str, save_dir: Path, net: torch.nn.Module):
    """The checkpoint saver ``train.json`` configures under ``<name>#checkpoint_saver``: the training
    state (network + optimizer) for ``train``, the best network for ``validate``."""
    raw = json.loads((CONFIGS / "train.json").read_text())[name]["checkpoint_saver"]
    save_dict = {"model": "@net", "optimizer": "@opt"} if name == "train" else {"model": "@net"}
    parser = ConfigParser({"saver": {**raw, "save_dir": str(save_dir), "save_dict": save_dict}})
    parser["net"], parser["opt"] = net, torch.optim.SGD(net.parameters(), lr=0.1)
    return parser.get_parsed_content("saver")


def _killed_save(obj, f, *args, **kwargs):
    """``torch.save`` of a process killed half-way: some bytes, then gone."""
    with open(f, "wb") as fh:
        fh.write(b"PK\x03\x04 half a checkpoint")
    raise KeyboardInterrupt


@pytest.mark.parametrize("name", ["train", "validate"])
def test_checkpoint_killed_while_saving_keeps_the_last_one(name, tmp_path, monkeypatch):
    """a run killed while writing epoch 3's checkpoint (``checkpoint_epoch=N.pt``, or the best
    ``model.pt``) keeps epoch 2's complete file, which a rerun finds."""
    import_bundle_module("registration", "scripts.checkpoints")
    net = torch.nn.Linear(2, 2)
    saver = _saver(name, tmp_path, net)
    engine = Engine(lambda e, b: None)
    engine.state.key_metric_name = "val_mean_dice"

    @engine.on(Events.EPOCH_COMPLETED)
    def metric(e):  # improves every epoch: the best model is saved every epoch
        e.state.metrics["val_mean_dice"] = float(e.state.epoch)

    saver.attach(engine)
    engine.add_event_handler(
        Events.EPOCH_STARTED(once=3), lambda e: monkeypatch.setattr(torch, "save", _killed_save)
    )
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=3)
    monkeypatch.undo()
    kept = tmp_path / ("checkpoint_epoch=2.pt" if name == "train" else "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]
    state = torch.load(kept, weights_only=True)
    torch.testing.assert_close(
        state["model"]["weight"] if name == "train" else state["weight"], net.weight.detach()
    )
    assert kept.stat().st_mode & 0o044  # readable by the group/others as other outputs (umask permitting)
    if name == "train":
        assert ckpts.latest_checkpoint(tmp_path) == str(kept)


def test_rerun_removes_temp_files_and_earlier_checkpoints(tmp_path):
    """temp files of a killed save are removed, and a resumed run's new checkpoint replaces the
    earlier run's (``n_saved`` 1): a later resume cannot pick a stale, higher epoch."""
    killed = tmp_path / ".tmp-999999999-0badc0de"  # a dead process's temp folder, as atomic_write makes them
    killed.mkdir()
    (killed / "checkpoint_epoch=3.pt").write_bytes(b"partial")
    torch.save({"model": {}}, tmp_path / "checkpoint_epoch=2.pt")
    (tmp_path / "checkpoint_epoch=9.pt").write_bytes(b"PK\x03\x04 truncated")  # a torn copy: never picked
    assert ckpts.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=2.pt")
    saver = _saver("train", tmp_path, torch.nn.Linear(2, 2))
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]


@pytest.fixture(scope="module")
def inference_net():
    """The network ``inference.json`` builds from a checkpoint of the bundle's default (at width 1)."""
    import_bundle_module("registration", "scripts.networks")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["bundle_root"] = str(ROOT)
    parser["network_def"] = {
        "_target_": "scripts.networks.GradientRegNet",
        "in_channels": 3,
        "channel_multiplier": 1,
    }
    return parser.get_parsed_content("network_def")


def _unet_state() -> dict:
    from monai.networks.nets import UNet  # the segmentation bundle's network type

    return UNet(3, 1, 14, channels=(4, 8), strides=(2,), num_res_units=2).state_dict()


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("multiplier", "pass --channel_multiplier 2"),
        ("single_window", "pass --multi_window False"),
        ("displacement_heads", "pass --head_type displacement"),
        ("segmentation", "another network"),
        ("truncated", "truncated"),
    ],
)
def test_checkpoint_of_another_architecture_says_what_to_pass(kind, expected, inference_net, tmp_path):
    """which file, which setting differs, what to pass; a training checkpoint or a matching
    model.pt loads."""
    path = tmp_path / "model.pt"
    if kind == "multiplier":
        torch.save(networks.GradientRegNet(in_channels=3, channel_multiplier=2).state_dict(), path)
    elif kind == "single_window":
        torch.save(networks.GradientRegNet(in_channels=1, channel_multiplier=1).state_dict(), path)
    elif kind == "displacement_heads":  # same shapes: only the saved mark tells the two apart
        torch.save(
            networks.GradientRegNet(
                in_channels=3, channel_multiplier=1, head_type="displacement"
            ).state_dict(),
            path,
        )
    elif kind == "segmentation":
        torch.save(_unet_state(), path)
    else:
        torch.save(inference_net.state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(errors.InputError) as info:
        weights.checkpoint_handlers(str(path), inference_net, True, "cpu")
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)
    torch.save({"model": inference_net.state_dict(), "epoch": 3}, tmp_path / "checkpoint_epoch=3.pt")
    assert (
        len(weights.checkpoint_handlers(str(tmp_path / "checkpoint_epoch=3.pt"), inference_net, True, "cpu"))
        == 1
    )


# ---------------------------------------------------------------------------------------------
# training: errors and model selection
# ---------------------------------------------------------------------------------------------
def test_one_case_says_two_are_needed(tiny_preprocessed):
    """no cohort weights and one case: the message says that pairs need two cases."""
    cases = data.load_cases(tiny_preprocessed, "training", cohorts=["l2r"])[:1]
    with pytest.raises(ValueError, match="at least two cases"):
        data.case_weights(cases, None)


def test_model_selection_dice_is_the_evaluation_dice(tiny_preprocessed):
    """the validation Dice that picks model.pt equals the reported evaluation's DSC per organ
    (scripts.metrics: map_coordinates order 0), at ties (half-voxel shifts), at the scan border and on
    a smooth non-identity field of the bundle's network."""
    data = json.loads(Path(tiny_preprocessed).read_text())
    root = Path(tiny_preprocessed).parent
    pair = data["registration_val"][0]
    fixed, moving = (
        np.asarray(nib.load(root / pair[k]).dataobj).astype(np.int64) for k in ("fixed_label", "moving_label")
    )
    shape = fixed.shape
    torch.manual_seed(0)
    net = networks.GradientRegNet(in_channels=1, channel_multiplier=1).eval()
    for head in net.heads:
        torch.nn.init.normal_(head.conv.weight, std=0.3)
    with torch.no_grad():
        smooth = net(torch.rand(1, 2, *shape))[0]
    assert smooth.abs().max() > 1.0
    ties = torch.ones(3, *shape) * torch.tensor([0.5, -0.5, 1.5]).view(3, 1, 1, 1)
    border = torch.ones(3, *shape) * torch.tensor([-0.3, 0.3, 0.0]).view(3, 1, 1, 1)
    for ddf in (ties, border, smooth):
        ours = training.pair_dice(
            torch.as_tensor(moving)[None, None], torch.as_tensor(fixed)[None, None], ddf[None], M.LABELS
        )[0]
        reported = M.organ_dice(fixed, moving, M.warp_labels(moving, ddf), M.LABELS)
        np.testing.assert_array_equal(ours.numpy(), np.asarray(reported, np.float32))


# ---------------------------------------------------------------------------------------------
# ANTs SyN
# ---------------------------------------------------------------------------------------------
SYN_TWICE = """
import json, sys
from monai.bundle import ConfigParser
root, pairs, out, registration = sys.argv[1:5]
for run in ("a", "b"):
    parser = ConfigParser()
    parser.read_config([f"{root}/configs/{c}.json" for c in ("inference", "evaluate", "syn_baseline")])
    parser.update({"bundle_root": root, "datalist": pairs, "output_dir": f"{out}/{run}", "write_qc": False})
    parser["syn_registration"] = json.loads(registration)
    parser.get_parsed_content("run")
"""


def test_seeded_syn_run_is_reproducible(tmp_path):
    """the SyN baseline config run twice with its random_seed writes the same field (in a fresh
    process, as a user runs it: ITK fixes its thread count at the first registration of a process)."""
    import subprocess
    import sys

    from tests.registration.test_fields import SHAPE, blob, oblique_affine
    from tests.registration.test_syn_baseline import FAST_SYN

    aff = oblique_affine()
    fixed = blob()
    moving = np.full(SHAPE, -500.0)
    moving[2:] = fixed[:-2]
    for name, arr in (("Syn_0001_0000", fixed), ("Syn_0002_0000", moving)):
        nib.save(nib.Nifti1Image(arr.astype(np.float32), aff), tmp_path / f"{name}.nii.gz")
    pairs = [{"fixed": "Syn_0001_0000.nii.gz", "moving": "Syn_0002_0000.nii.gz"}]
    pairs_file = write_pairs(tmp_path / "pairs.json", pairs, "registration_val")
    args = [str(ROOT), str(pairs_file), str(tmp_path / "out"), json.dumps(FAST_SYN)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SYN_TWICE, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = (nib.load(tmp_path / "out" / r / "submission" / "disp_0001_0000_0002_0000.nii.gz") for r in "ab")
    assert np.abs(a.get_fdata()).max() > 0.5
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
