"""``abdoreg export``: a trained bundle as the archive ``monai.bundle download`` reads.

The archive ``<name>_v<version>.zip`` holds one folder ``<name>/``: the bundle's configs, scripts, docs
and LICENSE, ``models/model.pt`` as a plain state dict (what ``monai.bundle.load`` reads with
``weights_only=True``), and ``configs/metadata.json`` stamped with the installed package versions, a
changelog entry, the training data and the measured validation figures.

A trained model's settings. The registration network records them in its weights (architecture, CT
windows, the training grid): the exported ``inference.json`` gets them as an explicit ``network_def``, so that
``monai.bundle.load`` and MONAI Label build that network from any working folder, and ``train.json`` gets the
same settings, so that fine-tuning from the archive builds it too. The segmentation bundle's settings are
command-line overrides (the pipeline file's), so its exported configs are stamped with them: the *model
settings* are the keys that ``train.json`` and ``inference.json`` define alike and that ``inference.json``'s
``network_def``, ``preprocessing`` or ``inferer`` use (width, patch size, grid); their values come from a
pipeline stage (``--stage``, refused unless the stage's stamp shows the model was made by exactly its configs
and overrides), a config or overrides file (``--train_config``), or ``--key value``. Before the archive is
written, a subprocess that sees only the staged bundle builds ``network_def`` from each exported config and
loads the weights strictly: a model that does not fit the stamped settings is refused.

This module calls the bundles' configs (in a subprocess) and reads the files they write; it imports no
bundle code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

from .atomic import atomic_write, remove_stale_temps, scratch
from .bundles import BUNDLES
from .pipeline import Runner, Stage, find_pipeline

# What an archive holds of a bundle folder; everything else (models/, eval/, logs, caches) stays out.
BUNDLE_PARTS = ("configs", "scripts", "docs", "LICENSE", "large_files.yml")
# Inference parts whose settings a trained model depends on (MONAI bundle properties, also what
# MONAI Label's BundleInferTask reads).
MODEL_PARTS = ("network_def", "preprocessing", "inferer")
# Bundle names: the zoo's lowercase words joined by "_". MONAI splits release asset names at the first
# "_v" (`_get_all_bundles_info`), and strips a "monai_" prefix for NGC sources, so neither may appear.
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
# Evaluation figures that depend on the machine rather than the model.
NOT_A_METRIC = ("runtime_s",)
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # reproducible archives: same content, same bytes


class ExportError(ValueError):
    """An export refused, with what to do about it."""


# ----------------------------------------------------------------------------- model settings


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def _refs(value: Any) -> set[str]:
    """Top-level ids that a raw config value references with ``@id`` (in expressions or alone)."""
    from monai.bundle.reference_resolver import ReferenceResolver

    if isinstance(value, str):
        return {ReferenceResolver.split_id(r)[0] for r in ReferenceResolver.match_refs_pattern(value)}
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else []
    return set().union(set(), *(_refs(v) for v in items))


def model_settings(train: Mapping, inference: Mapping) -> list[str]:
    """Keys defined alike in both configs that inference's network, preprocessing or inferer use
    (transitively); a key the two define differently (e.g. which dict keys to window) belongs to each
    workflow, not to the model."""
    seen: set[str] = set()
    todo = [p for p in MODEL_PARTS if p in inference]
    while todo:
        key = todo.pop()
        if key in seen or key not in inference:
            continue
        seen.add(key)
        todo.extend(_refs(inference[key]))
    return [k for k in inference if k in seen and k in train and train[k] == inference[k]]


def _parse_cli_value(value: Any) -> Any:
    """A pipeline override as ``python -m monai.bundle`` receives it (fire parses the command line)."""
    from fire.parser import DefaultParseValue

    return DefaultParseValue(value) if isinstance(value, str) else value


def training_settings(
    bundle_root: Path, configs: Iterable[str], overrides: Mapping[str, Any], keys: Iterable[str]
) -> dict[str, Any]:
    """The raw values of ``keys`` in the training run's merged configs with its overrides applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(bundle_root / "configs" / c) for c in configs]))
    for key, value in overrides.items():
        parser[key] = value
    return {k: parser[k] for k in keys}


