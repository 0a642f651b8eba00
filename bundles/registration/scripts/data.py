"""Training and validation pairs from the preprocessed datalist (see data/README.md).

Cases are loaded and cached once (``train.json``: a MONAI ``CacheDataset`` of the ``case_load``
transforms, HU kept as int16 and labels as uint8 so that many cohorts fit); ``PairDataset`` then
assembles a pair from two cached cases on the fly, so the number of possible pairs (quadratic in the
cases) costs nothing to cache, and applies the pair transforms (one random crop for both images and
labels, the CT windows). Training pairs are random inter-patient pairs drawn with per-cohort weights;
validation pairs are the fixed ``registration_val`` list at full volume. MONAI has no dataset of pairs
drawn from one cache, hence ``PairDataset``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.metrics import NUM_ORGANS

__all__ = ["datalist_grid", "load_cases", "load_val_pairs", "case_weights", "PairDataset"]


def _read(datalist: str | os.PathLike) -> tuple[dict, Path]:
    path = Path(datalist).expanduser()
    with open(path) as f:
        return json.load(f), path.parent


def _abs(root: Path, p: str | None) -> str | None:
    if not p:
        return None
    q = Path(os.path.expanduser(p))
    return str(q if q.is_absolute() else (root / q).resolve())


def datalist_grid(datalist: str | os.PathLike) -> dict:
    """The grid a datalist states (``pixdim``, ``spatial_size``, as the preprocessing bundle writes them); empty
    when it states none or cannot be read (the training itself then reports the file)."""
    try:
        data, _ = _read(datalist)
    except (OSError, ValueError):
        return {}
    return {k: data[k] for k in ("pixdim", "spatial_size") if isinstance(data.get(k), list)}


def load_cases(
    datalist: str | os.PathLike,
    key: str = "training",
    cohorts: Sequence[str] | None = None,
    label_key: str | None = "label",
    use_labels: bool = True,
    num_organs: int = NUM_ORGANS,
    exclude: Sequence[str] = (),
    pseudo_input: bool = False,
    pseudo_key: str = "pseudo",
) -> list[dict]:
    """Cases of ``datalist[key]`` (absolute paths) as ``{"image", ["label"], "annotated", "cohort", "case"}``.

    ``label_key`` picks the label map the Dice term reads (``label``, or ``pseudo``: the predicted labels the
    segmentation bundle writes; ``None``, or ``use_labels`` false, for none). Predicted labels cover every organ,
    so their ``annotated`` vector is all ones unless the item carries ``<label_key>_annotated``. Items without
    that label get no ``label`` and an all-zero ``annotated`` (image-only cohorts stay usable for unsupervised
    training). ``key`` may name several lists joined by ``+`` (``training+validation`` for a final model on all
    labelled scans). ``pseudo_input`` adds ``pseudo``: the predicted label map (``pseudo_key``) the network reads as
    input; every case must have one.
    """
    data, root = _read(datalist)
    label_key = label_key if use_labels else None
    cases = []
    for k in key.split("+"):
        for item in data.get(k, []):
            if cohorts and item.get("cohort") not in cohorts:
                continue
            if item.get("case") in exclude:
                continue
            out = {
                "image": _abs(root, item["image"]),
                "cohort": item.get("cohort", ""),
                "case": item.get("case", Path(item["image"]).name),
            }
            label = _abs(root, item.get(label_key)) if label_key else None
            if label:
                out["label"] = label
                if label_key == "label":
                    annotated = item.get("annotated") or [1] * num_organs
                else:
                    annotated = item.get(f"{label_key}_annotated") or [1] * num_organs
            else:
                annotated = [0] * num_organs
            out["annotated"] = [float(a) for a in annotated]
            if pseudo_input:
                out["pseudo"] = _required_pseudo(datalist, item, pseudo_key, root)
            cases.append(out)
    if not cases:
        raise ValueError(
            f"{datalist}: no cases under {key!r}" + (f" for cohorts {list(cohorts)}" if cohorts else "")
        )
    return cases


def _required_pseudo(datalist: str | os.PathLike, item: Mapping, pseudo_key: str, root: Path) -> str:
    pseudo = _abs(root, item.get(pseudo_key))
    if not pseudo:
        raise ValueError(
            f"{datalist}: {item.get('case') or item.get('image')} has no {pseudo_key!r}, which the network reads as "
            "input (pseudo_input): use the segmentation bundle's pseudo datalist"
        )
    return pseudo


def load_val_pairs(
    datalist: str | os.PathLike,
    key: str = "registration_val",
    num_organs: int = NUM_ORGANS,
    pseudo_input: bool = False,
    pseudo_key: str = "pseudo",
) -> tuple[list[dict], list[tuple[int, int]]]:
    """Unique cases of the pair list and (moving index, fixed index) per pair, for ``PairDataset``. With
    ``pseudo_input`` each scan also gets ``pseudo``, looked up by image among the datalist's cases."""
    data, root = _read(datalist)
    cases: list[dict] = []
    index: dict[str, int] = {}
    items = {
        _abs(root, it["image"]): it
        for k in ("training", "validation")
        for it in data.get(k, [])
        if pseudo_input and "image" in it
    }

    def add(image: str, label: str | None) -> int:
        image = _abs(root, image)
        if image not in index:
            index[image] = len(cases)
            item = {"image": image, "case": Path(image).name.split(".")[0], "cohort": "l2r"}
            label = _abs(root, label)
            item["annotated"] = [1.0 if label else 0.0] * num_organs
            if label:
                item["label"] = label
            if pseudo_input:
                item["pseudo"] = _required_pseudo(
                    datalist, items.get(image, {"image": image}), pseudo_key, root
                )
            cases.append(item)
        return index[image]

    pairs = []
    for p in data.get(key, []):
        m = add(p["moving"], p.get("moving_label"))
        f = add(p["fixed"], p.get("fixed_label"))
        pairs.append((m, f))
    if not pairs:
        raise ValueError(f"{datalist}: no pairs under {key!r}")
    return cases, pairs


