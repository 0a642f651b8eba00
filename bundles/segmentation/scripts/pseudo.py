"""Pseudo-label writing: one label map per case, and the datalist that points registration at them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import MapTransform

from .atomic import atomic_write, atomic_write_text, remove_stale_temps
from .data import PATH_KEYS, plain_name

__all__ = ["pseudo_label_path", "SaveLabelMapd", "write_pseudo_datalist"]


def pseudo_label_path(
    output_dir: str | os.PathLike, cohort: str, case: str, folder: str = "pseudo_labels"
) -> Path:
    """Where the label map of one case goes: ``<output_dir>/<cohort>/<folder>/<case>.nii.gz``.

    ``cohort`` and ``case`` come from a datalist: each must be a plain name, so that the path
    stays inside ``output_dir`` (a ``"case": "../../x"`` is refused).
    """
    source = f"output of {cohort}/{case}"
    return (
        Path(output_dir)
        / plain_name(cohort, "cohort", source)
        / folder
        / f"{plain_name(case, 'case', source)}.nii.gz"
    )


class SaveLabelMapd(MapTransform):
    """Save a (1, *spatial) label map as uint8 NIfTI on its own affine, atomically.

    Naming comes from the item's ``cohort`` and ``case`` keys (see ``pseudo_label_path``), so
    the datalist writer can find every file without bookkeeping. The path is stored under
    ``path_key``. Not a ``SaveImaged``: it lives outside the bundle's ``postprocessing`` so that
    MONAI Label, which runs ``postprocessing``, never writes here.
    """

    def __init__(
        self,
        keys: str | Sequence[str] = "pred",
        output_dir: str | os.PathLike = ".",
        folder: str = "pseudo_labels",
        path_key: str = "pseudo",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.folder = folder
        self.path_key = path_key
        remove_stale_temps(self.output_dir)  # what a killed run left (built once, before the first write)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            affine = getattr(img, "affine", None)
            affine = (
                np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
            )
            arr = np.asarray(torch.as_tensor(img).detach().cpu())
            arr = arr[0] if arr.ndim == 4 else arr
            source = getattr(img, "meta", {}).get("filename_or_obj", "case")
            case = d.get("case") or re.sub(r"(\.nii)?(\.gz)?$", "", Path(str(source)).name)
            out = pseudo_label_path(self.output_dir, str(d.get("cohort", "default")), str(case), self.folder)
            image = nib.Nifti1Image(np.rint(arr).astype(np.uint8), affine)
            image.set_qform(affine, code=1)
            image.set_sform(affine, code=1)
            atomic_write(out, lambda tmp, image=image: nib.save(image, tmp))
            d[self.path_key] = str(out)
        return d


def _relative(path: str, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows): keep it absolute
        return str(path)


def write_pseudo_datalist(
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_organs: int,
    filename: str = "datalist_pseudo.json",
    folder: str = "pseudo_labels",
    lists: Sequence[str] = ("training", "validation"),
) -> str:
    """Copy of ``datalist`` with ``pseudo`` (the predicted label map) on every item of ``lists`` and all
    ``num_organs`` organs annotated.

    ``annotated`` now describes ``pseudo``; the cohort's own vector is kept as
    ``label_annotated`` (``label`` stays the real, partial map). Every path is rewritten
    relative to the new file's folder. Fails if a case has no pseudo label (inference incomplete).
    """
    src = Path(datalist)
    base = src.parent.resolve()
    out_dir = Path(output_dir).resolve()
    data = json.loads(src.read_text())
    missing = []
    for key, value in data.items():
        if not isinstance(value, list) or not all(isinstance(it, dict) for it in value):
            continue
        new_items = []
        for item in value:
            item = {
                k: _relative(str(base / v), out_dir) if k in PATH_KEYS and isinstance(v, str) else v
                for k, v in item.items()
            }
            if key in lists and "image" in item:
                case = item.get("case") or re.sub(r"(\.nii)?(\.gz)?$", "", Path(item["image"]).name)
                path = pseudo_label_path(out_dir, item.get("cohort", "default"), case, folder)
                if not path.is_file():
                    missing.append(str(path))
                item["pseudo"] = _relative(str(path), out_dir)
                item["label_annotated"] = item.get("annotated", [0] * num_organs)
                item["annotated"] = [1] * num_organs
            new_items.append(item)
        data[key] = new_items
    if missing:
        raise FileNotFoundError(f"{len(missing)} pseudo labels missing, e.g. {missing[:3]}")
    target = out_dir / filename
    atomic_write_text(target, json.dumps(data, indent=2) + "\n")
    return str(target)
