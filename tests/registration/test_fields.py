"""Field formats and geometry: a known translation and a known affine come back with the right
direction as Learn2Reg voxels and as an ITK/ANTs physical transform on an oblique, LPS-flipped grid."""

from __future__ import annotations

import ants
import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from tests.bundle_import import import_bundle_module

F = import_bundle_module("registration", "scripts.fields")
S = import_bundle_module("registration", "scripts.syn")

SHAPE = (30, 26, 34)
INNER = (slice(4, -4),) * 3


def oblique_affine() -> np.ndarray:
    """Non-diagonal affine with flipped first two axes (an LPS-stored scan), anisotropic spacing."""
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix() @ np.diag(
        [-3.0, -2.5, 2.0]
    )
    aff[:3, 3] = [10.0, -20.0, 30.0]
    return aff


def blob(centre=(13, 12, 18)) -> np.ndarray:
    g = np.indices(SHAPE).astype(float)
    c = np.asarray(centre, float)[:, None, None, None]
    return np.exp(-(((g - c) ** 2) / np.array([20.0, 30.0, 40.0])[:, None, None, None]).sum(0)) * 1000 - 500


def scipy_warp(moving: np.ndarray, field: np.ndarray, cval: float) -> np.ndarray:
    """Linear ``moving(x + u(x))`` with scipy ``map_coordinates`` and a Learn2Reg field (the evaluator's convention)."""
    coords = np.indices(moving.shape, dtype=np.float64) + np.moveaxis(np.asarray(field, np.float64), -1, 0)
    return map_coordinates(moving.astype(np.float32), coords, order=1, mode="constant", cval=cval)


def warp(moving: np.ndarray, field: np.ndarray, cval: float = -500.0) -> np.ndarray:
    """The product's image warp (``fields.warp_image``) of a numpy image by a Learn2Reg field."""
    return F.warp_image(
        torch.as_tensor(moving, dtype=torch.float32), F.field_to_ddf(field), cval=cval
    ).numpy()


def ants_warp(image: np.ndarray, transform, aff: np.ndarray) -> np.ndarray:
    """``image`` (on the grid ``aff``) warped by antsApplyTransforms with the ITK transform file ``transform``."""
    return ants.apply_transforms(
        fixed=S.to_ants(np.zeros(SHAPE), aff),
        moving=S.to_ants(image, aff),
        transformlist=[str(transform)],
        defaultvalue=-500,
    ).numpy()


def test_names_and_lookup(tmp_path):
    f, m = "imagesTr/AbdomenCTCT_0001_0000.nii.gz", "imagesTr/AbdomenCTCT_0004_0000.nii.gz"
    assert F.field_name(f, m) == "disp_0001_0000_0004_0000.nii.gz"
    assert F.field_name(f, m, short=True, ext=".npz") == "disp_0001_0004.npz"
    assert F.field_name("a.nii.gz", "b.nii.gz") == "disp_a_b.nii.gz"
    (tmp_path / "disp_0001_0004.nii.gz").touch()
    assert F.find_field(tmp_path, f, m).name == "disp_0001_0004.nii.gz"
    # short names are not accepted for suffixes 0001 -> 0000 (official rule)
    with pytest.raises(FileNotFoundError):
        F.find_field(tmp_path, "x/AbdomenCTCT_0001_0001.nii.gz", "x/AbdomenCTCT_0004_0000.nii.gz")


def test_roundtrip_formats(tmp_path):
    ddf = torch.randn(1, 3, 6, 5, 4)
    field = F.ddf_to_field(ddf)
    assert field.shape == (6, 5, 4, 3)
    torch.testing.assert_close(F.field_to_ddf(field), ddf[0])
    # the ddf every output is computed from is the written field, rounded as its file stores it
    np.testing.assert_array_equal(F.ddf_to_field(F.as_written(ddf[0])), field.astype(np.float16))
    for name in ("disp.nii.gz", "disp.npz"):
        F.save_field(tmp_path / name, field, dtype="float16")
        back = F.load_field(tmp_path / name)
        np.testing.assert_allclose(back, field.astype(np.float16).astype(np.float64), rtol=0, atol=0)
    with np.load(tmp_path / "disp.npz") as z:
        assert z.files == ["arr_0"] and z["arr_0"].dtype == np.float16


