"""The app behind the real server: `monailabel start_server` on 127.0.0.1, queried over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "monailabel", reason="MONAI Label has its own environment: `make test-monailabel` runs these tests"
)

import requests  # noqa: E402
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402

from tests.monailabel.conftest import (  # noqa: E402
    FIXED_ID,
    MOVING_ID,
    assert_no_label_saved,
    check_registration,
    check_segmentation,
)

HOST = "127.0.0.1"
START_TIMEOUT_S = 300  # imports and two bundles on a busy 2-core machine; measured 20-60 s
REQUEST_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn shuts down cleanly), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(app_dir, studies, tmp_path_factory):
    """Base URL of `monailabel start_server` serving the app copy; always stopped at the end."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    monailabel_cli = Path(sys.executable).with_name("monailabel")
    cmd = [str(monailabel_cli), "start_server", "-a", str(app_dir), "-s", str(studies)]
    cmd += ["-i", HOST, "-p", str(port), "--conf", "models", "segmentation,registration"]
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable}  # the script runs `python -m monailabel.main`
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{log_path.read_text()[-6000:]}")
            try:
                if requests.get(f"{url}/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{log_path.read_text()[-6000:]}")
            time.sleep(1)
        yield url, log_path
    finally:
        _stop(proc)


def _post(url: str, path: str, **kwargs) -> requests.Response:
    return requests.post(f"{url}{path}", timeout=REQUEST_TIMEOUT_S, **kwargs)


def test_info(server):
    url, _ = server
    info = requests.get(f"{url}/info/", timeout=60)
    assert info.status_code == 200
    models = info.json()["models"]
    assert models["segmentation"]["type"] == "segmentation" and len(models["segmentation"]["labels"]) == 13
    assert models["registration"]["type"] == "registration"


def test_segmentation(server, studies, tmp_path):
    url, _ = server
    res = _post(url, f"/infer/segmentation?image={FIXED_ID}&output=image")
    assert res.status_code == 200, res.text[:2000]
    out = tmp_path / "segmentation.nii.gz"
    out.write_bytes(res.content)
    check_segmentation(out, studies)


def _multipart(res: requests.Response) -> tuple[dict, bytes]:
    params, image = None, None
    for part in MultipartDecoder.from_response(res).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        elif 'name="image"' in disposition:
            image = part.content
    assert params is not None and image is not None
    return params, image


def test_registration_by_id(server, studies, tmp_path):
    """Moving scan named by its datastore id; the client asks for the result to be saved: it is not."""
    url, _ = server
    params = {"moving": MOVING_ID, "save_label": True}
    res = _post(url, f"/infer/registration?image={FIXED_ID}&output=all", data={"params": json.dumps(params)})
    assert res.status_code == 200, res.text[:2000]
    result, image = _multipart(res)
    warped = tmp_path / "warped.nii.gz"
    warped.write_bytes(image)
    check_registration(warped, result, studies)
    assert_no_label_saved(studies)


def test_registration_of_an_uploaded_moving_scan(server, studies, tmp_path):
    """Moving scan uploaded as the multipart `label` file: same result, without its labels."""
    url, _ = server
    with open(studies / f"{MOVING_ID}.nii.gz", "rb") as f:
        files = {"label": (f"{MOVING_ID}.nii.gz", f, "application/octet-stream")}
        res = _post(url, f"/infer/registration?image={FIXED_ID}&output=json", files=files)
    assert res.status_code == 200, res.text[:2000]
    result = res.json()
    assert result["labels"]["moving"] is None and result["warped_label"] is None
    assert "dice" not in result["metrics"] and result["metrics"]["fold_fraction"] == 0.0
    warped = Path(result["warped_image"])
    assert warped.is_file() and warped.is_relative_to(studies / "registration")


def test_bad_requests_then_still_serving(server, studies, outside_scan):
    url, log_path = server
    reg = f"/infer/registration?image={FIXED_ID}"
    cases = [
        ("/infer/segmentation?image=no_such_scan", {}, 404, "unknown image id 'no_such_scan'"),
        ("/infer/segmentation?image=flat_2d", {}, 422, "2D image of shape (48, 40)"),
        ("/infer/segmentation?image=series_4d", {}, 422, "4D image of shape (48, 40, 64, 3)"),
        (f"/infer/no_such_model?image={FIXED_ID}", {}, 404, "unknown model 'no_such_model'"),
        (reg, {}, 400, "no moving scan"),
        (reg, {"moving": "flat_2d"}, 422, "moving flat_2d: expected one 3D volume"),
        (reg, {"moving": str(outside_scan)}, 403, "outside the studies folder"),
        (
            reg,
            {"moving": "../" + outside_scan.parent.name + "/other.nii.gz"},
            403,
            "outside the studies folder",
        ),
    ]
    for path, params, status, message in cases:
        res = _post(url, path, data={"params": json.dumps(params)})
        assert (res.status_code, path, params) == (status, path, params), res.text[:2000]
        assert message in res.json()["detail"], res.text[:2000]
    # no image at all: MONAI Label's endpoint answers before the app sees the request, with its own status
    res = _post(url, "/infer/segmentation")
    assert res.status_code == 500 and "Neither Image nor File" in res.json()["detail"], res.text[:2000]

    res = _post(url, f"/infer/segmentation?image={FIXED_ID}&output=image")
    assert res.status_code == 200, log_path.read_text()[-4000:]
    assert requests.get(f"{url}/info/", timeout=60).status_code == 200
