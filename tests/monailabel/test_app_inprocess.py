"""The MONAI Label app in this process: both infer tasks, what is (not) saved, and 4xx answers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest

pytest.importorskip(
    "monailabel", reason="MONAI Label has its own environment: `make test-monailabel` runs these tests"
)

from fastapi import HTTPException  # noqa: E402

from tests.monailabel.conftest import (  # noqa: E402
    FIXED_ID,
    MOVING_ID,
    ORGANS,
    assert_no_label_saved,
    check_registration,
    check_segmentation,
)


@pytest.fixture(scope="module")
def app(app_dir, studies):
    """The app as MONAI Label's server builds it (`app_instance`), over the test studies folder."""
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    instance = app_instance(str(app_dir), str(studies), {"models": "segmentation,registration"})
    yield instance
    clear_cache()


def test_info_lists_both_tasks(app):
    models = app.info()["models"]
    assert set(models) == {"segmentation", "registration"}
    assert models["segmentation"]["type"] == "segmentation"
    assert models["segmentation"]["labels"] == {name: i + 1 for i, name in enumerate(ORGANS)}
    assert models["registration"]["type"] == "registration" and models["registration"]["dimension"] == 3
    assert type(app._infers["segmentation"]).__name__ == "BundleInferTask"  # MONAI Label's own, unchanged


def test_segmentation(app, studies):
    result = app.infer({"model": "segmentation", "image": FIXED_ID})
    try:
        check_segmentation(result["file"], studies)
    finally:
        Path(result["file"]).unlink(missing_ok=True)


def test_registration_is_returned_not_saved_as_a_label(app, studies):
    """Even when the client asks MONAI Label to save the result, it is not stored as the fixed image's label."""
    request = {"model": "registration", "image": FIXED_ID, "moving": MOVING_ID, "save_label": True}
    result = app.infer(request)
    try:
        check_registration(result["file"], result["params"], studies)
        assert result["label"] == result["file"]  # MONAI Label's answer when nothing was saved
        assert_no_label_saved(studies)
        assert app.datastore().get_label_uri(FIXED_ID, "original") == ""
    finally:
        Path(result["file"]).unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("request_", "status", "message"),
    [
        ({"model": "segmentation", "image": ""}, 400, "no image"),
        ({"model": "segmentation", "image": "no_such_scan"}, 404, "unknown image id 'no_such_scan'"),
        ({"model": "segmentation", "image": "flat_2d"}, 422, "2D image of shape (48, 40)"),
        ({"model": "segmentation", "image": "series_4d"}, 422, "4D image of shape (48, 40, 64, 3)"),
        ({"model": "no_such_model", "image": FIXED_ID}, 404, "unknown model 'no_such_model'"),
        ({"model": "registration", "image": FIXED_ID}, 400, "no moving scan"),
        (
            {"model": "registration", "image": FIXED_ID, "moving": "series_4d"},
            422,
            "moving series_4d: expected",
        ),
        (
            {"model": "registration", "image": FIXED_ID, "moving": "../x.nii.gz"},
            403,
            "outside the studies folder",
        ),
        (
            {"model": "registration", "image": FIXED_ID, "moving": "missing.nii.gz"},
            404,
            "neither an image id",
        ),
        # found by the registration bundle itself, in its subprocess (its InputError names the file)
        (
            {"model": "registration", "image": FIXED_ID, "moving": "nan_scan"},
            422,
            "nan_scan.nii.gz: moving has 1 NaN or infinite voxels",
        ),
        # a stored label map with an id outside the 13 organs: refused with the file and the id, not wrapped
        (
            {"model": "registration", "image": FIXED_ID, "moving": "bad_label_scan"},
            422,
            "label ids 262 are not organ ids 0..13",
        ),
    ],
)
def test_bad_requests_get_4xx(app, request_, status, message):
    with pytest.raises(HTTPException) as err:
        app.infer(request_)
    assert err.value.status_code == status and message in err.value.detail, err.value.detail


def test_moving_outside_the_studies_folder(app, outside_scan):
    """An absolute path, and a relative one climbing out through a symlink inside the studies folder."""
    studies = Path(app.studies)
    link = studies / "escape"
    link.symlink_to(outside_scan.parent, target_is_directory=True)
    try:
        for moving in (str(outside_scan), "escape/other.nii.gz"):
            with pytest.raises(HTTPException) as err:
                app.infer({"model": "registration", "image": FIXED_ID, "moving": moving})
            assert err.value.status_code == 403 and "outside the studies folder" in err.value.detail
    finally:
        link.unlink()
    assert nib.load(outside_scan).shape == (48, 40, 64)  # a readable scan: refused for where it is
