"""Where a pair's displacement field comes from: the network (``InferenceBatch`` feeds it), a
folder of Learn2Reg fields, ANTs SyN or ConvexAdam. Each is a piece of one MONAI ``SupervisedEvaluator``
(``prepare_batch`` or ``iteration_update``) whose output is the ddf (B, 3, D, H, W), so outputs and metrics are
computed the same way for every method (``scripts.postprocessing``). Each ``iteration_update`` names what it runs
(``method``), the label of the run's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine

from scripts.errors import InputError, as_flag
from scripts.fields import field_to_ddf, find_field, load_field
from scripts.losses import one_hot_organs
from scripts.transforms import PSEUDO, PSEUDO_HINT

__all__ = ["InferenceBatch", "FieldFolderIteration", "SynIteration", "ConvexAdamIteration"]


class InferenceBatch:
    """``prepare_batch``: network input = moving channels then fixed channels, one tensor; with
    ``pseudo_channels`` > 0 each scan's windows are followed by its predicted labels, one-hot (the input of a
    network trained with ``pseudo_input``)."""

    def __init__(
        self,
        moving_key: str = "input_moving",
        fixed_key: str = "input_fixed",
        pseudo_channels: int = 0,
        pseudo_keys: Sequence[str] = (PSEUDO["moving"], PSEUDO["fixed"]),
    ) -> None:
        self.moving_key, self.fixed_key = moving_key, fixed_key
        self.pseudo_channels, self.pseudo_keys = int(pseudo_channels), tuple(pseudo_keys)

    def __call__(self, batch: dict, device=None, non_blocking: bool = False, **kwargs):
        parts = []
        for image_key, pseudo_key, name in zip(
            (self.moving_key, self.fixed_key), self.pseudo_keys, ("moving", "fixed"), strict=True
        ):
            parts.append(torch.as_tensor(batch[image_key]))
            if self.pseudo_channels:
                if pseudo_key not in batch:
                    raise InputError(
                        f"the network reads predicted labels of both scans, {name} scan "
                        f"{batch.get('path_' + name, ['?'])[0]} has none: {PSEUDO_HINT}"
                    )
                parts.append(one_hot_organs(torch.as_tensor(batch[pseudo_key]), self.pseudo_channels))
        return torch.cat(parts, dim=1).to(device=device, non_blocking=non_blocking), None


class FieldFolderIteration:
    """``iteration_update`` that reads each pair's Learn2Reg field from a folder (any method's): ``field_folder.json``.

    With ``pairs``, every pair's field is looked up before the first one is scored.
    """

    def __init__(self, field_dir: str | None, pairs: Sequence[dict] | None = None) -> None:
        if not field_dir:
            raise InputError("no field folder to score: pass --field_dir <folder of Learn2Reg fields>")
        self.given, self.field_dir = str(field_dir), Path(field_dir)
        if not self.field_dir.is_dir():
            raise InputError(f"{self.field_dir}: field folder not found")
        missing = []
        for p in pairs or []:
            try:
                find_field(self.field_dir, p["fixed"], p["moving"])
            except FileNotFoundError as exc:
                missing.append(str(exc))
        if missing:
            raise InputError(f"{len(missing)} of {len(pairs)} pairs have no field: " + "; ".join(missing[:3]))

    @property
    def method(self) -> str:
        return f"fields: {self.given}"

    def __call__(self, engine: Engine, batch: dict) -> dict:
        ddfs = []
        for fixed, moving in zip(batch["path_fixed"], batch["path_moving"], strict=True):
            field = load_field(find_field(self.field_dir, fixed, moving))
            if tuple(field.shape[:3]) != tuple(batch["fixed"].shape[2:]):
                raise InputError(
                    f"field for {fixed} / {moving} has shape {field.shape}, scans {tuple(batch['fixed'].shape[2:])}"
                )
            ddfs.append(field_to_ddf(field))
        return {"pred": torch.stack(ddfs)}


class _PerPairIteration:
    """``iteration_update`` of a classical method: one registration per pair, on the loaded arrays; its Learn2Reg
    field becomes the ddf, and its runtime goes to the metrics."""

    method = "classical"

    def register(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def __call__(self, engine: Engine, batch: dict) -> dict:
        ddfs, runtimes = [], []
        for b in range(batch["fixed"].shape[0]):
            field, seconds = self.register(batch["fixed"][b, 0], batch["moving"][b, 0])
            ddfs.append(field_to_ddf(field))
            runtimes.append(seconds)
        return {"pred": torch.stack(ddfs), "runtime_s": runtimes}


class SynIteration(_PerPairIteration):
    """ANTs SyN (antspyx) per pair.

    ``deterministic``: with a ``random_seed`` in ``registration``, one ITK thread, so a rerun gives
    the same fields (``scripts.syn.make_reproducible``). ``temp_dir``: where ANTs' transforms go while a pair
    is registered (a hidden folder, removed after the pair).
    """

    method = "ants_syn"

    def __init__(
        self,
        registration: dict,
        clip_hu: Sequence[float] | None = (-1000.0, 1500.0),
        deterministic: bool = True,
        temp_dir: str | None = None,
    ) -> None:
        self.registration = dict(registration)
        self.clip_hu = tuple(clip_hu) if clip_hu else None
        self.deterministic = as_flag(deterministic)
        self.temp_dir = temp_dir

    def register(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[np.ndarray, float]:
        from scripts.syn import register_pair  # antspyx only for this stage

        aff = np.asarray(fixed.affine, np.float64)
        return register_pair(
            fixed.numpy(),
            moving.numpy(),
            aff,
            aff,
            clip_hu=self.clip_hu,
            deterministic=self.deterministic,
            temp_dir=self.temp_dir,
            **self.registration,
        )


class ConvexAdamIteration(_PerPairIteration):
    """ConvexAdam (the ``convexadam`` package) per pair, on ``device``."""

    method = "convexadam"

    def __init__(
        self,
        params: dict,
        clip_hu: Sequence[float] | None = (-1000.0, 1500.0),
        device: str | torch.device = "cpu",
    ) -> None:
        self.params = dict(params)
        self.clip_hu = tuple(clip_hu) if clip_hu else None
        self.device = torch.device(device)

    def register(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[np.ndarray, float]:
        from scripts.convex_adam import register_pair  # convexadam only for this stage

        return register_pair(fixed.numpy(), moving.numpy(), self.clip_hu, self.device, **self.params)