def test_gzipped_nifti_is_the_file_nibabel_writes(tmp_path):
    """The fast gzip path writes a standard gzip stream whose content is byte for byte the .nii nibabel writes,
    so every NIfTI reader (nibabel, ITK, ANTs, the Learn2Reg evaluator) reads the same file."""
    import gzip

    values = np.random.default_rng(0).normal(size=(7, 6, 5, 1, 3)).astype(np.float32)
    aff = oblique_affine()
    F.save_nifti(tmp_path / "fast.nii.gz", values, aff, intent="vector")
    F.save_nifti(tmp_path / "plain.nii", values, aff, intent="vector")
    raw = (tmp_path / "plain.nii").read_bytes()
    assert gzip.decompress((tmp_path / "fast.nii.gz").read_bytes()) == raw
    back = nib.load(tmp_path / "fast.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), values)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert back.header.get_intent()[0] == "vector"


def test_monai_warp_matches_l2r_convention():
    """MONAI ``Warp`` with the ddf (and the product's image warp) and scipy map_coordinates with the L2R field give
    the same image."""
    moving = blob()
    field = np.zeros((*SHAPE, 3), np.float32)
    field[..., 0], field[..., 2] = 2.0, -1.5
    ours = scipy_warp(moving, field, cval=-500)
    mon = Warp(mode="bilinear", padding_mode="border")(
        torch.from_numpy(moving[None, None].astype(np.float32)), F.field_to_ddf(field)[None]
    )[0, 0].numpy()
    np.testing.assert_allclose(mon[INNER], ours[INNER], atol=1e-2)
    np.testing.assert_allclose(warp(moving, field)[INNER], ours[INNER], atol=1e-2)


@pytest.mark.parametrize("convention", ["ants", "nifti"])
def test_known_translation_both_formats(tmp_path, convention):
    aff = oblique_affine()
    moving = blob()
    field = np.zeros((*SHAPE, 3))
    field[..., 0] = 2.0  # warped(x) = moving(x + 2 e0): the blob moves by -2 voxels along axis 0
    warped = warp(moving, field)
    assert np.unravel_index(np.argmax(warped), SHAPE) == (11, 12, 18)

    path = F.save_itk_displacement(tmp_path / "tx.nii.gz", field, aff, convention=convention)
    hdr = nib.load(path).header
    assert hdr.get_intent()[0] == ("vector" if convention == "ants" else "displacement vector")
    np.testing.assert_allclose(nib.load(path).affine, aff, atol=1e-5)
    stored = nib.load(path).get_fdata()[..., 0, :]
    expected_ras = aff[:3, :3] @ np.array([2.0, 0, 0])
    expected = F.RAS_TO_LPS @ expected_ras if convention == "ants" else expected_ras
    np.testing.assert_allclose(stored[5, 6, 7], expected, atol=1e-4)

    # ITK maps the fixed point to the moving point (LPS)
    disp = itk.imread(str(path), itk.Vector[itk.F, 3])
    tx = itk.DisplacementFieldTransform[itk.F, 3].New()
    tx.SetDisplacementField(disp)
    x = np.array([10.0, 10.0, 10.0])
    p_fixed = F.RAS_TO_LPS @ (aff @ np.append(x, 1))[:3]
    p_moving = F.RAS_TO_LPS @ (aff @ np.append(x + [2, 0, 0], 1))[:3]
    np.testing.assert_allclose(np.array(tx.TransformPoint([float(v) for v in p_fixed])), p_moving, atol=1e-3)

    # antsApplyTransforms with our file reproduces our warped image
    out = ants_warp(moving, path, aff)
    np.testing.assert_allclose(out[INNER], warped[INNER], atol=0.05)


def test_known_affine_both_formats(tmp_path):
    aff = oblique_affine()
    fixed = blob()
    # moving = fixed seen through a known voxel affine y = R x + t (pull back: fixed(x) = moving(R x + t))
    rot = Rotation.from_euler("z", 8, degrees=True).as_matrix() * 1.05
    centre = (np.asarray(SHAPE) - 1) / 2
    t = centre - rot @ centre + np.array([1.5, -1.0, 0.5])
    grid = np.indices(SHAPE).reshape(3, -1).astype(float)
    field = ((rot @ grid + t[:, None]) - grid).T.reshape(*SHAPE, 3)
    inv = np.linalg.inv(rot)
    inv_field = ((inv @ (grid - t[:, None])) - grid).T.reshape(*SHAPE, 3)
    moving = warp(fixed, inv_field)  # moving(y) = fixed(R^-1 (y - t))
    warped = warp(moving, field)
    inner = (slice(7, -7),) * 3
    assert np.corrcoef(warped[inner].ravel(), fixed[inner].ravel())[0, 1] > 0.995

    path = F.save_itk_displacement(tmp_path / "tx.nii.gz", field, aff)
    out = ants_warp(moving, path, aff)
    np.testing.assert_allclose(out[inner], warped[inner], atol=0.5)
    # the physical field is the voxel field through the affine, and back
    ras = F.voxel_to_world(field, aff)
    np.testing.assert_allclose(F.world_to_voxel(ras, aff), field, atol=1e-9)


def smooth_field(shape=SHAPE, amplitude=2.5) -> np.ndarray:
    """A known smooth, invertible deformation (voxels): sinusoids of a few voxels, Jacobian determinant > 0."""
    g = [np.linspace(0, 1, n) for n in shape]
    z, y, x = np.meshgrid(*g, indexing="ij")
    field = np.stack(
        [
            np.sin(2 * np.pi * y) * np.sin(np.pi * x),
            np.sin(np.pi * z) * np.cos(np.pi * x),
            np.sin(np.pi * (x + z)),
        ],
        axis=-1,
    )
    return (amplitude * field).astype(np.float32)


@pytest.mark.parametrize("grid", [1, 2])
def test_inverse_of_a_known_smooth_deformation(grid):
    """forward then inverse lands where it started: within 0.05 voxels inside the volume on the field's own grid,
    0.2 voxels when inverted on the half-resolution grid the writer uses."""
    ddf = F.field_to_ddf(smooth_field())[None]
    inverse = F.invert_ddf(ddf, grid=grid, iterations=20)
    residual = F.inverse_residual(ddf, inverse)[0]
    norm = residual.norm(dim=0).numpy()[INNER]
    assert norm.mean() < (0.05 if grid == 1 else 0.2) and norm.max() < (0.2 if grid == 1 else 0.6), (
        norm.mean(),
        norm.max(),
    )
    # and the other way round: the inverse's inverse is the forward field
    back = F.invert_ddf(inverse, grid=1, iterations=20)
    assert (back - ddf)[0][(slice(None), *INNER)].abs().max() < (0.2 if grid == 1 else 0.6)


def test_ants_applies_the_inverse_itk_transform_as_our_inverse_warp(tmp_path):
    """The inverse ITK transform, applied by antsApplyTransforms to the fixed scan, gives the project's own inverse
    warp (the fixed scan on the moving scan's grid), on an oblique LPS-flipped grid."""
    aff = oblique_affine()
    fixed = blob()
    field = smooth_field()
    inverse = F.ddf_to_field(F.invert_ddf(F.field_to_ddf(field)[None], grid=1, iterations=20))
    ours = warp(fixed, inverse)  # warped_fixed(y) = fixed(y + v(y))
    path = F.save_itk_displacement(tmp_path / "inverse.nii.gz", inverse, aff)
    out = ants_warp(fixed, path, aff)
    np.testing.assert_allclose(out[INNER], ours[INNER], atol=0.5)
    # and the moving scan (the fixed scan deformed by the inverse) registered back by the forward field
    moving = ours
    warped = warp(moving, field)
    inner = (slice(6, -6),) * 3
    assert np.abs(warped - fixed)[inner].mean() < 0.05 * np.abs(fixed - fixed.mean())[inner].mean() + 1.0
