"""Registration metrics computed exactly as the official Learn2Reg evaluator does.

The evaluator (MDL-UzL/L2R, ``evaluation/evaluation.py`` and ``utils.py``) warps the moving
labels with ``scipy.ndimage.map_coordinates(order=0)``, scores DSC and HD95 per organ (NaN where
the organ is absent in fixed or moving), HD95 with DeepMind's ``surface_distance`` at unit spacing
(voxels), and SDlogJ as std(log(clip(det + 3, 1e-9, 1e9))) of the Jacobian of x + u(x) computed
by central differences with zero padding and a 2-voxel border crop. We reproduce it here, add the
HD95 in mm, the honest std(log det) over det > 0, and the fraction of folded voxels (det <= 0),
which the official SDlogJ hides (its folding count is always 0 because of the +3 shift).

The field is read in the evaluator's own layout, the ddf (3, D, H, W) in voxels (its ``jacobian_determinant`` takes
(1, 3, D, H, W), its label warp ``identity + ddf``), as a numpy array or a CPU tensor. This module computes; the
registration writer writes the numbers (``scripts.metric_files``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import scipy.ndimage
from monai.metrics.utils import get_mask_edges

# The bundle's one organ count (BTCV order: 1 spleen ... 13 left adrenal gland); configs pass ``num_organs``/``labels``.
NUM_ORGANS = 13
LABELS: tuple[int, ...] = tuple(range(1, NUM_ORGANS + 1))


# ----------------------------------------------------------------------------------------------
# warping and Jacobian (official conventions)
# ----------------------------------------------------------------------------------------------
def warp_labels(moving_label: np.ndarray, ddf: np.ndarray) -> np.ndarray:
    """Moving labels warped onto the fixed grid: ``moving(x + ddf(x))`` by nearest neighbour.

    ``ddf`` (3, D, H, W) in voxels. Same call as the evaluator (``map_coordinates`` order 0, constant 0 outside,
    coordinates in float64), so the warped labels match it voxel for voxel.
    """
    ddf = np.asarray(ddf)
    if ddf.ndim != 4 or ddf.shape[0] != 3 or ddf.shape[1:] != moving_label.shape:
        raise ValueError(
            f"ddf shape {ddf.shape} does not fit labels of shape {moving_label.shape} ((3,) + it)"
        )
    coords = np.empty(ddf.shape)
    for axis in range(3):  # identity + u, component by component (same float64 sums as a meshgrid + u)
        shape = [1, 1, 1]
        shape[axis] = ddf.shape[axis + 1]
        np.add(ddf[axis], np.arange(ddf.shape[axis + 1]).reshape(shape), out=coords[axis])
    return scipy.ndimage.map_coordinates(moving_label, coords, order=0)


def jacobian_determinant(ddf: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Determinant of the Jacobian of x + u(x), cropped by 2 voxels on each side.

    ``ddf`` (3, D, H, W) in voxels. Central differences (kernel [-0.5, 0, 0.5]) with zero padding, as the
    evaluator's ``jacobian_determinant`` (which takes (1, 3, D, H, W)). The zero
    padding only touches the outermost voxel, which the crop removes, so the differences are taken
    on the cropped block alone, ``0.5 * (u[i+1] - u[i-1])``: the same float64 numbers as the
    evaluator's correlation (scaling by 0.5 is exact), computed ``chunk`` slices at a time so the nine
    derivatives of a whole volume are never held at once.
    """
    comps = [np.asarray(ddf[c], dtype=np.float64) for c in range(3)]
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


def jacobian_stats(ddf: np.ndarray, det: np.ndarray | None = None) -> dict[str, float]:
    """Official SDlogJ, the honest std(log det) over det > 0, and the folded fraction (det <= 0).

    ``det``: ``jacobian_determinant(ddf)`` when the caller has it already (the QC figure shows it too).
    """
    det = jacobian_determinant(ddf) if det is None else det
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
    fixed_label: np.ndarray,
    moving_label: np.ndarray,
    warped_label: np.ndarray,
    labels: Iterable[int] = LABELS,
) -> list[float]:
    """Per-organ DSC of the warped labels against the fixed ones; NaN where the organ is absent in the
    fixed or the moving labels (the evaluator's rule, so absent organs never count as 0)."""
    labels = [int(lab) for lab in labels]
    scores = label_metrics(fixed_label, moving_label, warped_label, labels, hd95=False)
    return [scores[f"dice_{lab}"] for lab in labels]


def _boxes(label: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box of each label (None where absent), from one pass over the volume."""
    top = max(labels, default=0)
    found = scipy.ndimage.find_objects(np.where(label <= top, label, 0).astype(np.int32), max_label=top)
    return {lab: found[lab - 1] if lab >= 1 else None for lab in labels}


def _union(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None or b is None:
        return a or b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def _isotropic(spacing: Sequence[float]) -> bool:
    return max(spacing) - min(spacing) <= 1e-9 * max(spacing)


def label_metrics(
    fixed_label: np.ndarray,
    moving_label: np.ndarray,
    warped_label: np.ndarray,
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
    fixed_boxes, warped_boxes = _boxes(fixed_label, labels), _boxes(warped_label, labels)
    moving_boxes = _boxes(moving_label, labels)
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
            fixed_mask, warped_mask = fixed_label[box] == lab, warped_label[box] == lab
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


def pair_label_metrics(
    fixed_label: np.ndarray,
    moving_label: np.ndarray,
    warped_label: np.ndarray,
    labels: Iterable[int] = LABELS,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, float]:
    """The label metrics of one pair: the unregistered DSC (``dice_initial``), then ``label_metrics`` of the
    moving labels warped by ``warp_labels``."""
    fixed_label, moving_label = np.asarray(fixed_label), np.asarray(moving_label)
    if fixed_label.shape != moving_label.shape or fixed_label.shape != np.shape(warped_label):
        raise ValueError(
            f"shape mismatch: fixed labels {fixed_label.shape}, moving labels {moving_label.shape}, "
            f"warped labels {np.shape(warped_label)}"
        )
    labels = list(labels)
    out = {"dice_initial": _nanmean(organ_dice(fixed_label, moving_label, moving_label, labels))}
    out.update(label_metrics(fixed_label, moving_label, np.asarray(warped_label), labels, spacing_mm))
    return out


def pair_metrics(
    ddf: np.ndarray,
    fixed_label: np.ndarray | None = None,
    moving_label: np.ndarray | None = None,
    labels: Iterable[int] = LABELS,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, float]:
    """All metrics of one pair from its ddf (3, D, H, W) and, when given, its labels: ``pair_label_metrics``
    then ``jacobian_stats``, the columns the evaluation writes."""
    ddf = np.asarray(ddf, dtype=np.float64)
    out: dict[str, float] = {}
    if fixed_label is not None and moving_label is not None:
        if np.shape(moving_label) != ddf.shape[1:]:
            raise ValueError(f"shape mismatch: moving labels {np.shape(moving_label)}, ddf {ddf.shape}")
        warped = warp_labels(np.asarray(moving_label), ddf)
        out.update(pair_label_metrics(fixed_label, moving_label, warped, labels, spacing_mm))
    out.update(jacobian_stats(ddf))
    return out


# ----------------------------------------------------------------------------------------------
# aggregation
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
