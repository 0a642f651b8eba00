"""Inference and evaluation engine pieces: pair lists, pair loading/geometry, batch preparation,
the per-pair writer handler, and iteration functions for fields that come from a folder or ANTs.

Every stage (``inference``, ``evaluate``, ``syn_baseline``) is one MONAI ``SupervisedEvaluator``
over a list of pairs; only the way a field is obtained changes (network forward, a folder of
Learn2Reg fields, ANTs SyN), so outputs and metrics are identical for every method.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import (
    LoadImage,
    MapTransform,
    Orientationd,
    ResampleToMatchd,
    ResizeWithPadOrCropd,
    ShiftIntensityd,
    Spacingd,
)

from scripts import fields as F
from scripts.metrics import pair_metrics, write_json, write_results
from scripts.qc import qc_figure
from scripts.training import ddf_of

logger = logging.getLogger("registration.infer")

IMAGE_KEYS = ("fixed", "moving")
LABEL_KEYS = ("fixed_label", "moving_label")  # keys in the pair lists
# Inside the pipeline labels and paths get names that do not start with "fixed_"/"moving_": MONAI's
# Spacingd treats every "<key>_*" entry as a meta dict of <key>.
SEG = {"fixed": "seg_fixed", "moving": "seg_moving"}
LOADED = {"fixed": "fixed", "moving": "moving", "fixed_label": SEG["fixed"], "moving_label": SEG["moving"]}


class InputError(ValueError):
    """Bad input for a pair; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------
# pair lists
# ----------------------------------------------------------------------------------------------
def _resolve(path: str | None, root: Path) -> str | None:
    if path is None or path == "":
        return None
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else (root / p).resolve())


def _with_labels(pair: dict, root: Path) -> dict:
    """Resolve paths; where no label is given, use ``labels`` next to ``images`` (the evaluator's rule)."""
    out = {k: _resolve(pair.get(k), root) for k in (*IMAGE_KEYS, *LABEL_KEYS)}
    for img, lab in zip(IMAGE_KEYS, LABEL_KEYS, strict=True):
        if out[lab] is None and out[img] and "images" in out[img]:
            guess = out[img].replace("images", "labels")
            out[lab] = guess if os.path.isfile(guess) else None
    return {k: v for k, v in out.items() if v is not None}


def load_pairs(
    pairs_file: str | None = None,
    key: str = "registration_val",
    data_root: str | None = None,
    fixed: str | None = None,
    moving: str | None = None,
    fixed_label: str | None = None,
    moving_label: str | None = None,
) -> list[dict]:
    """Pairs to register, as ``{"fixed", "moving"[, "fixed_label", "moving_label"]}`` absolute paths.

    Sources: one pair (``fixed``/``moving`` given), our datalist or a Learn2Reg
    ``AbdomenCTCT_dataset.json`` (list ``key``), or the 2020 pairs CSV (header ``fixed, moving``,
    subject numbers -> ``img/imgNNNN.nii.gz``, ``label/labelNNNN.nii.gz``; or paths). Relative paths
    are resolved against ``data_root`` (default: the list's folder).
    """
    if fixed or moving:
        if not (fixed and moving):
            raise InputError("one-pair mode needs both --fixed and --moving")
        root = Path(data_root or os.getcwd())
        pair = {"fixed": fixed, "moving": moving, "fixed_label": fixed_label, "moving_label": moving_label}
        return [{k: _resolve(v, root) for k, v in pair.items() if v}]
    if not pairs_file:
        raise InputError("give either --fixed/--moving or --pairs_file")
    path = Path(pairs_file)
    if not path.is_file():
        raise InputError(f"{path}: pairs file not found")
    root = Path(data_root) if data_root else path.parent
    if path.suffix.lower() == ".csv":
        pairs = []
        with open(path, newline="") as f:
            for row in csv.DictReader(f, skipinitialspace=True):
                row = {k.strip(): v.strip() for k, v in row.items() if k}
                item = {}
                for k in IMAGE_KEYS:
                    v = row[k]
                    if v.isdigit():
                        item[k] = f"img/img{int(v):04d}.nii.gz"
                        item[f"{k}_label"] = f"label/label{int(v):04d}.nii.gz"
                    else:
                        item[k] = v
                pairs.append({k: _resolve(v, root) for k, v in item.items()})
        return pairs
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable pairs list ({exc})") from exc
    if key not in data:
        raise InputError(f"{path}: no list {key!r} (has {sorted(data)})")
    return [_with_labels(p, root) for p in data[key]]