def case_weights(cases: Sequence[Mapping], cohort_weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Sampling probability of each case: each cohort gets ``cohort_weights[cohort]`` of the mass.

    Without weights every case is equally likely. A cohort missing from the mapping gets weight 1;
    a weight of 0 leaves the cohort out. Within a cohort the mass is split evenly.
    """
    cohorts = [c.get("cohort", "") for c in cases]
    if len(cases) < 2:
        names = ", ".join(str(c.get("case", c.get("image", "?"))) for c in cases) or "none"
        raise ValueError(
            f"training pairs need at least two cases, the datalist selection has {len(cases)} ({names}): "
            "add cases, or widen train_key/cohorts/exclude_cases"
        )
    if not cohort_weights:
        w = np.ones(len(cases))
    else:
        counts = {k: cohorts.count(k) for k in set(cohorts)}
        w = np.array([float(cohort_weights.get(k, 1.0)) / counts[k] for k in cohorts])
    if w.sum() <= 0 or (w > 0).sum() < 2:
        raise ValueError("cohort weights leave fewer than two cases to pair")
    return torch.as_tensor(w / w.sum(), dtype=torch.float64)


class PairDataset(torch.utils.data.Dataset):
    """Pairs of cached cases: random ``(moving, fixed)`` draws, or a fixed list of index pairs.

    Random draws use torch's generator (seeded per DataLoader worker and per epoch by PyTorch), so
    every epoch sees new pairs; ``length`` is the number of pairs per epoch. Both cases of a pair
    are distinct. Each item carries both cases' ``annotated`` vectors and names.
    """

    def __init__(
        self,
        cases: Sequence[Mapping],
        transform: Callable | None = None,
        pairs: Sequence[tuple[int, int]] | None = None,
        probs: torch.Tensor | None = None,
        length: int | None = None,
    ) -> None:
        self.cases, self.transform, self.pairs = cases, transform, list(pairs) if pairs is not None else None
        n = len(cases)
        if self.pairs is None:
            if n < 2:
                raise ValueError("need at least two cases to make pairs")
            self.probs = probs if probs is not None else torch.full((n,), 1.0 / n, dtype=torch.float64)
            self.length = int(length) if length else n
        else:
            self.length = len(self.pairs)

    def __len__(self) -> int:
        return self.length

    def _draw(self) -> tuple[int, int]:
        m, f = torch.multinomial(self.probs, 2, replacement=False).tolist()
        return m, f

    def __getitem__(self, index: int) -> dict:
        m, f = self.pairs[index] if self.pairs is not None else self._draw()
        mc, fc = self.cases[m], self.cases[f]
        item: dict[str, Any] = {}
        for prefix, c in (("moving", mc), ("fixed", fc)):
            item[prefix] = c["image"]
            for key in ("label", "pseudo"):
                if key in c:
                    item[f"{prefix}_{key}"] = c[key]
            item[f"{prefix}_annotated"] = torch.as_tensor(c.get("annotated", []), dtype=torch.float32)
            item[f"{prefix}_case"] = c.get("case", "")
            item[f"{prefix}_cohort"] = c.get("cohort", "")
        return self.transform(item) if self.transform is not None else item
