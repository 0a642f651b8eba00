"""Training scans synthesised from real organ label maps: organs kept, body around them, CT-plausible HU,
deterministic, read through (fixed) affines, and written as cohorts the pipeline reads.

Every test but the last makes its own label maps (the phantom's organs, rendered at 6 mm); the last reads
the real maps of ``../shared/realdata`` and skips without them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from abdoreg.synth import PRESETS, generate, realmaps
from abdoreg.synth.anatomy import AnatomySource, grid_axes, synthesise
from abdoreg.synth.body import ALL_TISSUES
from abdoreg.synth.ct_intensity import intensity_table
from abdoreg.synth.phantom import ORGANS, Preset, grid_affine, render, resample_to, sample_subject
from abdoreg.synth.realmaps import load_label_map, map_pools
from tests.bundle_import import REPO

TINY = PRESETS["tiny"]  # 48 x 40 x 64 at 6 mm
MAP_GRID = Preset(6.0, (64, 56, 80))  # the test maps: the phantom's whole body at 6 mm


def _phantom_map(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 13-organ label map drawn by the phantom at full size (its other tissues dropped) and its RAS affine."""
    tissue, _, affine = render(sample_subject(seed, 1.0), MAP_GRID)
    return np.where(tissue <= 13, tissue, 0).astype(np.uint8), affine


def _save(labels: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, affine), path)
    return path


@pytest.fixture(scope="module")
def maps(tmp_path_factory) -> Path:
    """Four phantom-drawn maps (all 13 organs) in a folder, as a user's anatomy folder."""
    folder = tmp_path_factory.mktemp("anatomy")
    for k in range(4):
        _save(*_phantom_map(k + 1), folder / f"subject_{k:02d}.nii.gz")
    return folder


def _centroid_x(labels: np.ndarray, affine: np.ndarray, organ: int) -> float:
    return float((affine @ np.append(np.argwhere(labels == organ).mean(0), 1.0))[0])


def test_organs_are_the_map_resampled_without_augmentation(maps):
    lmap = load_label_map(maps / "subject_00.nii.gz")
    shape = MAP_GRID.shape
    affine = grid_affine(MAP_GRID.spacing, shape)
    scan = synthesise(lmap, affine, shape, seed=5, augment=False)
    organs = np.where(scan.tissue <= 13, scan.tissue, 0)
    # the same map moved by its placement (a translation onto the canonical centroids), resampled independently
    placed = lmap.affine.copy()
    placed[:3, 3] += lmap.placement()
    expected = resample_to(lmap.labels.astype(np.float32), placed, affine, shape, order=0, cval=0).astype(
        np.uint8
    )
    for organ in ORGANS.values():
        a, b = organs == organ, expected == organ
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.99, f"organ {organ}: Dice {dice:.3f} with the resampled map"
        assert abs(a.sum() - (lmap.labels == organ).sum()) <= 0.05 * (lmap.labels == organ).sum() + 2, organ


def test_augmented_subjects_keep_organ_volumes_within_the_scaling(maps):
    lmap = load_label_map(maps / "subject_00.nii.gz")
    affine = grid_affine(TINY.spacing, TINY.shape)
    for seed in range(3):
        scan = synthesise(lmap, affine, TINY.shape, seed=seed)
        for organ in (1, 2, 3, 6):  # large organs; the field of view may cut the others
            before, after = (lmap.labels == organ).sum(), (scan.tissue == organ).sum()
            assert 0.5 * before <= after <= 1.5 * before, (
                f"seed {seed} organ {organ}: {before} -> {after} voxels"
            )


def test_the_body_surrounds_the_organs(maps):
    lmap = load_label_map(maps / "subject_01.nii.gz")
    affine = grid_affine(4.0, (96, 80, 128))  # the full field of view at 4 mm
    scan = synthesise(lmap, affine, (96, 80, 128), seed=2, augment=False)
    t = ALL_TISSUES
    present = set(np.unique(scan.tissue).tolist())
    for name in (
        "subcutaneous_fat",
        "muscle",
        "visceral_fat",
        "bowel",
        "colon",
        "bone",
        "marrow",
        "lung",
        "table",
    ):
        assert t[name] in present, f"no {name}"
    organ = (scan.tissue >= 1) & (scan.tissue <= 13)
    shell = ndimage.binary_dilation(organ, iterations=2) & ~organ
    assert (scan.tissue[shell] == 0).mean() < 0.01, "organs must lie inside the body, not in the air"
    # the spine lies behind the aorta (RAS y: anterior), the lungs above the liver
    axes = grid_axes(affine, scan.tissue.shape)
    y_of = {
        n: axes[1][np.nonzero(scan.tissue == i)[1]].mean() for n, i in (("aorta", 8), ("spine", t["marrow"]))
    }
    assert y_of["spine"] < y_of["aorta"]
    z_lung = axes[2][np.nonzero(scan.tissue == t["lung"])[2]].mean()
    assert z_lung > axes[2][np.nonzero(scan.tissue == 6)[2]].mean()


