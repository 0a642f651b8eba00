"""The writer of every registration stage, and its only job: per pair the Learn2Reg field, the ITK transforms,
the inverse, the warped scan and labels, the QC figure and the metrics row; the run folder's manifest, the
metrics tables and the submission zip. What it writes is computed before it (``scripts.postprocessing``)."""

from __future__ import annotations

import json
import logging
import shutil
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
from scripts.metric_files import write_json, write_results
from scripts.pair_events import PairEvents, register_pair_events
from scripts.qc import qc_figure

__all__ = ["RegistrationWriter", "prepare_run_folder", "RUN_FILE"]

# What a run writes into its output folder: the run's manifest, the per-pair folders, the submission, the tables.
RUN_FILE = "run.json"
PRODUCT_FOLDERS = ("pairs", "submission")
PRODUCT_FILES = ("metrics.csv", "metrics.json", "submission.zip", RUN_FILE)

logger = logging.getLogger("registration.infer")


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

    An input file (a scan, a label map, a field folder read by ``field_folder.json``) that lies in the folders or at
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
            f"{out} holds registration results that no {RUN_FILE} describes (another tool's?): pass another "
            "--output_dir, or --overwrite True to replace them"
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
    """Ignite handler writing every file of a registration run, in ``write_threads`` background threads.

    Per pair (the pairs ``PairPostprocessing`` made, listed before this handler): the Learn2Reg field
    (``submission/``, stored as ``field_dtype``), and in ``pairs/<tag>/`` the ITK displacement transform, the inverse
    field and its ITK transform (where the post-processing made an inverse), the warped scan (int16) and labels,
    the QC figure and the pair's ``metrics.json``. Each file is handed to the threads as soon as what it holds exists
    (on ``PairEvents``: the fields once the pair is made, the warped scan after its step, ...), so the files are
    compressed while the next steps run; all of a batch's files are written before its rows are kept, so no array
    outlives its pair. With ``release_batch`` the engine's reference to the written pair is dropped, so the next pair
    is loaded without this one still in memory. At the start the run folder is made this run's
    (``prepare_run_folder``); at the end ``metrics.csv``/``metrics.json`` over all pairs (every process's under
    ``torch.distributed``, merged by rank 0) and ``submission.zip``.
    """

    def __init__(
        self,
        output_dir: str,
        short_names: bool = False,
        field_ext: str = ".nii.gz",
        field_dtype: str = "float16",
        write_fields: bool = True,
        write_itk: bool = True,
        itk_convention: str = "ants",
        write_images: bool = True,
        write_qc: bool = True,
        make_zip: bool = True,
        metrics_name: str = "metrics",
        method: str = "network",
        release_batch: bool = True,
        pairs: Sequence[Mapping[str, str]] | None = None,
        extra_inputs: Sequence[str] = (),
        overwrite: bool | str = False,
        write_threads: int = 2,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.short_names, self.field_ext, self.field_dtype = short_names, field_ext, field_dtype
        self.write_fields, self.write_itk, self.itk_convention = write_fields, write_itk, itk_convention
        self.write_images, self.write_qc, self.make_zip = write_images, write_qc, make_zip
        self.metrics_name, self.method, self.release_batch = metrics_name, method, release_batch
        self.pairs, self.extra_inputs, self.overwrite = pairs, list(extra_inputs or []), as_flag(overwrite)
        self.write_threads = max(1, int(write_threads))
        self.rows: list[dict] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        # per pair of the batch (by its index), the files already handed to the threads
        self._handed: dict[int, set[str]] = {}

    def attach(self, engine: Engine) -> None:
        register_pair_events(engine)
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(PairEvents.PAIRS_READY, self._write_ready)
        engine.add_event_handler(PairEvents.STEP_COMPLETED, self._write_ready)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    @property
    def submission_dir(self) -> Path:
        return self.output_dir / "submission"

    def pair_dir(self, pair: Mapping) -> Path:
        return self.output_dir / "pairs" / fields.pair_tag(pair["path_fixed"], pair["path_moving"])

    def _started(self, engine: Engine) -> None:
        if self.pairs is not None:
            prepare_run_folder(self.output_dir, self.pairs, self.method, self.extra_inputs, self.overwrite)
        for path in remove_stale_temps(self.output_dir):  # what a killed run left
            logger.info("removed %s, left by an interrupted run", path)
        self.rows = []
        self._pool = self._new_pool()

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.write_threads, thread_name_prefix="registration-writer")

    @staticmethod
    def _pairs(engine: Engine) -> list[dict]:
        pairs = engine.state.output
        if not isinstance(pairs, list):
            raise TypeError(
                "RegistrationWriter writes the pairs PairPostprocessing makes: list that handler before the writer"
            )
        return pairs

    def _write_ready(self, engine: Engine) -> None:
        for index, pair in enumerate(self._pairs(engine)):
            self.write(pair, self._handed.setdefault(index, set()))

    def write(self, pair: dict, handed: set[str] | None = None) -> None:
        """Hand the threads each file of ``pair`` whose content exists and that is not in ``handed`` (the names of
        the outputs already handed, updated)."""
        handed = set() if handed is None else handed
        outputs = (  # name, wanted, what it needs (the pair's products or its metrics), its files
            ("fields", self.write_fields or self.write_itk, ("ddf",), self._field_files),
            ("warped_image", self.write_images, ("warped_image",), self._warped_image),
            ("warped_label", self.write_images, ("warped_label",), self._warped_label),
            ("inverse", True, ("inverse_ddf",), self._inverse_files),
            # the QC figure's title shows the quality flags: drawn once QualityFlagsd has run
            ("qc", self.write_qc, ("warped_image", "jacobian_det", "qc_flags"), self._qc_figure),
        )
        jobs: list[Callable[[], object]] = []
        for name, wanted, needs, files in outputs:
            if wanted and name not in handed and all(k in pair or k in pair["metrics"] for k in needs):
                handed.add(name)
                jobs += files(pair)
        if self._pool is None:  # used outside an engine
            self._pool = self._new_pool()
        self._pending.extend(self._pool.submit(job) for job in jobs)

    def _field_files(self, pair: dict) -> list[Callable[[], object]]:
        """The Learn2Reg field (the submission) and the ITK displacement transform, from the pair's ddf."""
        field, affine = fields.ddf_to_field(pair["ddf"]), pair["affine"]
        jobs = []
        if self.write_fields:
            name = fields.field_name(
                pair["path_fixed"], pair["path_moving"], self.short_names, self.field_ext
            )
            jobs.append(
                partial(fields.save_field, self.submission_dir / name, field, self.field_dtype, affine)
            )
        if self.write_itk:
            path = self.pair_dir(pair) / "itk_displacement.nii.gz"
            shift = pair.get("world_shift")
            jobs.append(
                partial(fields.save_itk_displacement, path, field, affine, shift, self.itk_convention)
            )
        return jobs

    def _warped_image(self, pair: dict) -> list[Callable[[], object]]:
        warped = np.round(pair["warped_image"].numpy()).astype(np.int16)
        return [
            partial(fields.save_nifti, self.pair_dir(pair) / "warped_image.nii.gz", warped, pair["affine"])
        ]

    def _warped_label(self, pair: dict) -> list[Callable[[], object]]:
        path = self.pair_dir(pair) / "warped_label.nii.gz"
        return [partial(fields.save_nifti, path, pair["warped_label"], pair["affine"])]

    def _inverse_files(self, pair: dict) -> list[Callable[[], object]]:
        """The inverse field and its ITK transform. The inverse lives on the moving scan: the model grid read in its
        space (shifted back by the centre alignment's world shift), and maps its points to the fixed scan's."""
        inverse, shift = fields.ddf_to_field(pair["inverse_ddf"]), pair.get("world_shift")
        moving_affine = pair["affine"].copy()
        if shift is not None:
            moving_affine[:3, 3] -= shift
        pair_dir = self.pair_dir(pair)
        path = pair_dir / "disp_inverse.nii.gz"
        jobs = [partial(fields.save_field, path, inverse, self.field_dtype, moving_affine)]
        if self.write_itk:
            as_stored = inverse.astype(self.field_dtype).astype(np.float32)
            back = None if shift is None else -shift
            path = pair_dir / "itk_inverse_displacement.nii.gz"
            jobs.append(
                partial(
                    fields.save_itk_displacement, path, as_stored, moving_affine, back, self.itk_convention
                )
            )
        return jobs

    def _qc_figure(self, pair: dict) -> list[Callable[[], object]]:
        pair_dir, flags = self.pair_dir(pair), pair["metrics"]["qc_flags"]
        title = f"{self.method}: {pair_dir.name}" + (f"\nFLAGGED: {flags}" if flags else "")
        images = [pair[k].numpy() for k in ("fixed", "moving", "warped_image")]
        path = pair_dir / "qc.png"
        return [partial(qc_figure, *images, pair["jacobian_det"], path, pair["spacing"], title=title)]

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises a failed write here

    def _iteration(self, engine: Engine) -> None:
        pairs = self._pairs(engine)
        for index, pair in enumerate(pairs):
            self.write(pair, self._handed.setdefault(index, set()))
        self._wait()
        self._handed = {}
        engine.fire_event(PairEvents.FILES_WRITTEN)
        for pair in pairs:
            row = pair["metrics"]
            write_json(self.pair_dir(pair) / "metrics.json", row)
            shown = ("dice", "hd95", "sdlogj", "fold_fraction", "time_pair_s")
            summary = ", ".join(f"{k}={row[k]:.4g}" for k in shown if k in row)
            logger.info("%s: %s", self.pair_dir(pair).name, summary)
            self.rows.append(row)
        if self.release_batch:  # else the engine holds this pair while the next one is loaded
            engine.state.batch = engine.state.output = None

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
