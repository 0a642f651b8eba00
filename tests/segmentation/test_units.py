"""Unit tests of the segmentation bundle's plugins: partial-label loss, cohort sampler, pseudo datalist."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_import import import_bundle_module

losses = import_bundle_module("segmentation", "scripts.losses")
data = import_bundle_module("segmentation", "scripts.data")
pseudo = import_bundle_module("segmentation", "scripts.pseudo")
checkpoints = import_bundle_module("segmentation", "scripts.checkpoints")
label_checks = import_bundle_module("segmentation", "scripts.label_checks")

C = 14


def _case(seed: int = 0, shape=(2, C, 6, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, requires_grad=True)
    label = torch.randint(0, C, (shape[0], 1, *shape[2:]), generator=g)
    return logits, label


def _partial(label: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """What a cohort's label map looks like: organs it does not annotate are 0."""
    keep = torch.cat([torch.ones(label.shape[0], 1), annotated], 1).bool()
    return label * keep.gather(1, label.flatten(1)).view_as(label)


ANNOTATED = torch.tensor(
    [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float
)


def test_exclude_mode_zero_gradient_for_unannotated_organs():
    logits, label = _case()
    loss = losses.PartialLabelDiceCELoss(mode="exclude")(logits, _partial(label, ANNOTATED), ANNOTATED)
    loss.backward()
    for b in range(2):
        unannotated = [c + 1 for c in range(13) if ANNOTATED[b, c] == 0]
        annotated = [c + 1 for c in range(13) if ANNOTATED[b, c] == 1]
        assert torch.count_nonzero(logits.grad[b, unannotated]) == 0
        assert logits.grad[b, annotated].abs().sum() > 0 and logits.grad[b, 0].abs().sum() > 0


@pytest.mark.parametrize("mode", ["marginal", "exclude"])
def test_loss_cannot_tell_background_from_unannotated_organ(mode):
    """Zero gradient along every direction that moves probability between background and an
    un-annotated organ: the loss is invariant to any split of the merged background mass."""
    logits, label = _case(1)
    target = _partial(label, ANNOTATED)
    loss_fn = losses.PartialLabelDiceCELoss(mode=mode)
    loss = loss_fn(logits, target, ANNOTATED)
    (grad,) = torch.autograd.grad(loss, logits)
    prob = torch.softmax(logits.detach(), 1)
    for b in range(2):
        merged = [0] + [c + 1 for c in range(13) if ANNOTATED[b, c] == 0]
        if mode == "marginal":
            # d loss / d logit_k = p_k * g(voxel) for every merged class k: same g for background and organ k
            ratio = grad[b, merged] / prob[b, merged]
            torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), atol=1e-5, rtol=1e-4)
        else:
            assert torch.count_nonzero(grad[b, merged[1:]]) == 0
    if mode != "marginal":
        return
    # exact invariance: swap the background logit with an un-annotated organ's (liver for case 0)
    swapped = logits.detach().clone()
    swapped[0, [0, 6]] = swapped[0, [6, 0]]
    torch.testing.assert_close(loss_fn(swapped, target, ANNOTATED), loss.detach(), atol=1e-6, rtol=1e-5)


def test_unannotated_organ_voxels_are_not_punished_as_background():
    """A kidney-only case: predicting liver where the real liver is costs nothing more than predicting background."""
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[..., :2] = 2  # right kidney, annotated
    annotated = torch.zeros(1, 13)
    annotated[0, [1, 2]] = 1
    liver = torch.zeros(1, C, 4, 4, 4)
    liver[:, 2, ..., :2] = 8.0
    background = liver.clone()
    liver[:, 6, ..., 2:] = 8.0  # the net says "liver" in the un-annotated voxels
    background[:, 0, ..., 2:] = 8.0
    loss_fn = losses.PartialLabelDiceCELoss(mode="marginal")
    torch.testing.assert_close(loss_fn(liver, label, annotated), loss_fn(background, label, annotated))
    # ... whereas a fully annotated case would punish it
    full = losses.PartialLabelDiceCELoss()
    assert full(liver, label) > full(background, label) + 1.0


