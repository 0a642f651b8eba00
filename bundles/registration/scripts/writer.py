"""The per-pair writer of every registration stage: Learn2Reg field, ITK transform, warped image and
labels, QC figure and metrics per pair; the metrics tables and the submission zip at the end."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events

from scripts import fields as F
from scripts.atomic import atomic_write
from scripts.metrics import LABELS, pair_metrics, write_json, write_results
from scripts.pair_loading import SEG
from scripts.qc import qc_figure
from scripts.training import ddf_of

__all__ = ["RegistrationWriter"]

logger = logging.getLogger("registration.infer")


def _zip_files(folder: Path, names: Sequence[str], zip_path: Path) -> Path:
    """Zip the files ``names`` of ``folder`` (flat, as Learn2Reg submissions are), atomically.

    Only this run's fields: the folder may hold an earlier run's fields for other pairs.
    """

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(set(names)):
                zf.write(folder / name, arcname=name)

    return atomic_write(zip_path, write)


class RegistrationWriter:
    """Ignite handler writing, per pair, the Learn2Reg field (submission folder), the ITK transform,
    the warped image and labels on the fixed grid (fixed affine), a QC PNG and the metrics; and at
    the end the metrics CSV/JSON over all pairs and the submission zip.
    """

    def __init__(
        self,
        output_dir: str,
        labels: Sequence[int] = LABELS,
        short_names: bool = False,
        field_ext: str = ".nii.gz",
        field_dtype: str = "float16",
        write_fields: bool = True,
        write_itk: bool = True,
        itk_convention: str = "ants",
        write_images: bool = True,
        write_qc: bool = True,
        make_zip: bool = True,
        pad_value: float = -1024.0,
        metrics_name: str = "metrics",
        method: str = "model",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.labels = tuple(int(x) for x in labels)
        self.short_names, self.field_ext, self.field_dtype = short_names, field_ext, field_dtype
        self.write_fields, self.write_itk, self.itk_convention = write_fields, write_itk, itk_convention
        self.write_images, self.write_qc, self.make_zip = write_images, write_qc, make_zip
        self.pad_value, self.metrics_name, self.method = float(pad_value), metrics_name, method
        self.rows: list[dict] = []
        self.fields: list[str] = []  # this run's field files in the submission folder

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    @property
    def submission_dir(self) -> Path:
        return self.output_dir / "submission"

    def _started(self, engine: Engine) -> None:
        self.rows, self.fields = [], []

    def _iteration(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        ddf = ddf_of(output["pred"]).detach().float().cpu()
        runtimes = output.get("runtime_s") if isinstance(output, Mapping) else None
        for b in range(ddf.shape[0]):
            extra = {"runtime_s": float(runtimes[b])} if runtimes is not None else {}
            self.rows.append(self.write_pair(batch, b, F.ddf_to_l2r(ddf[b]), extra))

    def write_pair(self, batch: dict, b: int, field: np.ndarray, extra: dict | None = None) -> dict:
        """All per-pair outputs of item ``b`` of ``batch``; returns its metrics row."""
        fixed_path, moving_path = batch["path_fixed"][b], batch["path_moving"][b]
        fixed_img = batch["fixed"][b]
        affine = np.asarray(fixed_img.affine, np.float64)
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        fixed, moving = fixed_img[0].numpy(), batch["moving"][b, 0].numpy()
        shift = batch.get("world_shift")
        shift = None if shift is None else np.asarray(shift[b], np.float64)
        tag = F.pair_tag(fixed_path, moving_path)
        pair_dir = self.output_dir / "pairs" / tag
        if self.write_fields:
            name = F.field_name(fixed_path, moving_path, short=self.short_names, ext=self.field_ext)
            F.save_l2r_field(self.submission_dir / name, field, dtype=self.field_dtype, affine=affine)
            self.fields.append(name)
        if self.write_itk:
            F.save_itk_displacement(
                pair_dir / "itk_displacement.nii.gz", field, affine, shift, self.itk_convention
            )
        warped = F.warp_array(moving, field, order=1, cval=self.pad_value)
        if self.write_images:
            F.save_nifti(pair_dir / "warped_image.nii.gz", np.round(warped).astype(np.int16), affine)
        has_labels = SEG["fixed"] in batch and SEG["moving"] in batch
        if SEG["moving"] in batch and self.write_images:
            warped_lab = F.warp_array(
                np.rint(batch[SEG["moving"]][b, 0].numpy()).astype(np.uint8), field, order=0
            )
            F.save_nifti(pair_dir / "warped_label.nii.gz", warped_lab, affine, dtype=np.uint8)
        if self.write_qc:
            qc_figure(
                fixed, moving, warped, field, pair_dir / "qc.png", spacing, title=f"{self.method}: {tag}"
            )
        row: dict = {"fixed": fixed_path, "moving": moving_path}
        if self.write_fields:  # score the field as written (float16 rounding), as the evaluator reads it
            field = field.astype(self.field_dtype).astype(np.float64)
        metrics = pair_metrics(
            field,
            np.rint(batch[SEG["fixed"]][b, 0].numpy()) if has_labels else None,
            np.rint(batch[SEG["moving"]][b, 0].numpy()) if has_labels else None,
            self.labels,
            spacing,
        )
        row.update(metrics)
        row.update(extra or {})
        write_json(pair_dir / "metrics.json", row)
        logger.info(
            "%s: %s",
            tag,
            ", ".join(f"{k}={row[k]:.4g}" for k in ("dice", "hd95", "sdlogj", "fold_fraction") if k in row),
        )
        return row

    def _completed(self, engine: Engine) -> None:
        if not self.rows:
            return
        data = write_results(self.output_dir, self.rows, self.metrics_name, {"method": self.method})
        logger.info("summary: %s", data["summary"])
        if self.write_fields and self.make_zip and self.fields:
            _zip_files(self.submission_dir, self.fields, self.output_dir / "submission.zip")
