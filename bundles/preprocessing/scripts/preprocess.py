"""Preprocess one cohort: every case onto the reference grid, labels in the 13-organ scheme, a datalist.

Per case: read (NIfTI or DICOM) -> validate -> align to the reference with ANTs -> resample
once onto the target grid (linear image, nearest labels, -1024 HU outside) -> remap labels ->
write image, label and a record atomically. Finished, unchanged cases are skipped on a re-run;
failed cases are reported with path and reason after the others are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .atomic import remove_stale_temps, scratch
from .files import json_bytes, nifti_bytes, write_if_changed
from .geometry import (
    CaseError,
    Volume,
    align,
    grid_center,
    identity_transform,
    make_reproducible,
    read_volume,
    resample,
    target_affine,
    to_ants,
    translation_mm,
    unit_axes,
)
from .labels import LabelTable
from .layouts import LAYOUT_HELP, Case, CohortListing, list_cohort
from .locks import hold

logger = logging.getLogger("preprocessing")
RECORD_VERSION = 2  # 2: alignments seeded and on one ITK thread (earlier outputs are redone once)


class PreprocessingFailed(RuntimeError):
    """Some cases failed; the message lists each with its path and reason."""


@dataclass
class Settings:
    cohort: str
    table: dict
    organs: dict[str, str]
    output_dir: Path
    pixdim: tuple[float, float, float]
    spatial_size: tuple[int, int, int]
    align: str
    pad_value: float
    reference: Path | None
    registration: dict
    seed: int = 1
    deterministic: bool = True

    def digest(self) -> str:
        """Hash of everything that changes a case's output (not the input: that is the signature)."""
        ref = file_signature(self.reference) if self.reference else None
        keys = {
            "v": RECORD_VERSION,
            "table": self.table,
            "organs": self.organs,
            "pixdim": self.pixdim,
            "spatial_size": self.spatial_size,
            "align": self.align,
            "pad": self.pad_value,
            "reference": ref,
            "registration": self.registration,
            "seed": self.seed if self.deterministic else None,
        }
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_signature(path: Path | None) -> list | None:
    """Size and mtime of a file, or of every file of a DICOM folder: cheap change detection."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _outputs(s: Settings, case: Case, with_label: bool) -> tuple[Path, Path | None, Path]:
    base = s.output_dir / s.cohort
    name = f"{case.case}.nii.gz"
    return (
        base / "images" / name,
        (base / "labels" / name) if with_label else None,
        base / "records" / f"{case.case}.json",
    )


def process_case(s: Settings, case: Case, labels: LabelTable, reference: Volume | None) -> dict:
    """Preprocess one case (or skip it when its record matches); returns its record."""
    with_label = labels.has_labels and case.label is not None
    img_out, lab_out, rec_out = _outputs(s, case, with_label)
    signature = {
        "image": file_signature(case.image),
        "label": file_signature(case.label) if with_label else None,
    }
    digest = s.digest()
    if rec_out.exists() and img_out.exists() and (lab_out is None or lab_out.exists()):
        old = json.loads(rec_out.read_text())
        if old.get("signature") == signature and old.get("settings") == digest:
            return {**old, "skipped": True}

    image = read_volume(case.image, "image")
    native = None
    if with_label:
        native = read_volume(case.label, "label")
        if native.array.shape != image.array.shape or not np.allclose(native.affine, image.affine, atol=1e-3):
            raise CaseError(
                f"{case.label}: label grid {native.array.shape} does not match image {case.image} grid {image.array.shape}"
                " (shape or affine differ)"
            )
    elif labels.has_labels and case.split != "test" and not case.label_optional:
        raise CaseError(f"{case.image}: missing label file (the cohort {s.cohort} is labelled)")

    # Target grid: the reference's orientation and centre (Learn2Reg space), the configured spacing and shape.
    ref = reference if reference is not None else image
    aff = target_affine(unit_axes(ref.affine), s.pixdim, s.spatial_size, grid_center(ref))
    moving = to_ants(image)
    # ANTs writes its transforms into a hidden folder of the output, removed after the case (and, if the run is
    # killed, by the next run)
    with scratch(s.output_dir / s.cohort) as tmpdir:
        try:
            transforms: list[str] = []
            if s.align != "none":
                if reference is None:
                    raise CaseError(
                        f"{case.image}: align={s.align!r} needs a reference scan (set `reference`)"
                    )
                found = align(
                    moving,
                    to_ants(reference),
                    s.pixdim,
                    s.align,
                    outprefix=str(tmpdir) + "/",
                    **s.registration,
                )
                transforms = [str(p) for p in found]
            applied = transforms or identity_transform(tmpdir)
            out_img = resample(moving, aff, s.spatial_size, applied, "linear", s.pad_value)
            out_img = np.clip(np.rint(out_img), -32768, 32767).astype(np.int16)
            out_lab = None
            if native is not None:
                remapped = labels.remap(native.array, case.label)
                lab_img = to_ants(Volume(remapped.astype(np.float32), native.affine))
                out_lab = np.rint(resample(lab_img, aff, s.spatial_size, applied, "genericLabel", 0)).astype(
                    np.uint8
                )
                out_lab = labels.split_by_side(out_lab, out_img, aff)
                stray = sorted(set(np.unique(out_lab).tolist()) - set(range(labels.n_organs + 1)))
                if stray:  # e.g. a side-split class left unassigned: never write ids outside the organ scheme
                    raise CaseError(
                        f"{case.label}: remapped label ids {stray} are outside 0..{labels.n_organs}"
                    )
            translation = translation_mm(transforms) if s.align == "translation" else None
        except ValueError as exc:
            raise CaseError(str(exc)) from exc

    if out_lab is not None:
        write_if_changed(lab_out, nifti_bytes(out_lab, aff))
    write_if_changed(img_out, nifti_bytes(out_img, aff))
    record = {
        "case": case.case,
        "cohort": s.cohort,
        "source_image": str(case.image),
        "source_label": str(case.label) if with_label else None,
        "image": str(img_out.relative_to(s.output_dir)),
        "label": str(lab_out.relative_to(s.output_dir)) if lab_out else None,
        "split": case.split,
        "annotated": labels.annotated if out_lab is not None else [0] * labels.n_organs,
        "organs_present": sorted(int(v) for v in np.unique(out_lab) if v) if out_lab is not None else [],
        "align": s.align,
        "translation_ras_mm": translation,
        "signature": signature,
        "settings": digest,
    }
    write_if_changed(rec_out, json_bytes(record))  # written last: its presence means the case is complete
    return record


def _worker(args):
    s, case, labels, reference = args
    try:
        return case, process_case(s, case, labels, reference), None
    except CaseError as exc:
        return case, None, str(exc)
    except Exception as exc:  # keep the other cases going; the summary names this one
        return case, None, f"{case.image}: {type(exc).__name__}: {exc}"


def _datalist(s: Settings, listing: CohortListing, records: dict[str, dict]) -> dict:
    items: dict[str, list] = {"training": [], "validation": [], "test": []}
    for case in listing.cases:
        rec = records.get(case.case)
        if rec is None:
            continue
        item = {
            "image": rec["image"],
            "cohort": s.cohort,
            "case": case.case,
            "annotated": rec["annotated"],
            "split": rec["split"],
        }
        if rec["label"]:
            item["label"] = rec["label"]
        items.setdefault(rec["split"], []).append(item)
    out = {
        "labels": s.organs,
        "pixdim": list(s.pixdim),
        "spatial_size": list(s.spatial_size),
        "cohorts": [s.cohort],
        **{k: v for k, v in items.items() if v or k != "test"},
    }
    for key, pairs in listing.pairs.items():
        out[key] = []
        for f, m in pairs:
            if f in records and m in records:
                pair = {"fixed": records[f]["image"], "moving": records[m]["image"]}
                if records[f]["label"] and records[m]["label"]:
                    pair |= {"fixed_label": records[f]["label"], "moving_label": records[m]["label"]}
                out[key].append(pair)
    return out


def _grid(part: dict) -> tuple[list[float], list[int]]:
    return [float(v) for v in part.get("pixdim", [])], [int(v) for v in part.get("spatial_size", [])]


def _describe(grid: tuple[list[float], list[int]]) -> str:
    pixdim, spatial_size = grid
    return f"{'x'.join(f'{v:g}' for v in pixdim)} mm, {'x'.join(str(v) for v in spatial_size)} voxels"


def cohort_grids(output_dir: Path) -> dict[str, tuple[list[float], list[int]]]:
    """The grid (pixdim, spatial_size) of every cohort datalist in ``output_dir``, by cohort."""
    return {
        path.name[len("datalist_") : -len(".json")]: _grid(json.loads(path.read_text()))
        for path in sorted(Path(output_dir).glob("datalist_*.json"))
    }


def merge_datalists(output_dir: Path) -> dict:
    """Merge every ``datalist_<cohort>.json`` of ``output_dir`` into ``datalist.json``.

    The file is rewritten only when its content changes (later pipeline stages stay done), and
    removed when no cohort is left. Cohorts on different grids are refused: one folder, one grid.
    """
    output_dir = Path(output_dir)
    grids = cohort_grids(output_dir)
    if len({json.dumps(g) for g in grids.values()}) > 1:
        listed = ", ".join(f"{c} ({_describe(g)})" for c, g in grids.items())
        raise PreprocessingFailed(f"{output_dir}: cohorts on different grids, not merged: {listed}")
    merged: dict = {}
    for path in sorted(output_dir.glob("datalist_*.json")):
        part = json.loads(path.read_text())
        for key, value in part.items():
            if key in ("labels", "pixdim", "spatial_size"):
                merged.setdefault(key, value)
            elif isinstance(value, list):
                merged.setdefault(key, []).extend(value)
    if merged:
        write_if_changed(output_dir / "datalist.json", json_bytes(merged))
    else:
        (output_dir / "datalist.json").unlink(missing_ok=True)
    return merged


def _check_grid(cohort: str, out: Path, pixdim, spatial_size) -> None:
    """One output folder holds one grid; a re-run of ``cohort`` on a new grid withdraws its old datalist.

    Other cohorts on another grid: refused before anything is written. This cohort on another
    grid (a re-run with a new ``pixdim``/``spatial_size``): its datalist is removed first and written
    again when the run completes, so a datalist never lists images of another grid, even if the
    run is killed half-way.
    """
    wanted = ([float(v) for v in pixdim], [int(v) for v in spatial_size])
    grids = cohort_grids(out)
    others = {c: g for c, g in grids.items() if c != cohort and g != wanted}
    if others:
        listed = ", ".join(f"{c} ({_describe(g)})" for c, g in others.items())
        raise PreprocessingFailed(
            f"cohort {cohort}: {out} holds cohorts on another grid: {listed}; this run asks for "
            f"{_describe(wanted)}. One output folder holds one grid: preprocess into another output_dir "
            "(or remove that folder first)"
        )
    if cohort in grids and grids[cohort] != wanted:
        logger.warning(
            f"cohort {cohort}: grid changes from {_describe(grids[cohort])} to {_describe(wanted)}; "
            "its datalist is withdrawn until this run completes"
        )
        (out / f"datalist_{cohort}.json").unlink()
        merge_datalists(out)


def find_reference(reference: str | None, output_dir: Path) -> Path | None:
    """The reference scan: the configured one, else the first preprocessed Learn2Reg image in ``output_dir``."""
    if reference:
        return Path(reference)
    for cohort in ("l2r", "l2r2020"):
        found = sorted(
            p for p in (output_dir / cohort / "images").glob("*.nii.gz") if not p.name.startswith(".")
        )
        if found:
            return found[0]
    return None


def read_table(cohort: str, cohort_table: str) -> dict:
    """The cohort's label table; an unknown cohort is an error that lists the known ones."""
    path = Path(cohort_table)
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise PreprocessingFailed(
            f"unknown cohort {cohort!r}: no label table {path}. Known cohorts: {', '.join(known) or 'none'}. "
            "For your own scans use `--cohort folder` (labels already in the 13-organ scheme) or write a "
            "table and pass `--cohort_table /path/table.json` (see the bundle's docs/README.md)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PreprocessingFailed(f"{path}: not a valid JSON label table ({exc})") from exc


def run_cohort(
    cohort: str,
    input_dir: str,
    output_dir: str,
    cohort_table: str,
    organs_file: str,
    pixdim=(2.0, 2.0, 2.0),
    spatial_size=(192, 160, 256),
    align: str | None = None,
    pad_value: float = -1024.0,
    reference: str | None = None,
    num_workers: int = 1,
    registration: dict | None = None,
    seed: int = 1,
    deterministic: bool = True,
) -> dict:
    """Preprocess every case of a cohort folder; write ``datalist_<cohort>.json`` and the merged ``datalist.json``."""
    table = read_table(cohort, cohort_table)
    organs = json.loads(Path(organs_file).read_text())
    out = Path(output_dir)
    try:
        listing = list_cohort(input_dir, table)
    except (OSError, ValueError, KeyError) as exc:
        raise PreprocessingFailed(
            f"cohort {cohort}: cannot list the cases of {input_dir} (layout {table.get('layout')!r}): {exc}"
        ) from exc
    if not listing.cases:
        raise PreprocessingFailed(
            f"cohort {cohort}: no cases found in {input_dir} (layout {table.get('layout')!r}); is it the "
            f"right folder? Nothing was written. {LAYOUT_HELP.get(table.get('layout'), '')}"
        )
    align_mode = (align or table.get("align", "translation")).lower()
    ref_path = find_reference(reference, out) if align_mode != "none" or reference else None
    if align_mode != "none" and ref_path is None:
        raise PreprocessingFailed(
            f"cohort {cohort}: align={align_mode!r} needs a reference Learn2Reg scan: set `reference`, or preprocess the l2r cohort into {out} first"
        )
    produced, source = (out / cohort).resolve(), Path(input_dir).resolve()
    if source == produced or source.is_relative_to(produced):
        raise PreprocessingFailed(
            f"cohort {cohort}: the input folder {input_dir} lies where this run writes its outputs ({produced}): "
            "pass another output_dir"
        )
    hold(out, f"preprocessing of cohort {cohort}")  # one run at a time writes into an output folder
    _check_grid(cohort, out, pixdim, spatial_size)
    for path in remove_stale_temps(out / cohort) + remove_stale_temps(out, recursive=False):
        logger.info(f"removed {path}, left by an interrupted run")
    reproducible = (int(seed), str(deterministic).strip().lower() not in ("false", "0", "no"))
    s = Settings(
        cohort,
        table,
        organs,
        out,
        tuple(float(v) for v in pixdim),
        tuple(int(v) for v in spatial_size),
        align_mode,
        float(pad_value),
        ref_path,
        dict(registration or {}),
        *reproducible,
    )
    reference_vol = read_volume(ref_path, "reference") if ref_path else None
    labels = LabelTable(table, organs)
    logger.info(
        f"cohort {cohort}: {len(listing.cases)} cases from {input_dir} -> {out / cohort} (align: {align_mode})"
    )
    records: dict[str, dict] = {}
    failures: list[str] = []
    jobs = [(s, case, labels, reference_vol) for case in listing.cases]
    # the same inputs give the same voxels on every run (geometry.make_reproducible), in this process and in each worker
    make_reproducible(*reproducible)
    if num_workers > 1:
        with ProcessPoolExecutor(
            max_workers=num_workers, initializer=make_reproducible, initargs=reproducible
        ) as pool:
            futures = [pool.submit(_worker, job) for job in jobs]
            results = (f.result() for f in as_completed(futures))
            for case, rec, err in tqdm(results, total=len(jobs), desc=cohort, unit="case"):
                _collect(case, rec, err, records, failures)
    else:
        for job in tqdm(jobs, desc=cohort, unit="case"):
            _collect(*_worker(job), records, failures)
    skipped = sum(1 for r in records.values() if r.get("skipped"))
    if records:  # a run where every case failed leaves the datalists as they were
        write_if_changed(out / f"datalist_{cohort}.json", json_bytes(_datalist(s, listing, records)))
        merge_datalists(out)
    logger.info(
        f"cohort {cohort}: {len(records) - skipped} processed, {skipped} unchanged (skipped), {len(failures)} failed"
    )
    summary = {"cohort": cohort, "processed": len(records) - skipped, "skipped": skipped, "failed": failures}
    if failures:
        raise PreprocessingFailed(
            f"cohort {cohort}: {len(failures)} of {len(jobs)} cases failed:\n  " + "\n  ".join(failures)
        )
    return summary


def _collect(case: Case, rec: dict | None, err: str | None, records: dict, failures: list) -> None:
    if err is not None:
        logger.error(err)
        failures.append(err)
    else:
        records[case.case] = rec
