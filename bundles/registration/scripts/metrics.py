"""Registration metrics computed exactly as the official Learn2Reg evaluator does.

The evaluator (MDL-UzL/L2R, ``evaluation/evaluation.py`` and ``utils.py``) warps the moving
labels with ``scipy.ndimage.map_coordinates(order=0)``, scores DSC and HD95 per organ (NaN where
the organ is absent in fixed or moving), HD95 with DeepMind's ``surface_distance`` at unit spacing
(voxels), and SDlogJ as std(log(clip(det + 3, 1e-9, 1e9))) of the Jacobian of x + u(x) computed
by central differences with zero padding and a 2-voxel border crop. We reproduce it here, add the
HD95 in mm, the honest std(log det) over det > 0, and the fraction of folded voxels (det <= 0),
which the official SDlogJ hides (its folding count is always 0 because of the +3 shift).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.ndimage
from monai.metrics.utils import get_mask_edges

from scripts.atomic import atomic_write_text

# The bundle's one organ count (BTCV order, DESIGN section 4); configs pass ``num_organs``/``labels``.
NUM_ORGANS = 13
LABELS: tuple[int, ...] = tuple(range(1, NUM_ORGANS + 1))


# ----------------------------------------------------------------------------------------------
# warping and Jacobian (official conventions)
# ----------------------------------------------------------------------------------------------
def warp_labels(moving_seg: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Moving labels warped onto the fixed grid: ``moving(x + u(x))`` by nearest neighbour.

    ``disp`` is a Learn2Reg field (D, H, W, 3) in voxels. Same call as the evaluator (order 0,
    constant 0 outside), so the warped labels match it voxel for voxel.
    """
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[-1] != 3 or disp.shape[:3] != moving_seg.shape:
        raise ValueError(f"field shape {disp.shape} does not fit labels of shape {moving_seg.shape} (+ (3,))")
    coords = np.empty((3, *disp.shape[:3]))
    for axis in range(3):  # identity + u, component by component (same float64 sums as a meshgrid + u)
        shape = [1, 1, 1]
        shape[axis] = disp.shape[axis]
        np.add(disp[..., axis], np.arange(disp.shape[axis]).reshape(shape), out=coords[axis])
    return scipy.ndimage.map_coordinates(moving_seg, coords, order=0)