def _stage_source(
    bundle: str, pipeline: str, work: str, stage_name: str
) -> tuple[Stage, Path, Path | None, list[str]]:
    """A finished training stage of a pipeline: the stage, its model, its evaluation's metrics, notes."""
    if not Path(work).is_dir():
        raise ExportError(f"--work {work}: no such folder (the working folder the pipeline ran the stage in)")
    runner = Runner(find_pipeline(pipeline), work, echo=lambda _: None)
    stages = {s.name: s for s in runner.stages}
    if stage_name not in stages:
        raise ExportError(f"pipeline {pipeline}: no stage {stage_name!r} (stages: {', '.join(stages)})")
    stage = stages[stage_name]
    if stage.bundle != bundle:
        raise ExportError(f"stage {stage_name} runs bundle {stage.bundle}, not {bundle}")
    if not runner.is_done(stage):
        raise ExportError(
            f"stage {stage_name} is not done in {work}, or its configs or overrides changed since it ran: "
            f"the model would not match the settings; run `abdoreg pipeline run --config {pipeline} "
            f"--work {work} --only {stage_name}` first"
        )
    models = [Path(o) for o in stage.outputs if o.endswith(".pt")]
    if not models:
        raise ExportError(f"stage {stage_name} writes no model (.pt) among its outputs {stage.outputs}")
    model = models[0]
    metrics = None
    for s in runner.stages:
        outs = [Path(o) for o in s.outputs if o.endswith("metrics.json")]
        if s.bundle == bundle and outs and str(model) in s.inputs and runner.is_done(s):
            metrics = outs[0]
            break
    notes = [f"pipeline {pipeline}, stage {stage_name}: configs {', '.join(stage.configs)}"]
    return stage, model, metrics, notes


# ----------------------------------------------------------------------------- weights and metrics


