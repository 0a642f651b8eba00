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
    identity = np.meshgrid(*(np.arange(s) for s in disp.shape[:3]), indexing="ij")
    return scipy.ndimage.map_coordinates(moving_seg, identity + disp.transpose(3, 0, 1, 2), order=0)


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """Determinant of the Jacobian of x + u(x), cropped by 2 voxels on each side.

    ``disp`` is (D, H, W, 3) in voxels. Central differences (kernel [-0.5, 0, 0.5]) with zero
    padding, as the evaluator's ``jacobian_determinant`` (which takes (1, 3, D, H, W)).
    """
    disp = np.asarray(disp, dtype=np.float64)
    kernel = np.array([-0.5, 0.0, 0.5])
    jac = np.empty((3, 3, *disp.shape[:3]))
    for axis in range(3):  # derivative direction
        shape = [1, 1, 1]
        shape[axis] = 3
        k = kernel.reshape(shape)
        for comp in range(3):
            jac[axis, comp] = scipy.ndimage.correlate(disp[..., comp], k, mode="constant", cval=0.0)
    jac += np.eye(3).reshape(3, 3, 1, 1, 1)
    j = jac[:, :, 2:-2, 2:-2, 2:-2]
    return (
        j[0, 0] * (j[1, 1] * j[2, 2] - j[1, 2] * j[2, 1])
        - j[1, 0] * (j[0, 1] * j[2, 2] - j[0, 2] * j[2, 1])
        + j[2, 0] * (j[0, 1] * j[1, 2] - j[0, 2] * j[1, 1])
    )


def jacobian_stats(disp: np.ndarray) -> dict[str, float]:
    """Official SDlogJ, the honest std(log det) over det > 0, and the folded fraction (det <= 0)."""
    det = jacobian_determinant(disp)
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
    return [
        dice(fixed_seg == lab, warped_seg == lab)
        if (fixed_seg == lab).any() and (moving_seg == lab).any()
        else math.nan
        for lab in labels
    ]


def label_metrics(
    fixed_seg: np.ndarray,
    moving_seg: np.ndarray,
    warped_seg: np.ndarray,
    labels: Iterable[int] = LABELS,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, float]:
    """Per-organ DSC, HD95 (voxels, the official unit spacing) and HD95 in mm, and their nanmeans."""
    labels = list(labels)
    out: dict[str, float] = {}
    dsc = organ_dice(fixed_seg, moving_seg, warped_seg, labels)
    hd, hd_mm = [], []
    for lab, d in zip(labels, dsc, strict=True):
        fixed_mask = fixed_seg == lab
        warped_mask = warped_seg == lab
        if math.isnan(d):
            h = hm = math.nan
        else:
            h = robust_hausdorff(fixed_mask, warped_mask, (1.0, 1.0, 1.0))
            hm = robust_hausdorff(fixed_mask, warped_mask, spacing_mm)
        out[f"dice_{lab}"], out[f"hd95_{lab}"], out[f"hd95_mm_{lab}"] = d, h, hm
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
) -> dict[str, float]:
    """All metrics of one pair from its Learn2Reg field (D, H, W, 3) and, when given, its labels."""
    disp = np.asarray(disp, dtype=np.float64)
    labels = list(labels)
    out: dict[str, float] = {}
    if fixed_seg is not None and moving_seg is not None:
        fixed_seg, moving_seg = np.asarray(fixed_seg), np.asarray(moving_seg)
        if fixed_seg.shape != moving_seg.shape or fixed_seg.shape != disp.shape[:3]:
            raise ValueError(
                f"shape mismatch: fixed labels {fixed_seg.shape}, moving labels {moving_seg.shape}, field {disp.shape}"
            )
        warped = warp_labels(moving_seg, disp)
        out["dice_initial"] = _nanmean(organ_dice(fixed_seg, moving_seg, moving_seg, labels))
        out.update(label_metrics(fixed_seg, moving_seg, warped, labels, spacing_mm))
    out.update(jacobian_stats(disp))
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
    for key in ("sdlogj_honest", "fold_fraction", "runtime_s", "dice_initial"):
        if key in per_metric:
            summary[key] = per_metric[key]["mean"]
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
