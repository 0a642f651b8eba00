"""The post-processing chain of inference: from a pair's ddf to everything the writer writes, one step per product.

As the model zoo chains ``Invertd``, ``AsDiscreted`` and metric handlers after the network, ``inference.json``
chains these steps after the field source (the network, instance optimisation, a classical method, a field
folder). ``PairPostprocessing``, an Ignite handler, makes the source's output one ``ddf`` per pair, once: a CPU
float32 tensor (3, D, H, W) in voxels, rounded to the dtype its file stores, so that every output comes from the
field as the Learn2Reg evaluator reads it. Each step then adds its product to the pair's dict and its numbers to
the pair's metrics row (``pair["metrics"]``); none writes a file (``scripts.writer`` does). Numpy appears only where
a numpy-only library reads the data: scipy's ``map_coordinates`` (the evaluator's label warp), the surface
distances, the evaluator's float64 Jacobian.

A pair: ``fixed``, ``moving`` (D, H, W) HU tensors on the fixed grid, ``affine`` (that grid's, float64),
``spacing`` (mm), ``path_fixed``/``path_moving``, ``ddf``, ``metrics``, and where the batch has them
``label_fixed``/``label_moving``, ``world_shift``/``alignment`` (one-pair mode), ``inverse_start`` (a symmetric
network's own fixed -> moving ddf) and ``runtime_s`` (the source's seconds). The steps add ``warped_image``,
``warped_label``, ``jacobian_det``, ``inverse_ddf``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose

from scripts.errors import as_flag
from scripts.fields import (
    as_written,
    ddf_of,
    ddf_to_field,
    inverse_residual,
    invert_ddf,
    pair_tag,
    warp_image,
)
from scripts.label_checks import label_map
from scripts.metrics import jacobian_determinant, jacobian_stats, pair_label_metrics, warp_labels
from scripts.pair_events import PairEvents, register_pair_events
from scripts.transforms import LABEL

__all__ = [
    "PairPostprocessing",
    "OrganLabelsd",
    "WarpImaged",
    "WarpLabeld",
    "LabelMetricsd",
    "JacobianStatsd",
    "QualityFlagsd",
    "InverseDdfd",
    "InverseConsistencyd",
]

logger = logging.getLogger("registration.infer")
BODY_HU = -500.0  # voxels above this are the body (air and the scanner table's surroundings are below)


def _plain(image: Any) -> torch.Tensor:
    """A tensor without MONAI's metadata (a ``MetaTensor`` tracks every operation on it)."""
    return torch.as_tensor(image).as_subclass(torch.Tensor)


def _scored(pair: dict, numbers: dict) -> dict:
    """``pair`` with ``numbers`` added to its metrics row (MONAI's dictionary transforms return a new dict)."""
    out = dict(pair)
    out["metrics"] = {**pair["metrics"], **numbers}
    return out