def jacobian_determinant(disp: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Determinant of the Jacobian of x + u(x), cropped by 2 voxels on each side.

    ``disp`` is (D, H, W, 3) in voxels. Central differences (kernel [-0.5, 0, 0.5]) with zero
    padding, as the evaluator's ``jacobian_determinant`` (which takes (1, 3, D, H, W)). The zero
    padding only touches the outermost voxel, which the crop removes, so the differences are taken
    on the cropped block alone, ``0.5 * (u[i+1] - u[i-1])``: the same float64 numbers as the
    evaluator's correlation (scaling by 0.5 is exact), computed ``chunk`` slices at a time so the nine
    derivatives of a whole volume are never held at once.
    """
    comps = [np.ascontiguousarray(disp[..., c], dtype=np.float64) for c in range(3)]
    n0, n1, n2 = comps[0].shape
    det = np.empty((n0 - 4, n1 - 4, n2 - 4))
    for start in range(2, n0 - 2, chunk):
        stop = min(start + chunk, n0 - 2)
        block = (slice(start, stop), slice(2, n1 - 2), slice(2, n2 - 2))

        def d(comp: int, axis: int, block=block) -> np.ndarray:
            lo, hi = list(block), list(block)
            lo[axis] = slice(block[axis].start - 1, block[axis].stop - 1)
            hi[axis] = slice(block[axis].start + 1, block[axis].stop + 1)
            out = comps[comp][tuple(hi)] - comps[comp][tuple(lo)]
            out *= 0.5
            if axis == comp:
                out += 1.0
            return out

        # j[a][c] = d(x + u)_c / dx_a (the evaluator's jac[axis, comp]), each derivative computed once
        j = [[d(c, a) for c in range(3)] for a in range(3)]
        out = j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        out -= j[1][0] * (j[0][1] * j[2][2] - j[0][2] * j[2][1])
        out += j[2][0] * (j[0][1] * j[1][2] - j[0][2] * j[1][1])
        det[start - 2 : stop - 2] = out
    return det


def jacobian_stats(disp: np.ndarray, det: np.ndarray | None = None) -> dict[str, float]:
    """Official SDlogJ, the honest std(log det) over det > 0, and the folded fraction (det <= 0).

    ``det``: ``jacobian_determinant(disp)`` when the caller has it already (the QC figure shows it too).
    """
    det = jacobian_determinant(disp) if det is None else det
    official = float(np.log(np.clip(det + 3, 1e-9, 1e9)).std())
    positive = det[det > 0]
    honest = float(np.log(positive).std()) if positive.size else math.nan
    return {
        "sdlogj": official,
        "sdlogj_honest": honest,
        "fold_fraction": float(np.mean(det <= 0)),
        "num_foldings": int(np.count_nonzero(det <= 0)),
    }


# ----------------------------------------------------------------------------------------------
# overlap and surface distances
# ----------------------------------------------------------------------------------------------
def dice(mask_gt: np.ndarray, mask_pred: np.ndarray) -> float:
    """Volumetric Dice (DeepMind ``compute_dice_coefficient``; NaN when both are empty)."""
    total = int(mask_gt.sum()) + int(mask_pred.sum())
    return math.nan if total == 0 else 2.0 * int((mask_gt & mask_pred).sum()) / total


def robust_hausdorff(
    mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float], percent: float = 95.0
):
    """Surfel-area-weighted percentile Hausdorff distance, as DeepMind's ``compute_robust_hausdorff``.

    MONAI's ``compute_hausdorff_distance`` takes an unweighted percentile over erosion edges, which
    gives different numbers, so only MONAI's subvoxel edges and surfel areas (the same DeepMind
    lookup table) are used here; the distances and the weighted percentile follow DeepMind.
    Returns inf when one mask is empty and the other is not (as the official code does).
    """
    union = mask_gt | mask_pred
    if not union.any():
        return math.inf
    # Crop to the union's box (+1 zero voxel each side, the lattice DeepMind uses): same result, faster.
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(union))
    mask_gt, mask_pred = np.pad(mask_gt[box], 1), np.pad(mask_pred[box], 1)
    edges_pred, edges_gt, areas_pred, areas_gt = get_mask_edges(
        mask_pred.astype(bool), mask_gt.astype(bool), spacing=tuple(float(s) for s in spacing)
    )
    edges_pred, edges_gt = np.asarray(edges_pred, bool), np.asarray(edges_gt, bool)
    areas_pred, areas_gt = np.asarray(areas_pred, np.float64), np.asarray(areas_gt, np.float64)

    def one_way(src_edges, src_areas, dst_edges) -> float:
        if not src_edges.any():
            return math.inf
        if not dst_edges.any():
            return math.inf
        dist = scipy.ndimage.distance_transform_edt(~dst_edges, sampling=spacing)[src_edges]
        areas = src_areas[src_edges]
        order = np.lexsort((areas, dist))  # sort by (distance, area) as DeepMind does
        dist, areas = dist[order], areas[order]
        cum = np.cumsum(areas) / np.sum(areas)
        idx = int(np.searchsorted(cum, percent / 100.0))
        return float(dist[min(idx, len(dist) - 1)])

    return max(one_way(edges_gt, areas_gt, edges_pred), one_way(edges_pred, areas_pred, edges_gt))


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return math.nan if np.all(np.isnan(arr)) else float(np.nanmean(arr))


def organ_dice(
    fixed_seg: np.ndarray, moving_seg: np.ndarray, warped_seg: np.ndarray, labels: Iterable[int] = LABELS
) -> list[float]:
    """Per-organ DSC of the warped labels against the fixed ones; NaN where the organ is absent in the
    fixed or the moving labels (the evaluator's rule, so absent organs never count as 0)."""
    labels = [int(lab) for lab in labels]
    scores = label_metrics(fixed_seg, moving_seg, warped_seg, labels, hd95=False)
    return [scores[f"dice_{lab}"] for lab in labels]


def _boxes(seg: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box of each label (None where absent), from one pass over the volume."""
    top = max(labels, default=0)
    found = scipy.ndimage.find_objects(np.where(seg <= top, seg, 0).astype(np.int32), max_label=top)
    return {lab: found[lab - 1] if lab >= 1 else None for lab in labels}


def _union(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None or b is None:
        return a or b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def _isotropic(spacing: Sequence[float]) -> bool:
    return max(spacing) - min(spacing) <= 1e-9 * max(spacing)


def label_metrics(
    fixed_seg: np.ndarray,
    moving_seg: np.ndarray,
    warped_seg: np.ndarray,
    labels: Iterable[int] = LABELS,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    hd95: bool = True,
) -> dict[str, float]:
    """Per-organ DSC, HD95 (voxels, the official unit spacing) and HD95 in mm, and their nanmeans.

    Each organ is scored inside the box that holds it in the fixed and the warped labels (Dice and
    distances do not change outside it). With isotropic spacing the distances in mm are those in
    voxels times the spacing and the surfel weights scale uniformly, so HD95 in mm is HD95 times
    the spacing (computed once); anisotropic spacing computes it separately. ``hd95=False``: Dice only.
    """
    labels = [int(lab) for lab in labels]
    fixed_boxes, warped_boxes = _boxes(fixed_seg, labels), _boxes(warped_seg, labels)
    moving_boxes = _boxes(moving_seg, labels)
    iso = _isotropic(spacing_mm)
    out: dict[str, float] = {}
    dsc, hd, hd_mm = [], [], []
    for lab in labels:
        if fixed_boxes[lab] is None or moving_boxes[lab] is None:
            d = h = hm = math.nan
        else:
            # one voxel of margin: robust_hausdorff then crops to exactly the lattice it uses on the full volume
            box = tuple(
                slice(max(b.start - 1, 0), b.stop + 1) for b in _union(fixed_boxes[lab], warped_boxes[lab])
            )
            fixed_mask, warped_mask = fixed_seg[box] == lab, warped_seg[box] == lab
            d = dice(fixed_mask, warped_mask)
            if not hd95:
                h = hm = math.nan
            else:
                h = robust_hausdorff(fixed_mask, warped_mask, (1.0, 1.0, 1.0))
                hm = (
                    h * float(spacing_mm[0]) if iso else robust_hausdorff(fixed_mask, warped_mask, spacing_mm)
                )
        out[f"dice_{lab}"], out[f"hd95_{lab}"], out[f"hd95_mm_{lab}"] = d, h, hm
        dsc.append(d)
        hd.append(h)
        hd_mm.append(hm)
    out["dice"], out["hd95"], out["hd95_mm"] = _nanmean(dsc), _nanmean(hd), _nanmean(hd_mm)
    return out


def pair_metrics(
    disp: np.ndarray,
    fixed_seg: np.ndarray | None = None,
    moving_seg: np.ndarray | None = None,
    labels: Iterable[int] = LABELS,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    warped_seg: np.ndarray | None = None,
    det: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of one pair from its Learn2Reg field (D, H, W, 3) and, when given, its labels.

    ``warped_seg``: the moving labels already warped by ``warp_labels`` with this field (the writer
    warps them once for its output file and the metrics); ``det``: its ``jacobian_determinant``.
    """
    disp = np.asarray(disp, dtype=np.float64)
    labels = list(labels)
    out: dict[str, float] = {}
    if fixed_seg is not None and moving_seg is not None:
        fixed_seg, moving_seg = np.asarray(fixed_seg), np.asarray(moving_seg)
        if fixed_seg.shape != moving_seg.shape or fixed_seg.shape != disp.shape[:3]:
            raise ValueError(
                f"shape mismatch: fixed labels {fixed_seg.shape}, moving labels {moving_seg.shape}, field {disp.shape}"
            )
        warped = warp_labels(moving_seg, disp) if warped_seg is None else np.asarray(warped_seg)
        out["dice_initial"] = _nanmean(organ_dice(fixed_seg, moving_seg, moving_seg, labels))
        out.update(label_metrics(fixed_seg, moving_seg, warped, labels, spacing_mm))
    out.update(jacobian_stats(disp, det))
    return out


# ----------------------------------------------------------------------------------------------
# aggregation and atomic outputs
# ----------------------------------------------------------------------------------------------
SUMMARY_QUANTILES = {"dice": ("dice30", 0.3), "hd95": ("hd95_30", 0.3), "hd95_mm": ("hd95_mm_30", 0.3)}
SUMMARY_QUANTILES["sdlogj"] = ("sdlogj_70", 0.7)


def aggregate(rows: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """Mean, std (population, as the evaluator), 0.3 and 0.7 quantiles of every numeric column.

    Also the headline numbers: DSC30 and HD95_30 (0.3 quantile, the evaluator's '30' key) and
    SDlogJ's 0.7 quantile. A NaN pair value makes the mean NaN, as in the evaluator.
    """
    keys: list[str] = []
    for r in rows:
        keys += [
            k
            for k, v in r.items()
            if k not in keys and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
        ]
    per_metric: dict[str, dict[str, float]] = {}
    for key in keys:
        vals = np.asarray([float(r.get(key, math.nan)) for r in rows], dtype=np.float64)
        per_metric[key] = {
            "mean": float(vals.mean()),
            "std": float(vals.std()),
            "30": float(np.quantile(vals, 0.3)),
            "70": float(np.quantile(vals, 0.7)),
        }
    summary = {"num_pairs": len(rows)}
    for key, (name, q) in SUMMARY_QUANTILES.items():
        if key in per_metric:
            summary[key] = per_metric[key]["mean"]
            summary[name] = per_metric[key]["30" if q == 0.3 else "70"]
    for key in ("sdlogj_honest", "fold_fraction", "runtime_s", "dice_initial", "ic_mean_mm"):
        if key in per_metric:
            summary[key] = per_metric[key]["mean"]
    if any("qc_flags" in r for r in rows):
        summary["flagged_pairs"] = sum(1 for r in rows if r.get("qc_flags"))
    return {"summary": summary, "aggregates": per_metric}


def _json_safe(obj):
    """JSON without NaN/inf tokens (strict parsers reject them): they become null / "inf"."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: Path, data: object) -> None:
    """Atomic JSON write (temp file + os.replace)."""
    atomic_write_text(Path(path), json.dumps(_json_safe(data), indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Atomic per-pair CSV (union of columns in first-seen order; NaN written as 'nan')."""
    import io

    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in columns})
    atomic_write_text(Path(path), buf.getvalue())


def write_results(
    output_dir: Path, rows: Sequence[Mapping[str, object]], name: str = "metrics", extra: dict | None = None
) -> dict:
    """Write ``<name>.csv`` (per pair) and ``<name>.json`` (aggregates + per pair); return the JSON data."""
    output_dir = Path(output_dir)
    write_csv(output_dir / f"{name}.csv", rows)
    data = {**aggregate(rows), **(extra or {}), "cases": list(rows)}
    write_json(output_dir / f"{name}.json", data)
    return data