def plain_state_dict(model: Path) -> dict:
    """The network weights of ``model``: a plain state dict, or the ``model`` entry of a training checkpoint."""
    import torch

    if not model.is_file():
        raise ExportError(f"{model}: no such model file")
    try:
        state = torch.load(model, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(
            f"{model}: not a checkpoint that torch.load reads with weights_only=True ({e})"
        ) from e
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a CheckpointSaver dict {"model", "optimizer", "trainer", ...}
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise ExportError(f"{model}: holds no state dict of network weights (nor a 'model' entry with one)")
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _registration_metrics(data: Mapping, path: Path) -> tuple[dict, str]:
    summary = data.get("summary")
    if not isinstance(summary, Mapping):
        raise ExportError(f"{path}: no 'summary' (expected the registration evaluation's metrics.json)")
    method = str(data.get("method", ""))
    if method.startswith("fields:"):
        raise ExportError(f"{path}: scores the fields of a folder ({method}), not a network")
    if not summary.get("num_pairs") or not isinstance(summary.get("dice"), (int, float)):
        raise ExportError(f"{path}: no measured Dice over validation pairs (labels missing?)")
    figures = {
        ("val_mean_dice" if k == "dice" else f"val_{k}"): v
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_A_METRIC
    }
    text = f"{summary['num_pairs']} validation pairs, DSC {summary['dice']:.3f}"
    if isinstance(summary.get("dice30"), (int, float)):
        text += f", DSC30 {summary['dice30']:.3f}"
    return figures, text


def _segmentation_metrics(data: Mapping, path: Path) -> tuple[dict, str]:
    mean = data.get("mean_dice")
    if not isinstance(mean, (int, float)) or not isinstance(data.get("per_organ"), Mapping):
        raise ExportError(
            f"{path}: no 'mean_dice'/'per_organ' (expected the segmentation evaluation's dice_per_organ.json)"
        )
    figures = {"val_mean_dice": mean}
    for organ, value in data["per_organ"].items():
        if isinstance(value, (int, float)):
            figures[f"val_dice_{organ.replace(' ', '_')}"] = value
    n = len(data.get("per_case") or {})
    figures["val_num_cases"] = n
    return figures, f"{n} validation cases, mean Dice {mean:.3f}"


# The evaluation file each bundle writes, read into (eval_metrics, one line for the changelog).
METRIC_READERS = {"registration": _registration_metrics, "segmentation": _segmentation_metrics}


def measured_metrics(bundle: str, path: Path | None) -> tuple[dict, str]:
    """``eval_metrics`` from the bundle's evaluation output; exporting without one is refused."""
    if path is None:
        raise ExportError(
            "no measured validation figures: pass --metrics with the evaluation output of this model "
            "(registration: <evaluation>/metrics.json; segmentation: dice_per_organ.json). An archive "
            "without measured eval_metrics is not exported: a zoo reader could not judge the weights."
        )
    data = _read_json(Path(path))
    return METRIC_READERS[bundle](data, Path(path))


def installed_version(package: str) -> str:
    """The installed version of ``package`` (a local build tag such as ``+cpu`` dropped, as MONAI does)."""
    try:
        return importlib.metadata.version(package).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        raise ExportError(
            f"{package} is listed in the bundle's metadata.json but not installed here: "
            "export from the environment the model was trained and evaluated in"
        ) from None


# ----------------------------------------------------------------------------- staging and checks


def _copy_bundle(src: Path, dst: Path) -> None:
    """The shareable parts of a bundle folder (no caches, hidden files, models, runs)."""
    for part in BUNDLE_PARTS:
        path = src / part
        if path.is_file():
            shutil.copy2(path, dst / part)
        elif path.is_dir():
            shutil.copytree(path, dst / part, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.pyc"))
        elif part not in ("docs", "large_files.yml"):
            raise ExportError(f"{src}: bundle has no {part}")


def _stamp_config(path: Path, settings: Mapping[str, Any], network_def: Mapping | None = None) -> None:
    config = _read_json(path)
    config.update({k: v for k, v in settings.items() if k in config})
    if network_def is not None:
        config["network_def"] = dict(network_def)
    path.write_text(json.dumps(config, indent=2) + "\n")


# Run inside the staged registration bundle: the settings its weights record.
_SETTINGS = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from scripts.errors import InputError
from scripts.weights import network_from_checkpoint
try:
    net = network_from_checkpoint("models/model.pt")
except (InputError, TypeError, ValueError) as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(3)
print(json.dumps(net.settings))
"""


def _staged_env(bundle_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(bundle_dir), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def recorded_network(bundle_dir: Path, model: object) -> dict:
    """The registration network's settings as its staged weights record them."""
    proc = subprocess.run(
        [sys.executable, "-c", _SETTINGS],
        cwd=bundle_dir,
        env=_staged_env(bundle_dir),
        capture_output=True,
        text=True,
    )
    if proc.returncode == 3:
        raise ExportError(f"{model}: {json.loads(proc.stdout.strip().splitlines()[-1])['error']}")
    if proc.returncode != 0:
        raise ExportError(f"reading the network settings of {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def registration_train_settings(network: Mapping[str, Any]) -> dict:
    """train.json's keys for a network's settings (its CT windows as ``ct_windows``, all of them used; predicted
    labels as input as ``pseudo_input``)."""
    out = {
        k: v
        for k, v in network.items()
        if not k.startswith("input_") and k not in ("in_channels", "pseudo_channels")
    }
    if network.get("input_windows"):
        out.update(ct_windows=network["input_windows"], multi_window=True)
    if "pseudo_channels" in network:
        out["pseudo_input"] = bool(network["pseudo_channels"])
    return out


# Run inside the staged bundle with only it importable: build network_def from each config, load strictly.
_CHECK = r"""
import json, sys, warnings
import torch
from monai.bundle import ConfigParser
warnings.simplefilter("ignore")
state = torch.load("models/model.pt", map_location="cpu", weights_only=True)
for name in sys.argv[1:]:
    parser = ConfigParser()
    parser.read_config(f"configs/{name}")
    parser["bundle_root"] = "."
    net = parser.get_parsed_content("network_def")
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:  # ValueError: weights that record other settings
        print(json.dumps({"config": name, "error": str(e)}))
        sys.exit(3)
"""


def check_network(bundle_dir: Path, configs: Iterable[str], model: object = "models/model.pt") -> None:
    """Build each config's ``network_def`` in a subprocess seeing only ``bundle_dir``; load the weights strictly."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, *configs],
        cwd=bundle_dir,
        env=_staged_env(bundle_dir),
        capture_output=True,
        text=True,
    )
    if proc.returncode == 3:
        failure = json.loads(proc.stdout.strip().splitlines()[-1])
        error = failure["error"]
        raise ExportError(
            f"{model}: its weights do not fit the network that configs/{failure['config']} builds with the model "
            "settings given: pass the settings the model was trained with (--stage, --train_config or "
            f"--key value, e.g. --channel_multiplier 1). PyTorch: {error[:600]}{' ...' if len(error) > 600 else ''}"
        )
    if proc.returncode != 0:
        raise ExportError(f"building the exported network failed:\n{proc.stderr[-3000:]}")


def _stamp_large_files(root: Path, sha: str) -> None:
    """The archive's ``large_files.yml`` (MONAI zoo convention) carries the exported weights' sha256."""
    path = root / "large_files.yml"
    if not path.is_file():
        return
    import yaml

    spec = yaml.safe_load(path.read_text()) or {}
    for item in spec.get("large_files", []):
        if item.get("path") == "models/model.pt":
            item.update(hash_val=sha, hash_type="sha256")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def _write_zip(folder: Path, name: str, target: Path) -> None:
    """Zip ``folder`` as ``<name>/...`` into ``target`` atomically, with fixed times (same content, same bytes)."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo(f"{name}/{path.relative_to(folder).as_posix()}", FIXED_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, path.read_bytes())

    atomic_write(target, write)


def _readme_section(
    name: str, version: str, sha: str, data: str, settings: Mapping, figures: Mapping, notes: list[str]
) -> str:
    lines = [
        "",
        f"## This archive: {name} v{version}",
        "",
        f"Exported on {date.today().isoformat()} by `abdoreg export` with trained weights "
        f"(`models/model.pt`, sha256 `{sha}`).",
        "",
        f"Training data: {data}",
        "",
        *[f"Trained as: {n}" for n in notes],
        "",
        "Model settings stamped into `configs/train.json` and `configs/inference.json`:",
        "",
        *[f"- `{k}`: `{json.dumps(v)}`" for k, v in settings.items()],
        "",
        "Measured validation figures (`eval_metrics` in `configs/metadata.json`):",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in figures.items()],
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def export(
    bundle: str,
    model: str | None = None,
    metrics: str | None = None,
    data: str | None = None,
    out: str = "dist",
    name: str | None = None,
    version: str | None = None,
    changelog: str | None = None,
    stage: str | None = None,
    pipeline: str = "demo",
    work: str = "runs/demo",
    train_config: str | None = None,
    force: bool = False,
    **settings: Any,
) -> str:
    """Write ``<out>/<name>_v<version>.zip`` for ``monai.bundle download``; returns its path.

    ``--model`` the trained weights (a state dict or a CheckpointSaver checkpoint); ``--metrics`` the
    evaluation output of that model (required); ``--data`` what it was trained on (required). The model
    settings come from ``--stage S`` (a finished training stage of ``--pipeline``/``--work``; it also
    gives the model and the metrics of the stage that evaluated it), ``--train_config FILE`` (JSON/YAML of
    the training run's configs or overrides) and ``--key value`` (e.g. ``--channel_multiplier 1``).
    """
    src = BUNDLES / bundle
    if bundle not in METRIC_READERS or not (src / "configs" / "inference.json").is_file():
        raise ExportError(
            f"bundle {bundle!r} has no trained model to export (bundles: {', '.join(METRIC_READERS)})"
        )
    train_raw = _read_json(src / "configs" / "train.json")
    infer_raw = _read_json(src / "configs" / "inference.json")
    records_settings = bundle == "registration"  # its weights record the network's settings
    if records_settings and settings:
        raise ExportError(
            f"{', '.join(settings)}: the registration weights record their network settings (the exported configs "
            "get them from the weights), so an export takes none"
        )
    keys = [] if records_settings else model_settings(train_raw, infer_raw)
    unknown = [k for k in settings if re.split(r"#|::", k)[0] not in keys]
    if unknown:
        raise ExportError(
            f"{', '.join(unknown)}: not model settings of the {bundle} bundle (those are: {', '.join(keys)})"
        )

    configs, overrides, notes = ["train.json"], {}, []
    if stage:
        st, stage_model, stage_metrics, notes = _stage_source(bundle, pipeline, work, stage)
        configs = list(st.configs)
        overrides.update({k: _parse_cli_value(v) for k, v in st.overrides.items()})
        model = model or str(stage_model)
        metrics = metrics or (str(stage_metrics) if stage_metrics else None)
    if train_config and not records_settings:
        from monai.bundle import ConfigParser

        loaded = ConfigParser.load_config_file(train_config)
        overrides.update({k: v for k, v in loaded.items() if re.split(r"#|::", k)[0] in keys})
        notes.append(f"settings from {Path(train_config).name}")
    overrides.update(settings)
    if settings:
        notes.append("settings given: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items()))
    stamped = {} if records_settings else training_settings(src, configs, overrides, keys)
    changed = {k: v for k, v in stamped.items() if v != infer_raw[k] or v != train_raw[k]}

    if not model:
        raise ExportError("no model: pass --model <model.pt> (or --stage <training stage> of a pipeline)")
    figures, metrics_text = measured_metrics(bundle, Path(metrics) if metrics else None)
    if not data or not str(data).strip():
        raise ExportError(
            "no training data description: pass --data '<cohorts, scans and labels it was trained on>'"
        )
    meta = _read_json(src / "configs" / "metadata.json")
    name = name or f"abdominal_ct_{bundle}"
    version = str(version or meta["version"])
    if not NAME_RE.match(name) or "_v" in name or name.startswith("monai_"):
        raise ExportError(
            f"bundle name {name!r}: use lowercase words joined by '_' (e.g. abdominal_ct_{bundle}), "
            "with no '_v' (MONAI splits archive names there) and no 'monai_' prefix"
        )
    if not VERSION_RE.match(version):
        raise ExportError(f"version {version!r}: use MAJOR.MINOR.PATCH, e.g. 0.2.0")
    target = Path(out) / f"{name}_v{version}.zip"
    if target.exists() and not force:
        raise ExportError(
            f"{target} exists (a downloader would keep an old copy): pass a new --version, or --force"
        )

    state = plain_state_dict(Path(model))
    for stale in remove_stale_temps(Path(out), recursive=False):  # what a killed export left
        print(f"abdoreg export: removed {stale}, left by an interrupted export", file=sys.stderr)
    with scratch(out) as tmp:  # staged beside the archive, removed also on failure
        root = Path(tmp) / name
        (root / "models").mkdir(parents=True)
        _copy_bundle(src, root)
        import torch

        torch.save(state, root / "models" / "model.pt")
        sha = hashlib.sha256((root / "models" / "model.pt").read_bytes()).hexdigest()
        if records_settings:
            network = recorded_network(root, model)
            network_def = {"_target_": "scripts.networks.GradientRegNet", **network}
            _stamp_config(root / "configs" / "inference.json", {}, network_def)
            _stamp_config(root / "configs" / "train.json", registration_train_settings(network))
            changed = {"network_def": network_def}
        else:
            for cfg in ("train.json", "inference.json"):
                _stamp_config(root / "configs" / cfg, stamped)
        check_network(root, ["inference.json", "train.json"], model)
        _stamp_large_files(root, sha)

        packages = {**meta.get("required_packages_version", {}), **meta.pop("optional_packages_version", {})}
        entry = (
            f"{changelog + '; ' if changelog else ''}trained weights (sha256 {sha[:12]}), trained on {data}; "
            f"measured on {metrics_text}"
        )
        meta.update(
            version=version,
            changelog={
                version: entry,
                **{k: v for k, v in meta.get("changelog", {}).items() if k != version},
            },
            monai_version=installed_version("monai"),
            pytorch_version=installed_version("torch"),
            numpy_version=installed_version("numpy"),
            required_packages_version={p: installed_version(p) for p in packages},
            data_source=str(data),
            eval_metrics=figures,
        )
        (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        readme = root / "docs" / "README.md"
        readme.parent.mkdir(exist_ok=True)
        old = readme.read_text() if readme.exists() else f"# {name}\n"
        readme.write_text(old + _readme_section(name, version, sha, str(data), changed, figures, notes))
        _write_zip(root, name, target)
    return str(target)