@pytest.mark.parametrize("intensity", ["ct", "random"])
def test_organ_intensities_are_the_drawn_ones(maps, intensity):
    lmap = load_label_map(maps / "subject_02.nii.gz")
    affine = grid_affine(4.0, (96, 80, 128))
    scan = synthesise(lmap, affine, (96, 80, 128), seed=3, intensity=intensity, augment=False)
    table = intensity_table()
    for name, organ in ORGANS.items():
        core = ndimage.binary_erosion(scan.tissue == organ, iterations=1)
        if core.sum() < 30 or name in ("stomach", "right_kidney", "left_kidney"):  # inner structure
            continue
        mean = scan.look.mean[name]
        median = float(np.median(scan.hu[core]))
        tol = 25 + 2 * scan.look.texture[name]
        assert abs(median - mean) < tol, f"{name}: median {median:.0f} HU, drawn {mean:.0f}"
        if intensity == "ct":
            hu = table["tissues"][name]
            lo = hu["hu"][0] - 4 * hu["sd"]
            hi = hu["hu"][0] + max(table["enhancement_scale"]) * (max(hu["hu"]) - hu["hu"][0]) + 4 * hu["sd"]
            assert lo <= mean <= hi, f"{name}: {mean:.0f} HU outside its CT range {lo:.0f}..{hi:.0f}"
        else:
            assert table["random_hu"][0] <= mean <= table["random_hu"][1]
    if intensity == "ct":
        assert scan.look.phase in table["phases"]
        assert np.median(scan.hu[scan.tissue == ALL_TISSUES["lung"]]) < -600


def test_same_seed_same_scan_other_seed_other_scan(maps):
    lmap = load_label_map(maps / "subject_03.nii.gz")
    affine = grid_affine(TINY.spacing, TINY.shape)
    a, b = (synthesise(lmap, affine, TINY.shape, seed=11, intensity="mixed") for _ in range(2))
    c = synthesise(lmap, affine, TINY.shape, seed=12, intensity="mixed")
    assert np.array_equal(a.tissue, b.tissue) and np.array_equal(a.hu, b.hu)
    assert not np.array_equal(a.tissue, c.tissue) and not np.array_equal(a.hu, c.hu)


def test_a_mirrored_header_is_fixed_on_the_affine_from_the_table(tmp_path, monkeypatch):
    labels, affine = _phantom_map(7)
    # a set whose files store the anatomy mirrored along axis 0 under an RAS header (as the Learn2Reg 2020 maps)
    path = _save(np.ascontiguousarray(labels[::-1]), affine, tmp_path / "mirrored_0001.nii.gz")
    with pytest.raises(ValueError, match=r"mirrored_0001.*mirrored left-right"):
        load_label_map(path)
    table = json.loads(json.dumps(realmaps.realdata_table()))
    table["sets"]["mirrored"] = {"prefix": "mirrored_", "header_fix": {"flip_axes": [0]}, "training": True}
    monkeypatch.setattr(realmaps, "realdata_table", lambda: table)
    lmap = load_label_map(path)
    assert np.array_equal(lmap.labels, labels[::-1]), "the array is kept as stored; only the affine changes"
    truth = load_label_map(_save(labels, affine, tmp_path / "truth.nii.gz"))
    for organ in ORGANS.values():
        assert np.allclose(lmap.centroids[organ], truth.centroids[organ], atol=1e-6)
    grid = grid_affine(TINY.spacing, TINY.shape)
    scan = synthesise(lmap, grid, TINY.shape, seed=1, augment=False)
    assert _centroid_x(scan.tissue, grid, 6) > 0 > _centroid_x(scan.tissue, grid, 1), (
        "liver right, spleen left"
    )
    assert _centroid_x(scan.tissue, grid, 2) > _centroid_x(scan.tissue, grid, 3), "right kidney on the right"


