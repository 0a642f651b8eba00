"""Pairwise registration as a MONAI Label infer task, over the abdoreg registration bundle.

MONAI Label has no registration task type. This task takes the request's ``image`` as the fixed scan
and the moving scan from ``params`` (a datastore id, or a path inside the studies folder) or from the
multipart ``label`` upload (MONAI Label's only second upload slot; it arrives as a temporary file). It
runs the bundle's ``configs/inference.json`` on that one raw pair and returns the warped moving image
as the result file, and as JSON where the displacement fields (Learn2Reg and ITK), the warped moving
labels, the QC figure and the metrics were written.

The bundle runs in a subprocess (``python -m monai.bundle run``, bundle root on ``PYTHONPATH``), as a user
runs it: both bundles name their plugin package ``scripts``, so running it in the server process would
collide with the segmentation bundle that MONAI Label's ``BundleInferTask`` imports there; a subprocess
also returns all its memory when the pair is done. The cost is the interpreter start (a few seconds).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.utils.others.generic import name_to_device

from abdoreg.bundles import bundle_command, bundle_env
from lib.request_checks import client_error, path_inside, volume_problem

logger = logging.getLogger(__name__)

# The bundle configs of one inference run (file names under the bundle's configs/, merged in order).
REGISTRATION_CONFIGS: tuple[str, ...] = ("inference.json",)
# `network_data_format.outputs.pred.format` of a registration bundle's metadata.
FIELD_FORMAT = "displacement field"
# The bundle's error for bad input (`scripts.errors.InputError`): its message names the file.
INPUT_ERROR = re.compile(r"InputError: (.+)")


def is_registration_bundle(path: str | os.PathLike) -> bool:
    """Whether the bundle at ``path`` predicts a displacement field (its metadata says so)."""
    meta = Path(path) / "configs" / "metadata.json"
    try:
        outputs = json.loads(meta.read_text())["network_data_format"]["outputs"]
    except (OSError, ValueError, KeyError):
        return False
    return any(str(o.get("format", "")).lower() == FIELD_FORMAT for o in outputs.values())


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class RegistrationInferTask(InferTask):
    """Register the request's moving scan onto its fixed scan (``image``) with the registration bundle."""

    # The result is a warped moving image, never a label of the fixed image: the app forces
    # `save_label` off for tasks that say so (MONAI Label would otherwise store it when asked).
    saves_label = False

    def __init__(
        self,
        path: str | os.PathLike,
        datastore: Datastore,
        studies: str | os.PathLike,
        output_dir: str | os.PathLike,
        configs: tuple[str, ...] = REGISTRATION_CONFIGS,
        python: str = sys.executable,
        timeout: float = 3600.0,
        labels_tag: str = DefaultLabelTag.FINAL.value,
    ) -> None:
        self.path = Path(path).resolve()
        meta = json.loads((self.path / "configs" / "metadata.json").read_text())
        super().__init__(
            type="registration",
            labels=None,
            dimension=3,
            description=meta.get("description", "deformable registration of a moving scan onto the image"),
            config={"moving": "", "labels_tag": labels_tag},
        )
        self.version = meta.get("version")
        self.datastore = datastore
        self.studies = Path(studies)
        self.output_dir = Path(output_dir)
        self.configs = tuple(configs)
        self.python = python
        self.timeout = float(timeout)
        self.ckpt_path = self.path / "models" / "model.pt"

    def is_valid(self) -> bool:
        return self.ckpt_path.is_file() and all((self.path / "configs" / c).is_file() for c in self.configs)

    def why_invalid(self) -> str:
        missing = [
            str(p)
            for p in (self.ckpt_path, *(self.path / "configs" / c for c in self.configs))
            if not p.is_file()
        ]
        return f"missing {', '.join(missing)}" if missing else ""

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["version"] = self.version
        return i

    # ------------------------------------------------------------------------------------------
    # inputs
    # ------------------------------------------------------------------------------------------
    def _moving(self, request: dict) -> tuple[str, str | None]:
        """The moving scan's path and its datastore id (None for uploads and paths)."""
        given, upload = request.get("moving"), request.get("label")
        if given and upload:
            raise client_error(400, "give the moving scan once: params 'moving' or an uploaded 'label' file")
        if upload:
            path = Path(str(upload)).resolve()
            if path.parent != Path(tempfile.gettempdir()).resolve() or not path.is_file():
                raise client_error(
                    400, f"'label' {upload}: only a file uploaded with this request is accepted"
                )
            return str(path), None
        if not given:
            raise client_error(
                400,
                'no moving scan: pass params {"moving": "<image id>"} or upload it as the multipart \'label\' file',
            )
        given = str(given)
        uri = self.datastore.get_image_uri(given)
        if uri:
            return uri, given
        path = path_inside(given, self.studies)
        if path is None:
            raise client_error(403, f"moving {given!r} is outside the studies folder {self.studies}")
        if not path.is_file():
            raise client_error(404, f"moving {given!r}: neither an image id nor a file of the studies folder")
        return str(path), None

    def _label(self, image_id: str | None, tag: str) -> str | None:
        if not image_id:
            return None
        return self.datastore.get_label_uri(image_id, tag) or None

    # ------------------------------------------------------------------------------------------
    # the bundle run
    # ------------------------------------------------------------------------------------------
    def command(self, pair: dict[str, str], output_dir: Path, device: str | None = None) -> list[str]:
        """``python -m monai.bundle run`` of the bundle's inference config on one raw pair."""
        overrides = {
            **pair,
            "output_dir": str(output_dir),
            "ckpt_path": str(self.ckpt_path),
            "make_zip": "False",
        }
        if device:
            overrides["device"] = f"$torch.device('{device}')"
        return bundle_command(self.path, self.configs, overrides, python=self.python)

    def _run(self, cmd: list[str], cwd: Path) -> None:
        env = bundle_env(self.path)
        logger.info("registration: %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"registration bundle did not finish in {self.timeout:.0f} s") from exc
        if proc.returncode == 0:
            return
        log = proc.stdout + proc.stderr
        bad_input = INPUT_ERROR.findall(log)
        if bad_input:
            raise client_error(422, bad_input[-1].strip())
        raise RuntimeError(f"registration bundle failed (exit {proc.returncode}):\n{log[-4000:]}")

    def _publish(self, tmp: Path, final: Path) -> None:
        """Replace ``final`` by the finished ``tmp`` folder (a rename; an older result is removed after)."""
        old = None
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    def __call__(self, request: dict) -> tuple[str, dict]:
        start = time.time()
        fixed = str(request["image"])
        fixed_id = request.get("image_id") or None
        moving, moving_id = self._moving(request)
        problem = volume_problem(moving)
        if problem:
            raise client_error(422, f"moving {moving_id or moving}: {problem}")
        tag = str(request.get("labels_tag") or DefaultLabelTag.FINAL.value)
        labels = {"fixed_label": self._label(fixed_id, tag), "moving_label": self._label(moving_id, tag)}
        pair = {"fixed": fixed, "moving": moving, **{k: v for k, v in labels.items() if v}}

        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".running-", dir=self.output_dir))
        try:
            device = name_to_device(request["device"]) if request.get("device") else None
            self._run(self.command(pair, tmp, device), cwd=tmp)
            final = self.output_dir / f"{fixed_id or _stem(fixed)}__{moving_id or _stem(moving)}"
            self._publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

        pair_dirs = sorted((final / "pairs").iterdir())
        fields = sorted((final / "submission").glob("disp_*"))
        if len(pair_dirs) != 1 or len(fields) != 1:
            raise RuntimeError(f"{final}: expected the outputs of one pair, found {pair_dirs} and {fields}")
        out = pair_dirs[0]
        warped_label = out / "warped_label.nii.gz"
        result = {
            "fixed": fixed_id or fixed,
            "moving": moving_id or moving,
            "output_dir": str(final),
            "displacement_field": {
                "learn2reg": str(fields[0]),
                "itk": str(out / "itk_displacement.nii.gz"),
            },
            "warped_image": str(out / "warped_image.nii.gz"),
            "warped_label": str(warped_label) if warped_label.is_file() else None,
            "labels": {k.removesuffix("_label"): v for k, v in labels.items()},
            "qc": str(out / "qc.png") if (out / "qc.png").is_file() else None,
            "metrics": json.loads((out / "metrics.json").read_text()),
            "latencies": {"total": round(time.time() - start, 3)},
        }
        # MONAI Label deletes the result file once it is sent: hand it a copy of the warped image.
        fd, copy = tempfile.mkstemp(prefix=f"warped_{_stem(moving)}_", suffix=".nii.gz")
        os.close(fd)
        shutil.copyfile(out / "warped_image.nii.gz", copy)
        return copy, result
