"""Where the pairs to register come from (``pairs_to_register``, the ``pairs`` of ``inference.json``).

Sources: one pair on the command line, our datalist or a Learn2Reg ``AbdomenCTCT_dataset.json``,
or the Learn2Reg 2020 pairs CSV; the predicted labels of the scans from the segmentation bundle's datalist.
Paths come back absolute, so later stages never depend on the working folder.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from scripts.errors import InputError
from scripts.fields import field_name, pair_tag

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "PSEUDO_KEYS",
    "pairs_to_register",
    "load_pairs",
    "check_pairs",
    "attach_pseudo_labels",
]

IMAGE_KEYS = ("fixed", "moving")
LABEL_KEYS = ("fixed_label", "moving_label")  # keys in the pair lists
PSEUDO_KEYS = ("fixed_pseudo", "moving_pseudo")  # predicted labels (segmentation bundle), optional


def _resolve(path: str | None, root: Path) -> str | None:
    if path is None or path == "":
        return None
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else (root / p).resolve())


def _with_labels(pair: dict, root: Path) -> dict:
    """Resolve paths; where no label is given, use ``labels`` next to ``images`` (the evaluator's rule)."""
    out = {k: _resolve(pair.get(k), root) for k in (*IMAGE_KEYS, *LABEL_KEYS, *PSEUDO_KEYS)}
    for img, lab in zip(IMAGE_KEYS, LABEL_KEYS, strict=True):
        if out[lab] is None and out[img] and "images" in out[img]:
            guess = out[img].replace("images", "labels")
            out[lab] = guess if os.path.isfile(guess) else None
    return {k: v for k, v in out.items() if v is not None}


def pairs_to_register(
    pairs_file: str | None = None,
    key: str = "registration_val",
    data_root: str | None = None,
    fixed: str | None = None,
    moving: str | None = None,
    fixed_label: str | None = None,
    moving_label: str | None = None,
    pseudo_datalist: str | None = None,
    fixed_pseudo: str | None = None,
    moving_pseudo: str | None = None,
    short_names: bool = False,
) -> list[dict]:
    """The pairs of a run: ``load_pairs`` (one pair or a list), their predicted labels attached
    (``attach_pseudo_labels``), every file and output name checked before anything runs (``check_pairs``)."""
    pairs = load_pairs(pairs_file, key, data_root, fixed, moving, fixed_label, moving_label)
    pairs = attach_pseudo_labels(pairs, pseudo_datalist, fixed_pseudo, moving_pseudo, data_root)
    return check_pairs(pairs, short_names)


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


def check_pairs(pairs: list[dict], short_names: bool = False) -> list[dict]:
    """``pairs`` unchanged once every file exists and every pair gets its own output names.

    Runs before the first pair is registered, so a bad list writes nothing. Two pairs whose files
    have the same names in different folders would get the same field, ``pairs/<tag>/`` folder and
    metrics row name, the second overwriting the first: that is refused, naming both pairs.
    """
    if not pairs:
        raise InputError("the pair list is empty")
    missing = [
        f"{p[k]} ({k} of pair {i + 1})" for i, p in enumerate(pairs) for k in p if not os.path.exists(p[k])
    ]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"inputs not found, nothing was registered: {'; '.join(missing[:5])}{more}")
    seen: dict[str, int] = {}
    for i, p in enumerate(pairs):
        for name in {
            pair_tag(p["fixed"], p["moving"]),
            field_name(p["fixed"], p["moving"], short=short_names),
        }:
            j = seen.setdefault(name, i)
            if j != i:
                q = pairs[j]
                raise InputError(
                    f"pairs {j + 1} (fixed {q['fixed']}, moving {q['moving']}) and {i + 1} (fixed {p['fixed']}, "
                    f"moving {p['moving']}) would both be written as {name!r}: output names come from the file "
                    "names, so rename the files or register these pairs into different output folders"
                )
    return pairs


def attach_pseudo_labels(
    pairs: list[dict],
    pseudo_datalist: str | None = None,
    fixed_pseudo: str | None = None,
    moving_pseudo: str | None = None,
    data_root: str | None = None,
) -> list[dict]:
    """Add each scan's predicted label map as ``fixed_pseudo``/``moving_pseudo`` (what instance optimisation's
    Dice term reads; the metrics keep reading the true labels).

    ``pseudo_datalist``: the segmentation bundle's ``datalist_pseudo.json``; every item with ``image`` and
    ``pseudo`` maps that image (resolved against the list's folder) to its label map, so the
    registration bundle needs nothing of the segmentation bundle but this file. A scan of a pair missing
    from it is an error naming both. ``fixed_pseudo``/``moving_pseudo``: one-pair mode. Keys a pair list
    already carries are kept.
    """
    out = [dict(p) for p in pairs]
    if fixed_pseudo or moving_pseudo:
        if len(out) != 1 or not (fixed_pseudo and moving_pseudo):
            raise InputError("--fixed_pseudo/--moving_pseudo go together, with one pair (--fixed/--moving)")
        root = Path(data_root or os.getcwd())
        out[0]["fixed_pseudo"], out[0]["moving_pseudo"] = (
            _resolve(fixed_pseudo, root),
            _resolve(moving_pseudo, root),
        )
    if not pseudo_datalist:
        return out
    path = Path(pseudo_datalist)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable pseudo-label datalist ({exc})") from exc
    lookup = {}
    for items in data.values():
        if isinstance(items, list):
            for it in items:
                if isinstance(it, dict) and it.get("image") and it.get("pseudo"):
                    image = os.path.realpath(_resolve(it["image"], path.parent))
                    lookup[image] = _resolve(it["pseudo"], path.parent)
    for pair in out:
        for img, key in zip(IMAGE_KEYS, PSEUDO_KEYS, strict=True):
            if pair.get(key):
                continue
            found = lookup.get(os.path.realpath(pair[img]))
            if found is None:
                raise InputError(f"{path}: no predicted labels (pseudo) for {img} scan {pair[img]}")
            pair[key] = found
    return out