def test_bad_maps_are_named(tmp_path):
    labels, affine = _phantom_map(1)
    bad = labels.astype(np.int16)
    bad[0, 0, 0] = 40
    with pytest.raises(ValueError, match=r"ids40\.nii\.gz: label ids .*outside 0\.\.13"):
        load_label_map(_save(bad, affine, tmp_path / "ids40.nii.gz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no label maps"):
        map_pools(tmp_path / "empty")


def test_cohorts_from_label_maps_in_every_layout(maps, tmp_path):
    cohorts = ("l2r", "msd_liver", "kits", "flare22", "ircadb")
    root = generate(
        tmp_path,
        size="tiny",
        n_l2r=4,
        n_other=1,
        cohorts=cohorts,
        anatomy=maps,
        intensity="mixed",
        log=lambda _: None,
    )
    record = json.loads((root / "ANATOMY.json").read_text())
    assert set(record["validation_maps"]).isdisjoint(record["l2r_maps"]), "validation subjects never train"
    assert set(record["validation_maps"]).isdisjoint(record["other_maps"])
    meta = json.loads((root / "AbdomenCTCT" / "AbdomenCTCT_dataset.json").read_text())
    assert len(meta["training"]) == 4 and len(meta["registration_val"]) == 1
    lab = np.asarray(nib.load(root / "AbdomenCTCT" / meta["training"][1]["label"]).dataobj)
    assert set(np.unique(lab).tolist()) >= {1, 2, 3, 6, 8, 10}
    flare = json.loads((root / "FLARE22" / "dataset.json").read_text())
    flare_lab = np.asarray(nib.load(root / "FLARE22" / flare["training"][0]["label"]).dataobj)
    assert set(np.unique(flare_lab).tolist()) <= set(range(14)) - {12}
    ircadb = np.asarray(nib.load(root / "IRCADb" / "labels" / "ircadb_01.nii.gz").dataobj)
    assert set(np.unique(ircadb).tolist()) <= {0, 4, 6} and (ircadb == 6).any()
    msd = np.asarray(nib.load(root / "Task03_Liver" / "labelsTr" / "liver_000.nii.gz").dataobj)
    assert set(np.unique(msd).tolist()) == {0, 1, 2}, "liver and its tumour"
    assert (root / "kits19" / "data" / "case_00000" / "imaging.nii.gz").exists()
    # a rerun reuses the recorded pools and keeps the scans; the phantom may not write into this folder
    before = (root / "AbdomenCTCT" / meta["training"][0]["image"]).stat().st_mtime
    generate(
        tmp_path, size="tiny", n_l2r=4, cohorts=("l2r",), anatomy=maps, intensity="mixed", log=lambda _: None
    )
    assert (root / "AbdomenCTCT" / meta["training"][0]["image"]).stat().st_mtime == before
    with pytest.raises(ValueError, match="ANATOMY.json"):
        generate(tmp_path, size="tiny", n_l2r=4, cohorts=("l2r",), log=lambda _: None)
    with pytest.raises(ValueError, match="synthesised from"):
        generate(
            tmp_path, size="tiny", n_l2r=4, cohorts=("l2r",), anatomy=maps, intensity="ct", log=lambda _: None
        )


def test_intensity_modes_need_label_maps(tmp_path):
    with pytest.raises(ValueError, match="needs real label maps"):
        generate(tmp_path, cohorts=("l2r",), intensity="random", log=lambda _: None)
    with pytest.raises(ValueError, match="unknown intensity mode"):
        AnatomySource(tmp_path, intensity="mri")


def _realdata() -> Path | None:
    for folder in (
        os.environ.get("ABDOREG_REALDATA"),
        REPO.parent / "shared" / "realdata",
        REPO.parent.parent / "shared" / "realdata",  # a git worktree beside the main clone
    ):
        if folder and (Path(folder) / "labelmaps").is_dir():
            return Path(folder)
    return None


@pytest.mark.skipif(
    _realdata() is None, reason="the real label maps (../shared/realdata, docs/realdata.md) are absent"
)
def test_real_maps_sides_pools_and_one_scan():
    folder = _realdata() / "labelmaps"
    pools = map_pools(folder)
    names = {p.name for p in pools.validation + pools.l2r + pools.other}
    assert "ircadb_17.nii.gz" not in names and not any(n.startswith("ircadb_") for n in names)
    assert not {p.name for p in pools.validation} & {p.name for p in pools.l2r + pools.other}
    assert all(not p.name.startswith("flare22_") for p in pools.l2r), "FLARE22 has no portal vein"
    for name in ("l2rabdct_0001", "flare22_0001", "tseg_s0001"):  # the header fix makes every set agree
        lmap = load_label_map(folder / f"{name}.nii.gz")
        assert lmap.centroids[6][0] > lmap.centroids[1][0] and lmap.centroids[2][0] > lmap.centroids[3][0], (
            name
        )
    raw = nib.load(folder / "l2rabdct_0001.nii.gz")
    assert np.allclose(raw.affine, np.diag([2.0, 2.0, 2.0, 1.0])), (
        "the stored (wrong) header is kept in the file"
    )
    grid = grid_affine(TINY.spacing, TINY.shape)
    scan = synthesise(load_label_map(folder / "l2rabdct_0001.nii.gz"), grid, TINY.shape, seed=0)
    assert _centroid_x(scan.tissue, grid, 6) > _centroid_x(scan.tissue, grid, 1)


def test_the_cli_and_the_pipeline_step_pass_the_anatomy_on(maps, tmp_path):
    from abdoreg import cli, steps

    out = cli.synth(
        out=str(tmp_path / "cli"), size="tiny", n_l2r=3, cohorts="l2r", anatomy=str(maps), intensity="random"
    )
    assert json.loads((Path(out) / "ANATOMY.json").read_text())["intensity"] == "random"
    steps.synth(
        lambda _: None,
        str(tmp_path / "step"),
        size="tiny",
        n_l2r="3",
        cohorts="l2r,ircadb",
        anatomy=str(maps),
    )
    assert (tmp_path / "step" / "IRCADb" / "labels" / "ircadb_03.nii.gz").exists()
    assert json.loads((tmp_path / "step" / "ANATOMY.json").read_text())["anatomy"] == str(maps.resolve())