class PairPostprocessing:
    """Ignite handler: after each iteration, the field source's output as one ``ddf`` per pair, then the steps.

    ``postprocessing``: the steps (a MONAI ``Compose`` or a list), each ``pair -> pair``, run in order on every pair
    of the batch; ``engine.state.output`` becomes the list of pairs. ``as_written``: round the ddf to ``field_dtype``
    first (the field is written: its outputs and metrics are those of the file); not for fields read from files.
    Fires ``PairEvents.PAIRS_READY`` once the ddfs are made and ``PairEvents.STEP_COMPLETED`` after each step
    (``engine.state.pair_step``: the step's ``phase``), so the writer writes each product while the next step runs.
    """

    def __init__(
        self,
        postprocessing: Compose | Sequence[Callable[[dict], dict]] = (),
        field_dtype: str = "float16",
        as_written: bool | str = True,
    ) -> None:
        steps = postprocessing.transforms if isinstance(postprocessing, Compose) else postprocessing
        self.steps = list(steps)
        self.field_dtype, self.as_written = field_dtype, as_flag(as_written)

    def attach(self, engine: Engine) -> None:
        register_pair_events(engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        pairs = self.pairs(engine.state.batch, engine.state.output)
        engine.state.output = pairs
        engine.fire_event(PairEvents.PAIRS_READY)
        for i in range(len(pairs)):
            for step in self.steps:
                pairs[i] = step(pairs[i])
                engine.state.pair_step = getattr(step, "phase", "postprocess")
                engine.fire_event(PairEvents.STEP_COMPLETED)
            if "runtime_s" in pairs[i]:
                pairs[i]["metrics"]["runtime_s"] = pairs[i]["runtime_s"]

    def pairs(self, batch: dict, output: dict) -> list[dict]:
        """The batch's pairs, each with its ddf (3, D, H, W): CPU float32, rounded as written where it is written."""
        ddf = ddf_of(output["pred"]).detach().float().cpu()
        if self.as_written:
            ddf = as_written(ddf, self.field_dtype)
        inverse, runtimes = output.get("pred_inverse"), output.get("runtime_s")
        shift = batch.get("world_shift")
        pairs = []
        for b in range(ddf.shape[0]):
            affine = np.asarray(batch["fixed"][b].affine, np.float64)
            pair = {
                "fixed": _plain(batch["fixed"][b, 0]),
                "moving": _plain(batch["moving"][b, 0]),
                "affine": affine,
                "spacing": tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)),
                "path_fixed": str(batch["path_fixed"][b]),
                "path_moving": str(batch["path_moving"][b]),
                "ddf": ddf[b],
            }
            pair.update({key: _plain(batch[key][b, 0]) for key in LABEL.values() if key in batch})
            row: dict = {"fixed": pair["path_fixed"], "moving": pair["path_moving"]}
            # one-pair mode: the translation that put the moving scan on the fixed one first
            if shift is not None:
                pair["world_shift"] = np.asarray(shift[b], np.float64)
                pair["alignment"] = str(batch.get("alignment", ["?"] * (b + 1))[b])
                row["world_shift_mm"] = [round(float(v), 3) for v in pair["world_shift"]]
                row["alignment"] = pair["alignment"]
            if inverse is not None:
                pair["inverse_start"] = inverse[b].detach().float().cpu().contiguous()
            if runtimes is not None:
                pair["runtime_s"] = float(runtimes[b])
            pair["metrics"] = row
            pairs.append(pair)
        return pairs


class OrganLabelsd:
    """The label maps as uint8 organ ids (numpy: scipy and the surface distances read them), each checked to hold
    ids 0..``max_label`` only (``label_map``: an error naming the scan)."""

    phase = "warp"

    def __init__(self, max_label: int = 13) -> None:
        self.max_label = int(max_label)

    def __call__(self, pair: dict) -> dict:
        out = dict(pair)
        for side in ("fixed", "moving"):
            if LABEL[side] in out:
                out[LABEL[side]] = label_map(out[LABEL[side]], self.max_label, out[f"path_{side}"])
        return out


class WarpImaged:
    """``warped_image``: the moving scan on the fixed grid (``fields.warp_image``, linear), ``pad_value`` outside."""

    phase = "warp"

    def __init__(self, pad_value: float = -1024.0) -> None:
        self.pad_value = float(pad_value)

    def __call__(self, pair: dict) -> dict:
        return {**pair, "warped_image": warp_image(pair["moving"], pair["ddf"], cval=self.pad_value)}


class WarpLabeld:
    """``warped_label``: the moving labels (``OrganLabelsd``'s) on the fixed grid by the evaluator's nearest
    neighbour (``metrics.warp_labels``); nothing without moving labels."""

    phase = "warp"

    def __call__(self, pair: dict) -> dict:
        if LABEL["moving"] not in pair:
            return pair
        return {**pair, "warped_label": warp_labels(pair[LABEL["moving"]], pair["ddf"])}


