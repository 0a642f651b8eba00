"""MONAI Label app serving the abdoreg bundles: 13-organ segmentation and pairwise registration.

Start it with ``monailabel start_server -a tools/monailabel_app -s STUDIES --conf models
segmentation,registration`` (README.md beside this file). Every name in ``models`` is a local bundle
folder ``model/<name>``; a bundle whose metadata says it predicts a displacement field is served by
``RegistrationInferTask``, any other by MONAI Label's own ``BundleInferTask``, unchanged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import monailabel
from lib.infers import RegistrationInferTask, is_registration_bundle
from lib.request_checks import client_error, volume_problem
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.generic import get_bundle_models

logger = logging.getLogger(__name__)

DEFAULT_MODELS = "segmentation,registration"
NETWORK_ZOO = "monaihosting"  # MONAI Label's default zoo source, which downloads: never used here


class AbdoregApp(MONAILabelApp):
    """Local bundles only, clear 4xx answers for bad requests, registration results never saved as labels."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        conf.setdefault("models", DEFAULT_MODELS)
        conf.setdefault("zoo_source", "local")
        if conf["zoo_source"] == NETWORK_ZOO:
            raise ValueError(
                f"zoo_source {NETWORK_ZOO!r} downloads bundles; this app serves local bundles only"
            )
        model_dir = Path(app_dir) / "model"
        names = [m.strip() for m in conf["models"].split(",") if m.strip()]
        missing = [n for n in names if not (model_dir / n).is_dir()]
        if missing:  # MONAI Label would try to download them
            raise FileNotFoundError(
                f"no bundle folder for {missing} under {model_dir}: copy or link the bundles there "
                f"(e.g. ln -s $PWD/bundles/segmentation {model_dir}/segmentation), see README.md"
            )
        self.models = get_bundle_models(app_dir, conf)
        self.registration_output_dir = conf.get("registration_output_dir") or os.path.join(
            studies, "registration"
        )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"abdoreg - abdominal CT segmentation and registration (MONAI Label {monailabel.__version__})",
            description="The abdoreg bundles: 13-organ segmentation and inter-patient deformable registration",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.models.items():
            if is_registration_bundle(path):
                task: InferTask = RegistrationInferTask(
                    path,
                    datastore=self.datastore(),
                    studies=self.studies,
                    output_dir=self.registration_output_dir,
                    timeout=float(self.conf.get("registration_timeout", 3600)),
                )
                why = task.why_invalid()
            else:
                task = BundleInferTask(path, self.conf)
                why = "no configs/inference.json or models/model.pt"
            if not task.is_valid():  # MONAI Label would silently leave the model out
                raise FileNotFoundError(f"bundle {path} cannot be served: {why}")
            logger.info("+++ Adding Inferer:: %s => %s", name, type(task).__name__)
            infers[name] = task
        return infers

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """MONAI Label's infer, after checking model, image id and image geometry (4xx answers)."""
        model = request.get("model")
        task = self._infers.get(model)
        if task is None:
            raise client_error(404, f"unknown model {model!r}; this server has {sorted(self._infers)}")
        image = request.get("image")
        if not image:
            raise client_error(400, "no image: pass ?image=<image id> or upload the file")
        request = dict(request)
        if isinstance(image, str):
            store = datastore or self.datastore()
            path = image if os.path.exists(image) else store.get_image_uri(image)
            if not path:
                known = sorted(store.list_images())
                shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
                raise client_error(404, f"unknown image id {image!r}; the studies folder has: {shown}")
            problem = volume_problem(path)
            if problem:
                raise client_error(422, f"image {image!r}: {problem}")
            request["image_id"] = image
        if getattr(task, "saves_label", True) is False:
            request["save_label"] = False
        return super().infer(request, datastore)
