"""Datalist reading, cohort-weighted sampling and batch preparation for partial-label training."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "PATH_KEYS",
    "load_datalist",
    "labelled_items",
    "image_items",
    "CohortSampler",
    "PartialLabelBatch",
    "existing",
    "plain_name",
]

# Keys whose values are file paths relative to the datalist's folder (data/README.md).
PATH_KEYS = ("image", "label", "pseudo", "fixed", "moving", "fixed_label", "moving_label")


def _resolve(item: dict, base: Path) -> dict:
    return {k: str(base / v) if k in PATH_KEYS and isinstance(v, str) else v for k, v in item.items()}


def _check_grid(items: list[dict], data: dict, datalist: Path) -> None:
    """Every image on the grid the datalist states (``pixdim``/``spatial_size``, when it states one).

    An image on another grid means its preprocessing was re-run with other settings and not
    completed: say which file, rather than fail later on a tensor size.
    """
    if "pixdim" not in data or "spatial_size" not in data:
        return
    spacing, shape = np.asarray(data["pixdim"], float), tuple(int(v) for v in data["spatial_size"])
    for it in items:
        for key in ("image", "label"):
            if not isinstance(it.get(key), str) or not Path(it[key]).is_file():
                continue
            img = nib.load(it[key])
            got = nib.affines.voxel_sizes(img.affine)
            if tuple(img.shape[:3]) != shape or not np.allclose(got, spacing, atol=1e-3):
                raise ValueError(
                    f"{it[key]} is {tuple(img.shape[:3])} voxels of {np.round(got, 3).tolist()} mm, but "
                    f"{datalist} says {shape} of {spacing.tolist()} mm: re-run the preprocessing of cohort "
                    f"{it.get('cohort')!r} into that folder to completion"
                )


def load_datalist(datalist: str | os.PathLike, key: str = "training") -> list[dict]:
    """Items of list ``key`` with path keys made absolute, each image checked against the datalist's grid.

    ``monai.data.load_decathlon_datalist`` would also turn ``"cohort": "l2r"`` into a path
    whenever a folder ``l2r`` sits beside the JSON (it does, in the preprocessed layout).
    """
    path = Path(datalist)
    data = json.loads(path.read_text())
    items = [_resolve(item, path.parent.resolve()) for item in data.get(key, [])]
    _check_grid(items, data, path)
    return items


def labelled_items(datalist: str | os.PathLike, key: str, num_organs: int) -> list[dict]:
    """Items that have a label map (image-only cohorts cannot train the segmentation).

    An item without ``annotated`` annotates all ``num_organs`` organs.
    """
    items = [it for it in load_datalist(datalist, key) if it.get("label")]
    for it in items:
        it.setdefault("annotated", None)
        if it["annotated"] is None:
            it["annotated"] = [1] * num_organs
        it.setdefault("cohort", "default")
    return items


def plain_name(value: object, what: str, source: object) -> str:
    """``value`` if it can be used as one file name (no folder, no ``..``), else a ValueError naming ``source``."""
    name = str(value)
    if name in ("", ".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise ValueError(
            f"{source}: {what} {name!r} is not a plain name; output files are named after it, "
            "so it may not hold a folder, '..' or surrounding spaces"
        )
    return name


def image_items(datalist: str | os.PathLike, keys: Sequence[str] = ("training", "validation")) -> list[dict]:
    """One ``{image, cohort, case}`` item per distinct image of the given lists (for inference).

    ``cohort`` and ``case`` name output files: each must be a plain name (checked here, before
    anything is written).
    """
    seen: dict[str, dict] = {}
    for key in keys:
        for it in load_datalist(datalist, key):
            if it["image"] in seen:
                continue
            case = it.get("case") or re.sub(r"(\.nii)?(\.gz)?$", "", Path(it["image"]).name)
            seen[it["image"]] = {
                "image": it["image"],
                "cohort": plain_name(it.get("cohort", "default"), "cohort", datalist),
                "case": plain_name(case, "case", datalist),
            }
    return list(seen.values())


class CohortSampler(DistributedSampler):
    """Draws training items with replacement so that each cohort gets a configurable share.

    ``weights`` maps cohort name to its relative share (missing cohorts: 1.0); an item's
    probability is its cohort's share divided by the cohort's size, so a big cohort does not
    drown the small ones. Works with and without ``torch.distributed`` (each rank takes an
    interleaved slice of the same draw); a ``DistributedSampler`` subclass so that MONAI's
    workflows call ``set_epoch`` and every epoch draws anew, reproducibly (also after resume).
    """

    def __init__(
        self,
        dataset: Dataset,
        weights: Mapping[str, float] | None = None,
        num_samples: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        cohort_key: str = "cohort",
    ) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        cohorts = [str(it.get(cohort_key, "default")) for it in dataset.data]  # type: ignore[attr-defined]
        counts = Counter(cohorts)
        weights = dict(weights or {})
        self.item_weights = torch.tensor([float(weights.get(c, 1.0)) / counts[c] for c in cohorts])
        if not (self.item_weights > 0).any():
            raise ValueError("every cohort has weight 0")
        total = len(cohorts) if num_samples is None else int(num_samples)
        self.num_samples = math.ceil(total / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.multinomial(self.item_weights, self.total_size, replacement=True, generator=g)
        return iter(order[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class PartialLabelBatch:
    """``prepare_batch`` for ``SupervisedTrainer``: hands the loss the label and the annotated vectors.

    Returns ``(image, {"label": label, "annotated": (B, organs) float})``; the partial-label loss reads both.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", annotated_key: str = "annotated"):
        self.keys = (image_key, label_key, annotated_key)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image_key, label_key, annotated_key = self.keys
        image = batchdata[image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata[label_key].to(device=device, non_blocking=non_blocking, **kwargs)
        annotated = batchdata.get(annotated_key)
        if annotated is not None:
            if isinstance(annotated, (list, tuple)):  # default collate of python lists: one tensor per organ
                annotated = torch.stack([torch.as_tensor(a) for a in annotated], dim=-1)
            annotated = torch.as_tensor(annotated).float().to(device=device, non_blocking=non_blocking)
        return image, {"label": label, "annotated": annotated}


def existing(path: str | os.PathLike | None) -> str | None:
    """``path`` if that file exists, else None (to make a checkpoint loader conditional in a config)."""
    return str(path) if path and Path(path).is_file() else None