def test_full_annotation_matches_monai_dice_ce():
    from monai.losses import DiceCELoss

    logits, label = _case(2)
    ours = losses.PartialLabelDiceCELoss(batch=True)(logits, label, torch.ones(2, 13))
    ref = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)(logits, label)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_trainer_target_form_and_batch_preparation():
    logits, label = _case(3)
    batch = {"image": torch.rand(2, 1, 6, 5, 7), "label": label, "annotated": ANNOTATED}
    image, target = data.PartialLabelBatch()(batch, torch.device("cpu"))
    loss_fn = losses.PartialLabelDiceCELoss()
    torch.testing.assert_close(loss_fn(logits, target), loss_fn(logits, label, ANNOTATED))


class _Items:
    def __init__(self, items):
        self.data = items

    def __len__(self):
        return len(self.data)


def test_cohort_sampler_weights_and_ranks():
    items = [{"cohort": "l2r"}] * 6 + [{"cohort": "msd_liver"}] * 30 + [{"cohort": "kits"}] * 3
    ds = _Items(items)
    sampler = data.CohortSampler(ds, weights={"l2r": 2.0}, num_samples=8000, seed=1)
    counts = Counter(items[i]["cohort"] for i in sampler)
    assert len(sampler) == 8000
    assert counts["l2r"] / 8000 == pytest.approx(0.5, abs=0.03)  # 2 : 1 : 1 shares, not 6 : 30 : 3
    assert counts["msd_liver"] / 8000 == pytest.approx(0.25, abs=0.03)
    sampler.set_epoch(1)
    assert list(sampler) != list(data.CohortSampler(ds, weights={"l2r": 2.0}, num_samples=8000, seed=1))
    ranks = [data.CohortSampler(ds, num_samples=11, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    whole = list(data.CohortSampler(ds, num_samples=12, num_replicas=1, rank=0, seed=3))
    assert [len(r) for r in ranks] == [6, 6]
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(whole)


def _tiny_datalist(root: Path, **extra) -> Path:
    """Two cohorts on disk: one labelled, one image-only (``extra``: more top-level keys)."""
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    items = []
    for cohort, case, labelled in (("l2r", "A_0001_0000", True), ("msd_colon", "colon_000", False)):
        (root / cohort / "images").mkdir(parents=True)
        nib.save(
            nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), affine),
            root / cohort / "images" / f"{case}.nii.gz",
        )
        item = {
            "image": f"{cohort}/images/{case}.nii.gz",
            "cohort": cohort,
            "case": case,
            "annotated": [0] * 13,
        }
        if labelled:
            (root / cohort / "labels").mkdir(parents=True)
            nib.save(
                nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), affine),
                root / cohort / "labels" / f"{case}.nii.gz",
            )
            item.update(label=f"{cohort}/labels/{case}.nii.gz", annotated=[1] * 13)
        items.append(item)
    pair = {"fixed": items[0]["image"], "moving": items[0]["image"]}
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": items, "validation": [], "registration_val": [pair], **extra}))
    return path


def test_datalist_reading_keeps_cohort_names(tmp_path):
    path = _tiny_datalist(tmp_path)
    items = data.load_datalist(path)
    assert items[0]["cohort"] == "l2r" and Path(items[0]["image"]).is_file()  # not turned into a folder path
    assert [it["cohort"] for it in data.labelled_items(path, "training", 13)] == ["l2r"]
    assert [it["case"] for it in data.image_items(path)] == ["A_0001_0000", "colon_000"]