class LabelMetricsd:
    """Dice per organ, HD95 (voxels and mm) and the unregistered Dice, where both scans have labels
    (``metrics.pair_label_metrics`` of ``OrganLabelsd``'s maps and ``WarpLabeld``'s warped labels)."""

    phase = "metrics"

    def __init__(self, labels: Sequence[int] = tuple(range(1, 14))) -> None:
        self.labels = tuple(int(x) for x in labels)

    def __call__(self, pair: dict) -> dict:
        if LABEL["fixed"] not in pair or LABEL["moving"] not in pair:
            return pair
        warped = pair.get("warped_label")
        if warped is None:
            warped = warp_labels(pair[LABEL["moving"]], pair["ddf"])
        numbers = pair_label_metrics(
            pair[LABEL["fixed"]], pair[LABEL["moving"]], warped, self.labels, pair["spacing"]
        )
        return _scored(pair, numbers)


class JacobianStatsd:
    """``jacobian_det`` (the evaluator's float64 determinant, 2-voxel border cropped) and its statistics: SDlogJ,
    the honest std(log det) over det > 0, the folded fraction (``metrics.jacobian_stats``)."""

    phase = "metrics"

    def __call__(self, pair: dict) -> dict:
        det = jacobian_determinant(pair["ddf"])
        return {**_scored(pair, jacobian_stats(pair["ddf"], det)), "jacobian_det": det}


class QualityFlagsd:
    """Signs of a failed registration, whatever the labels: folded voxels above ``max_folding`` (of
    ``JacobianStatsd``'s determinant), and an image overlap (Dice of the bodies of the fixed scan and the warped
    moving scan) below ``min_overlap``; the row's ``image_overlap`` and ``qc_flags`` (empty when none), and a
    warning in the log."""

    phase = "metrics"

    def __init__(self, max_folding: float = 0.05, min_overlap: float = 0.5) -> None:
        self.max_folding, self.min_overlap = float(max_folding), float(min_overlap)

    def __call__(self, pair: dict) -> dict:
        body_f, body_w = pair["fixed"] > BODY_HU, pair["warped_image"] > BODY_HU
        total = int(body_f.sum()) + int(body_w.sum())
        overlap = 2.0 * int((body_f & body_w).sum()) / total if total else 1.0
        det = pair["jacobian_det"]
        folding = float((det <= 0).mean()) if det.size else 0.0
        flags = []
        if folding > self.max_folding:
            flags.append(f"{folding:.1%} of the voxels fold (more than {self.max_folding:.1%})")
        if overlap < self.min_overlap:
            flags.append(
                f"the warped scan covers the fixed one poorly (body overlap {overlap:.2f} < {self.min_overlap})"
            )
        if flags:
            tag = pair_tag(pair["path_fixed"], pair["path_moving"])
            logger.warning("%s: check this result: %s", tag, "; ".join(flags))
        return _scored(pair, {"image_overlap": overlap, "qc_flags": "; ".join(flags)})


class InverseDdfd:
    """``inverse_ddf``: the fixed -> moving ddf, the forward one inverted (``fields.invert_ddf``) on a grid ``grid``
    times coarser, started from a symmetric network's own inverse where the pair has one."""

    phase = "inverse"

    def __init__(self, grid: int = 2) -> None:
        self.grid = int(grid)

    def __call__(self, pair: dict) -> dict:
        start = pair.get("inverse_start")
        inverse = invert_ddf(pair["ddf"][None], None if start is None else start[None], grid=self.grid)
        return {**pair, "inverse_ddf": inverse[0]}


class InverseConsistencyd:
    """How far forward then inverse lands from where it started, ``u(x) + v(x + u(x))`` in mm (0 for an exact
    inverse): mean and 95th percentile over the fixed scan's body (``ic_mean_mm``, ``ic_p95_mm``)."""

    phase = "inverse"

    def __call__(self, pair: dict) -> dict:
        if "inverse_ddf" not in pair:
            return pair
        residual = inverse_residual(pair["ddf"][None], pair["inverse_ddf"][None])[0]
        # in numpy float64, as the other metrics: the field layout the matrix product has always had
        mm = np.linalg.norm(ddf_to_field(residual) @ pair["affine"][:3, :3].T, axis=-1)
        body = (pair["fixed"] > BODY_HU).numpy()
        inside = mm[body] if body.any() else mm.ravel()
        return _scored(
            pair, {"ic_mean_mm": float(inside.mean()), "ic_p95_mm": float(np.percentile(inside, 95))}
        )
