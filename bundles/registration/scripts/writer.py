"""The per-pair writer of every registration stage: Learn2Reg field, ITK transform, warped image and
labels, QC figure and metrics per pair; the metrics tables and the submission zip at the end."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts import fields
from scripts.atomic import atomic_write, atomic_write_text, remove_stale_temps
from scripts.errors import InputError, as_flag
from scripts.fields import ddf_of
from scripts.metrics import LABELS, jacobian_determinant, pair_metrics, warp_labels, write_json, write_results
from scripts.qc import qc_figure
from scripts.transforms import SEG, label_map

__all__ = ["RegistrationWriter", "prepare_run_folder", "RUN_FILE"]

# What a run writes into its output folder: the run's manifest, the per-pair folders, the submission, the tables.
RUN_FILE = "run.json"
PRODUCT_FOLDERS = ("pairs", "submission")
PRODUCT_FILES = ("metrics.csv", "metrics.json", "submission.zip", RUN_FILE)

logger = logging.getLogger("registration.infer")


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def _inverse_consistency(
    field: np.ndarray, inverse: np.ndarray, affine: np.ndarray, body: np.ndarray
) -> dict:
    """Mean and 95th percentile (mm) of ``u(x) + v(x + u(x))`` over the fixed scan's ``body``: how far forward
    then inverse lands from where it started (0 for an exact inverse)."""
    residual = fields.inverse_residual(fields.l2r_to_ddf(field)[None], fields.l2r_to_ddf(inverse)[None])[0]
    mm = np.linalg.norm(fields.ddf_to_l2r(residual) @ np.asarray(affine, np.float64)[:3, :3].T, axis=-1)
    inside = mm[body] if body.any() else mm.ravel()
    return {"ic_mean_mm": float(inside.mean()), "ic_p95_mm": float(np.percentile(inside, 95))}


def _run_pairs(pairs: Sequence[Mapping[str, str]]) -> list[list[str]]:
    return sorted([str(p["fixed"]), str(p["moving"])] for p in pairs)


def prepare_run_folder(
    output_dir: str | Path,
    pairs: Sequence[Mapping[str, str]],
    method: str,
    extra_inputs: Sequence[str] = (),
    overwrite: bool = False,
) -> None:
    """Make ``output_dir`` this run's: no input where an output goes, no results of another run mixed in.

    An input file (a scan, a label map, a field folder read by ``evaluate.json``) that lies in the folders or at
    the files this run writes is refused: the run would overwrite it. The folder's ``run.json`` names the pairs
    of the run that wrote it: another list of pairs is refused (its per-pair files, fields and tables would be
    mixed with this run's) unless ``overwrite``; then, and for a rerun of the same pairs, the earlier results are
    removed first. Under ``torch.distributed`` every process checks, process 0 clears, the others wait.
    """
    out = Path(output_dir).resolve()
    folders = [out / name for name in PRODUCT_FOLDERS]
    files = {out / name for name in PRODUCT_FILES}
    for raw in [v for p in pairs for v in p.values() if isinstance(v, str)] + [str(x) for x in extra_inputs]:
        path = Path(raw).resolve()
        inside = [d for d in folders if path == d or path.is_relative_to(d) or d.is_relative_to(path)]
        if path in files or inside:
            raise InputError(
                f"{raw}: an input lies where this run writes its outputs ({inside[0] if inside else path}): "
                "pass another --output_dir"
            )
    manifest = out / RUN_FILE
    this = _run_pairs(pairs)
    if manifest.is_file() and not overwrite:
        try:
            earlier = json.loads(manifest.read_text())
        except ValueError:
            earlier = {}
        if earlier.get("pairs") != this:
            listed = earlier.get("pairs") or [["?", "?"]]
            raise InputError(
                f"{out} holds the results of another run (method {earlier.get('method', '?')}, {len(listed)} "
                f"pair(s), e.g. fixed {listed[0][0]}, moving {listed[0][1]}); this run registers {len(this)} "
                "other pair(s): pass another --output_dir to keep both, or --overwrite True to replace them"
            )
    elif not manifest.exists() and not overwrite and any(p.exists() for p in [*folders, *files]):
        raise InputError(
            f"{out} holds registration results that no {RUN_FILE} describes (an earlier version's, or another "
            "tool's): pass another --output_dir, or --overwrite True to replace them"
        )
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        for path in [*folders, *files]:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        atomic_write_text(manifest, json.dumps({"method": method, "pairs": this}, indent=1) + "\n")
    if distributed:
        dist.barrier()


def _zip_files(folder: Path, names: Sequence[str], zip_path: Path) -> Path:
    """Zip the files ``names`` of ``folder`` (flat, as Learn2Reg submissions are), atomically.

    Only this run's fields: the folder may hold an earlier run's fields for other pairs.
    """

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(set(names)):
                zf.write(folder / name, arcname=name)

    return atomic_write(zip_path, write)


class RegistrationWriter:
    """Ignite handler writing, per pair, the Learn2Reg field (submission folder), the ITK transform,
    the warped image and labels on the fixed grid (fixed affine), a QC PNG and the metrics; and at
    the end the metrics CSV/JSON over all pairs and the submission zip.

    Many pairs: only the metric rows are kept, never arrays. The files of a pair are written by
    ``write_threads`` background threads, one file each at a time (gzip compression releases the GIL), while
    the main thread computes that pair's inverse and metrics; they are finished before the pair's row is
    returned, so no arrays outlive their pair. Each row also records where the pair's time went (``time_load_s``,
    ``time_field_s`` = network or classical method, ``time_warp_s``, ``time_metrics_s``,
    ``time_write_s`` summed over the files, ``time_pair_s`` from loading to the last file written, ``cpu_pair_s`` its CPU seconds, all
    threads) and the process's peak memory so far
    (``peak_rss_gb``; ``gpu_peak_gb`` on CUDA), which the inference benchmark reads. With
    ``release_batch`` the engine's reference to the written pair is dropped, so the next pair is
    loaded without this one still in memory.
    """

    def __init__(
        self,
        output_dir: str,
        labels: Sequence[int] = LABELS,
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
        release_batch: bool = True,
        write_inverse: bool | str = True,
        inverse_grid: int = 2,
        flag_folding: float = 0.05,
        flag_overlap: float = 0.5,
        pairs: Sequence[Mapping[str, str]] | None = None,
        extra_inputs: Sequence[str] = (),
        overwrite: bool | str = False,
        write_threads: int = 2,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.labels = tuple(int(x) for x in labels)
        self.short_names, self.field_ext, self.field_dtype = short_names, field_ext, field_dtype
        self.write_fields, self.write_itk, self.itk_convention = write_fields, write_itk, itk_convention
        self.write_images, self.write_qc, self.make_zip = write_images, write_qc, make_zip
        self.pad_value, self.metrics_name, self.method = float(pad_value), metrics_name, method
        self.release_batch = release_batch
        self.write_inverse, self.inverse_grid = as_flag(write_inverse), int(inverse_grid)
        self.flag_folding, self.flag_overlap = float(flag_folding), float(flag_overlap)
        self.pairs, self.extra_inputs, self.overwrite = pairs, list(extra_inputs or []), as_flag(overwrite)
        self.write_threads = max(1, int(write_threads))
        self.rows: list[dict] = []
        self._marks: dict[str, float] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._mark, "load")
        engine.add_event_handler(Events.ITERATION_STARTED, self._mark, "field")
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    @property
    def submission_dir(self) -> Path:
        return self.output_dir / "submission"

    def _started(self, engine: Engine) -> None:
        if self.pairs is not None:
            prepare_run_folder(self.output_dir, self.pairs, self.method, self.extra_inputs, self.overwrite)
        for path in remove_stale_temps(self.output_dir):  # what a killed run left
            logger.info("removed %s, left by an interrupted run", path)
        self.rows = []
        self._pool = self._new_pool()

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.write_threads, thread_name_prefix="registration-writer")

    def _mark(self, engine: Engine, name: str) -> None:
        self._marks[name] = time.perf_counter()
        self._marks[f"{name}_cpu"] = time.process_time()

    def _iteration(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the field's time includes the GPU's work, not just its launch
        now = time.perf_counter()
        timing = {}
        if {"load", "field"} <= set(self._marks):
            timing = {
                "time_load_s": self._marks["field"] - self._marks["load"],
                "time_field_s": now - self._marks["field"],
            }
        ddf = ddf_of(output["pred"]).detach().float().cpu()
        runtimes = output.get("runtime_s") if isinstance(output, Mapping) else None
        inverse = output.get("pred_inverse") if isinstance(output, Mapping) else None
        for b in range(ddf.shape[0]):
            extra = dict(timing)
            if runtimes is not None:
                extra["runtime_s"] = float(runtimes[b])
            elif "time_field_s" in timing:
                extra["runtime_s"] = timing["time_field_s"] / ddf.shape[0]
            start = None if inverse is None else fields.ddf_to_l2r(inverse[b].detach().float().cpu())
            self.rows.append(self.write_pair(batch, b, fields.ddf_to_l2r(ddf[b]), extra, start))
        if self.release_batch:  # else the engine holds this pair while the next one is loaded
            engine.state.batch = engine.state.output = None

    def _files(self, jobs: list[Callable[[], object]], after_previous: bool = True) -> list[Future]:
        """Write files in the background threads (one job per file); first wait until the previous pair's
        are written. Each future gives its job's seconds."""
        if after_previous:
            self._wait()
        if self._pool is None:  # used outside an engine
            self._pool = self._new_pool()

        def timed(job: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            job()
            return time.perf_counter() - t0

        futures = [self._pool.submit(timed, job) for job in jobs]
        self._pending.extend(futures)
        return futures

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises a failed write here

    def write_pair(
        self,
        batch: dict,
        b: int,
        field: np.ndarray,
        extra: dict | None = None,
        inverse_start: np.ndarray | None = None,
    ) -> dict:
        """All per-pair outputs of item ``b`` of ``batch``; returns its metrics row.

        The inverse (fixed -> moving) is the written forward field inverted (``fields.invert_field``), started from
        ``inverse_start`` (a symmetric network's own fixed -> moving field) where given; its inverse-consistency
        error (``ic_mean_mm``, ``ic_p95_mm``: the residual of forward then inverse, inside the fixed scan's body)
        goes to the metrics.

        Every output comes from the field as it is written (rounded to ``field_dtype``), so the warped
        files, the QC figure and the metrics are what the Learn2Reg evaluator sees from the submission.
        """
        t0 = time.perf_counter()
        fixed_path, moving_path = batch["path_fixed"][b], batch["path_moving"][b]
        fixed_img = batch["fixed"][b]
        affine = np.asarray(fixed_img.affine, np.float64)
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        fixed, moving = fixed_img[0].numpy(), batch["moving"][b, 0].numpy()
        shift = batch.get("world_shift")
        shift = None if shift is None else np.asarray(shift[b], np.float64)
        tag = fields.pair_tag(fixed_path, moving_path)
        pair_dir = self.output_dir / "pairs" / tag
        if self.write_fields:  # score the field as written (float16 rounding), as the evaluator reads it
            field = field.astype(self.field_dtype).astype(np.float32)
        has_labels = SEG["fixed"] in batch and SEG["moving"] in batch
        moving_seg = (
            label_map(batch[SEG["moving"]][b, 0], max(self.labels), moving_path)
            if SEG["moving"] in batch
            else None
        )
        warped = fields.warp_image(moving, field, cval=self.pad_value)
        warped_seg = warp_labels(moving_seg, field) if moving_seg is not None else None
        t_warp = time.perf_counter()
        jobs: list[Callable[[], object]] = []
        if self.write_fields:
            name = fields.field_name(fixed_path, moving_path, short=self.short_names, ext=self.field_ext)
            jobs.append(
                partial(fields.save_l2r_field, self.submission_dir / name, field, self.field_dtype, affine)
            )
        if self.write_itk:
            jobs.append(
                partial(
                    fields.save_itk_displacement,
                    pair_dir / "itk_displacement.nii.gz",
                    field,
                    affine,
                    shift,
                    self.itk_convention,
                )
            )
        if self.write_images:
            jobs.append(
                partial(
                    fields.save_nifti,
                    pair_dir / "warped_image.nii.gz",
                    np.round(warped).astype(np.int16),
                    affine,
                )
            )
            if warped_seg is not None:
                jobs.append(partial(fields.save_nifti, pair_dir / "warped_label.nii.gz", warped_seg, affine))
        inverse_metrics: dict = {}
        if self.write_inverse:
            t_inv = time.perf_counter()
            inverse = fields.invert_field(field, inverse_start, grid=self.inverse_grid)
            inverse_metrics = _inverse_consistency(field, inverse, affine, fixed > -500.0)
            inverse_metrics["time_inverse_s"] = time.perf_counter() - t_inv
            # the inverse lives on the moving scan: the model grid read in its space (shifted back by the centre
            # alignment's world shift), and maps its points to the fixed scan's
            moving_affine = affine.copy()
            if shift is not None:
                moving_affine[:3, 3] -= shift
            back = None if shift is None else -shift
            jobs.append(
                partial(
                    fields.save_l2r_field,
                    pair_dir / "disp_inverse.nii.gz",
                    inverse,
                    self.field_dtype,
                    moving_affine,
                )
            )
            if self.write_itk:
                jobs.append(
                    partial(
                        fields.save_itk_displacement,
                        pair_dir / "itk_inverse_displacement.nii.gz",
                        inverse.astype(self.field_dtype).astype(np.float32),
                        moving_affine,
                        back,
                        self.itk_convention,
                    )
                )
        files = self._files(jobs)
        det = jacobian_determinant(field)  # for the metrics and the QC figure
        checks = self._checks(fixed, warped, det)
        if checks["qc_flags"]:
            logger.warning("%s: check this result: %s", tag, checks["qc_flags"])
        if self.write_qc:
            title = f"{self.method}: {tag}" + (
                f"\nFLAGGED: {checks['qc_flags']}" if checks["qc_flags"] else ""
            )
            qc = partial(qc_figure, fixed, moving, warped, field, pair_dir / "qc.png", spacing, title=title)
            files += self._files([partial(qc, inner_det=det)], after_previous=False)
        metrics = pair_metrics(
            field,
            label_map(batch[SEG["fixed"]][b, 0], max(self.labels), fixed_path) if has_labels else None,
            moving_seg if has_labels else None,
            self.labels,
            spacing,
            warped_seg=warped_seg if has_labels else None,
            det=det,
        )
        t_done = time.perf_counter()
        row: dict = {"fixed": fixed_path, "moving": moving_path}
        if (
            shift is not None
        ):  # one-pair mode: the translation that put the moving scan on the fixed one first
            row["world_shift_mm"] = [round(float(v), 3) for v in shift]
            row["alignment"] = str(batch.get("alignment", ["?"] * (b + 1))[b])
        row.update(metrics)
        row.update(checks)
        row.update(inverse_metrics)
        row.update(extra or {})
        row.update(
            {
                "time_warp_s": t_warp - t0,
                "time_metrics_s": t_done - t_warp,
                "time_write_s": sum(f.result() for f in files),
            }
        )
        row["time_pair_s"] = (
            row.get("time_load_s", 0.0) + row.get("time_field_s", 0.0) + time.perf_counter() - t0
        )
        if "load_cpu" in self._marks:  # CPU seconds of the whole process (all threads) for this pair
            row["cpu_pair_s"] = time.process_time() - self._marks["load_cpu"]
        row["peak_rss_gb"] = peak_rss_gb()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            row["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        write_json(pair_dir / "metrics.json", row)
        logger.info(
            "%s: %s",
            tag,
            ", ".join(
                f"{k}={row[k]:.4g}"
                for k in ("dice", "hd95", "sdlogj", "fold_fraction", "time_pair_s")
                if k in row
            ),
        )
        return row

    def _checks(self, fixed: np.ndarray, warped: np.ndarray, det: np.ndarray) -> dict:
        """Signs of a failed registration, whatever the labels: folded voxels above ``flag_folding``, and an image
        overlap (Dice of the bodies, > -500 HU, of the fixed and the warped moving scan) below ``flag_overlap``."""
        body_f, body_w = fixed > -500.0, warped > -500.0
        total = body_f.sum() + body_w.sum()
        overlap = float(2.0 * (body_f & body_w).sum() / total) if total else 1.0
        folding = float((det <= 0).mean()) if det.size else 0.0
        flags = []
        if folding > self.flag_folding:
            flags.append(f"{folding:.1%} of the voxels fold (more than {self.flag_folding:.1%})")
        if overlap < self.flag_overlap:
            flags.append(
                f"the warped scan covers the fixed one poorly (body overlap {overlap:.2f} < {self.flag_overlap})"
            )
        return {"image_overlap": overlap, "qc_flags": "; ".join(flags)}

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending = []

    def _gather_rows(self) -> list[dict] | None:
        """Every process's rows, in the pair list's order, on rank 0 (None on the other ranks).

        Under ``torch.distributed`` (``multi_gpu_inference.json``) each process writes the pairs a
        ``DistributedSampler`` gave it (rank r: pairs r, r + n, ...); rank 0 merges the rows into one
        table once every process has written its files.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.rows
        per_rank: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(per_rank, self.rows)
        if dist.get_rank() != 0:
            return None
        longest = max(len(r) for r in per_rank)
        return [rows[i] for i in range(longest) for rows in per_rank if i < len(rows)]

    def _completed(self, engine: Engine) -> None:
        self._wait()
        self._shutdown()
        rows = self._gather_rows()
        if not rows:
            return
        self.rows = rows
        data = write_results(self.output_dir, self.rows, self.metrics_name, {"method": self.method})
        logger.info("summary: %s", data["summary"])
        if self.write_fields and self.make_zip:  # this run's fields (every process's), no earlier run's
            names = [
                fields.field_name(r["fixed"], r["moving"], self.short_names, self.field_ext) for r in rows
            ]
            _zip_files(self.submission_dir, names, self.output_dir / "submission.zip")