# ----------------------------------------------------------------------------------------------
# loading and geometry
# ----------------------------------------------------------------------------------------------
class LoadScand(MapTransform):
    """Load scans as channel-first MetaTensors, rejecting unreadable, non-3D or non-finite data by file name."""

    def __init__(self, keys: Sequence[str] = tuple(LOADED), allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not os.path.isfile(str(path)):
                raise InputError(f"{path}: {key} file not found")
            try:
                img = self.loader(str(path))
            except Exception as exc:  # readers raise many types for truncated or foreign files
                raise InputError(f"{path}: unreadable {key} ({type(exc).__name__}: {exc})") from exc
            while img.ndim > 4 and img.shape[-1] == 1:
                img = img[..., 0]
            if img.ndim != 4 or img.shape[0] != 1 or min(img.shape[1:]) < 2:
                raise InputError(f"{path}: expected a 3D single-channel {key}, got shape {tuple(img.shape)}")
            bad = int(img.numel() - torch.isfinite(img).sum())
            if bad:
                raise InputError(f"{path}: {key} has {bad} NaN or infinite voxels")
            del d[key]
            d[LOADED.get(key, key)] = img
            d[f"path_{LOADED.get(key, key)}"] = str(path)
        return d


class AlignCentersd(MapTransform):
    """Translate the moving scan's affine so its centre meets the fixed scan's (records the shift).

    Scans of different patients sit at arbitrary scanner coordinates; without this a moving scan
    can fall outside the fixed field of view. The shift is part of the transform we write.
    """

    def __init__(self, keys: Sequence[str] = ("moving", SEG["moving"]), ref_key: str = "fixed") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.ref_key = ref_key

    @staticmethod
    def _centre(img: MetaTensor) -> np.ndarray:
        aff = np.asarray(img.affine, np.float64)
        return (aff @ np.append((np.asarray(img.shape[1:]) - 1) / 2.0, 1.0))[:3]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shift = self._centre(d[self.ref_key]) - self._centre(d["moving"])
        for key in self.key_iterator(d):
            aff = d[key].affine.clone()
            aff[:3, 3] += torch.as_tensor(shift, dtype=aff.dtype)
            d[key].affine = aff
        d["world_shift"] = torch.as_tensor(shift, dtype=torch.float64)
        return d


class CheckSameGridd(MapTransform):
    """Preprocessed inputs: every scan of the pair must already share the fixed scan's shape."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        ref = tuple(d["fixed"].shape[1:])
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != ref:
                raise InputError(
                    f"{d.get(f'path_{key}', key)}: shape {tuple(d[key].shape[1:])} differs from the fixed scan "
                    f"{d.get('path_fixed', '')} {ref}; pass preprocessed=false to resample from the affines"
                )
        return d


def pair_transforms(
    preprocessed: bool = True,
    pixdim: Sequence[float] = (2.0, 2.0, 2.0),
    spatial_size: Sequence[int] = (192, 160, 256),
    axcodes: str | None = None,
    align_centers: bool = True,
    pad_value: float = -1024.0,
) -> list:
    """Load a pair and put both scans (and labels) on the model grid, from the affines.

    Raw scans: the fixed scan is reoriented (``axcodes``; None keeps its own), resampled to
    ``pixdim`` and centre-cropped/padded to ``spatial_size`` with ``pad_value``; the moving scan
    (and labels) is resampled once onto that grid with ``ResampleToMatchd``. ``ResampleToMatch``
    pads with zeros, so images are shifted by ``-pad_value`` around it to pad with air.
    """
    xforms: list = [LoadScand()]
    if preprocessed:
        return [*xforms, CheckSameGridd(["moving", *SEG.values()], allow_missing_keys=True)]
    if axcodes:
        xforms.append(Orientationd(["fixed", SEG["fixed"]], axcodes=axcodes, allow_missing_keys=True))
    xforms += [
        Spacingd(
            ["fixed", SEG["fixed"]], pixdim=pixdim, mode=["bilinear", "nearest"], allow_missing_keys=True
        ),
        ShiftIntensityd(IMAGE_KEYS, offset=-pad_value),
        ResizeWithPadOrCropd(["fixed", SEG["fixed"]], spatial_size=spatial_size, allow_missing_keys=True),
    ]
    if align_centers:
        xforms.append(AlignCentersd())
    xforms += [
        ResampleToMatchd(
            ["moving", SEG["moving"]],
            key_dst="fixed",
            mode=["bilinear", "nearest"],
            padding_mode="zeros",
            dtype=np.float32,
            allow_missing_keys=True,
        ),
        ShiftIntensityd(IMAGE_KEYS, offset=pad_value),
    ]
    return xforms


# ----------------------------------------------------------------------------------------------
# batches and fields
# ----------------------------------------------------------------------------------------------
class PairBatch:
    """``prepare_batch``: network input = moving channels then fixed channels, one tensor."""

    def __init__(self, moving_key: str = "input_moving", fixed_key: str = "input_fixed") -> None:
        self.moving_key, self.fixed_key = moving_key, fixed_key

    def __call__(self, batch: dict, device=None, non_blocking: bool = False, **kwargs):
        x = torch.cat(
            [torch.as_tensor(batch[self.moving_key]), torch.as_tensor(batch[self.fixed_key])], dim=1
        )
        return x.to(device=device, non_blocking=non_blocking), None


class FieldFolderIteration:
    """``iteration_update`` that reads each pair's Learn2Reg field from a folder (any method)."""

    def __init__(self, field_dir: str) -> None:
        self.field_dir = Path(field_dir)
        if not self.field_dir.is_dir():
            raise InputError(f"{self.field_dir}: field folder not found")

    def __call__(self, engine: Engine, batch: dict) -> dict:
        ddfs = []
        for fixed, moving in zip(batch["path_fixed"], batch["path_moving"], strict=True):
            field = F.load_l2r_field(F.find_field(self.field_dir, fixed, moving))
            if tuple(field.shape[:3]) != tuple(batch["fixed"].shape[2:]):
                raise InputError(
                    f"field for {fixed} / {moving} has shape {field.shape}, scans {tuple(batch['fixed'].shape[2:])}"
                )
            ddfs.append(F.l2r_to_ddf(field))
        return {"pred": torch.stack(ddfs)}


class SynIteration:
    """``iteration_update`` running ANTs SyN (antspyx) per pair; the runtime goes to the metrics."""

    def __init__(self, registration: dict, clip_hu: Sequence[float] | None = (-1000.0, 1500.0)) -> None:
        self.registration = dict(registration)
        self.clip_hu = tuple(clip_hu) if clip_hu else None

    def __call__(self, engine: Engine, batch: dict) -> dict:
        from scripts.syn import register_pair  # antspyx only for this stage

        ddfs, runtimes = [], []
        for b in range(batch["fixed"].shape[0]):
            fixed, moving = batch["fixed"][b, 0], batch["moving"][b, 0]
            aff = np.asarray(fixed.affine, np.float64)
            field, seconds = register_pair(
                fixed.numpy(), moving.numpy(), aff, aff, clip_hu=self.clip_hu, **self.registration
            )
            ddfs.append(F.l2r_to_ddf(field))
            runtimes.append(seconds)
        return {"pred": torch.stack(ddfs), "runtime_s": runtimes}


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def _atomic_zip(folder: Path, zip_path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=zip_path.parent, prefix=f".{zip_path.name}.", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(folder.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    zf.write(f, arcname=f.name)
        os.replace(tmp, zip_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return zip_path


class RegistrationWriter:
    """Ignite handler writing, per pair, the Learn2Reg field (submission folder), the ITK transform,
    the warped image and labels on the fixed grid (fixed affine), a QC PNG and the metrics; and at
    the end the metrics CSV/JSON over all pairs and the submission zip.
    """

    def __init__(
        self,
        output_dir: str,
        labels: Sequence[int] = tuple(range(1, 14)),
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

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    @property
    def submission_dir(self) -> Path:
        return self.output_dir / "submission"

    def _started(self, engine: Engine) -> None:
        self.rows = []

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
        if self.write_fields and self.make_zip and self.submission_dir.is_dir():
            _atomic_zip(self.submission_dir, self.output_dir / "submission.zip")


def window_transform(keys: Sequence[str], windows: Sequence[Sequence[float]]) -> Callable:
    """Stand-in CT windowing (width/level -> [0, 1], one channel per window) for the network input."""
    from monai.transforms import Lambdad

    def apply(img):
        chans = [((img - (level - width / 2.0)) / width).clamp(0.0, 1.0) for width, level in windows]
        return torch.cat(chans, dim=0)

    return Lambdad(keys, apply)


def checkpoint_handlers(
    ckpt_path: str | None, network: torch.nn.Module, required: bool = True, device=None
) -> list:
    """A ``CheckpointLoader`` for the trained weights; a missing file is an error unless not ``required``."""
    from monai.handlers import CheckpointLoader

    required = str(required).strip().lower() not in ("false", "0", "no")  # the CLI may pass "false" as text
    if ckpt_path and os.path.isfile(ckpt_path):
        return [
            CheckpointLoader(
                load_path=ckpt_path, load_dict={"model": network}, map_location=device, strict=True
            )
        ]
    if required:
        raise InputError(
            f"{ckpt_path}: trained weights not found (pass --ckpt_path, or --require_checkpoint False to run untrained)"
        )
    logger.warning("no checkpoint at %s: running the network with its initial weights", ckpt_path)
    return []