def test_pseudo_label_writer_and_datalist(tmp_path):
    path = _tiny_datalist(tmp_path / "pre")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        pseudo.write_pseudo_datalist(path, out, 13)
    save = pseudo.SaveLabelMapd(keys="pred", output_dir=out)
    from monai.data import MetaTensor

    for it in data.image_items(path):
        pred = MetaTensor(
            torch.full((1, 8, 8, 8), 3.0), affine=torch.diag(torch.tensor([6.0, 6.0, 6.0, 1.0]))
        )
        result = save({"pred": pred, **it})
        assert Path(result["pseudo"]).is_file()
    written = Path(pseudo.write_pseudo_datalist(path, out, 13))
    new = json.loads(written.read_text())
    assert [p.name for p in out.rglob(".*")] == []  # no temp files left behind
    for item in new["training"]:
        assert item["annotated"] == [1] * 13
        for key in ("image", "pseudo"):
            assert (written.parent / item[key]).is_file()
        lab = nib.load(written.parent / item["pseudo"])
        assert lab.get_data_dtype() == np.uint8 and np.allclose(lab.affine, np.diag([6.0, 6.0, 6.0, 1.0]))
    assert new["training"][1]["label_annotated"] == [0] * 13
    assert (written.parent / new["registration_val"][0]["fixed"]).is_file()


def test_latest_checkpoint(tmp_path):
    assert checkpoints.latest_checkpoint(tmp_path / "none") is None
    for n in (2, 10, 9):
        torch.save({"epoch": n}, tmp_path / f"checkpoint_epoch={n}.pt")
    assert Path(checkpoints.latest_checkpoint(tmp_path)).name == "checkpoint_epoch=10.pt"


def test_outputs_never_leave_the_output_folder(tmp_path):
    """Output names come from the datalist's ``cohort``/``case``: a ``..`` in them is refused, nothing escapes."""
    from monai.data import MetaTensor

    out = tmp_path / "a" / "b" / "out"
    save = pseudo.SaveLabelMapd(keys="pred", output_dir=out)
    pred = MetaTensor(torch.full((1, 4, 4, 4), 1.0), affine=torch.eye(4))
    for cohort, case in (("l2r", "../../../x"), ("..", "x"), ("l2r", "/tmp/x"), ("a/../..", "x")):
        with pytest.raises(ValueError, match="not a plain name"):
            save({"pred": pred, "cohort": cohort, "case": case})
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [], "a file was written"
    path = _tiny_datalist(tmp_path / "pre")
    dl = json.loads(path.read_text())
    dl["training"][1]["case"] = "../../../x"
    path.write_text(json.dumps(dl))
    with pytest.raises(ValueError, match="not a plain name") as err:
        data.image_items(path)
    assert str(path) in str(err.value), "the error names the datalist"


def test_an_image_on_another_grid_than_its_datalist_is_named(tmp_path):
    """A preprocessing re-run with another spacing, killed half-way: reading the datalist names the file."""
    path = _tiny_datalist(tmp_path, pixdim=[6.0, 6.0, 6.0], spatial_size=[8, 8, 8])
    assert len(data.load_datalist(path)) == 2  # consistent: read as before
    moved = tmp_path / "msd_colon" / "images" / "colon_000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 24), np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), moved)
    with pytest.raises(ValueError, match="msd_colon") as err:
        data.image_items(path)
    assert str(moved) in str(err.value) and "(24, 24, 24)" in str(err.value)


@pytest.mark.parametrize("bad_id", [262, 14, -2])
def test_label_ids_outside_the_organ_range_name_the_file(tmp_path, bad_id):
    """A label map with an id outside 0..13 (262 would wrap to 6 in uint8, 14 is no class) is refused with
    its file and the ids, by the transform train.json runs right after loading."""
    from monai.transforms import LoadImaged

    labels = np.zeros((8, 8, 8), np.int16)
    labels[2:4] = 6
    labels[5:7] = bad_id
    path = tmp_path / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), path)
    item = LoadImaged(keys="label", image_only=True)({"label": str(path)})
    with pytest.raises(ValueError) as err:
        label_checks.CheckLabelsd("label", max_label=13)(item)
    assert str(path) in str(err.value) and str(bad_id) in str(err.value)
    labels[5:7] = 13
    nib.save(nib.Nifti1Image(labels, np.eye(4)), path)
    label_checks.CheckLabelsd("label", max_label=13)(
        LoadImaged(keys="label", image_only=True)({"label": str(path)})
    )
