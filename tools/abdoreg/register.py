"""``abdoreg register``: one pair of scans, one command, with this repository's bundle or a shared one.

It runs the registration bundle's ``configs/inference.json`` in one-pair mode, as ``python -m monai.bundle run``
would (the command line is printed), with trained weights when there are some (``--model``, or the bundle's
``models/model.pt``; an exported archive carries its own) and otherwise with instance optimisation from the
identity, which needs none. The bundle is this repository's, a bundle folder, or an archive that ``abdoreg
export`` wrote (``<name>_v<version>.zip``, extracted once into a cache folder). Nothing of the bundle is imported.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

from .atomic import atomic_write, remove_stale_temps
from .bundles import BUNDLES, bundle_command, bundle_env
from .errors import UsageError

CACHE = Path(os.environ.get("ABDOREG_CACHE", Path.home() / ".cache" / "abdoreg"))


def _bundle_folder(bundle: str | None) -> Path:
    """The bundle to run: this repository's registration bundle, a bundle folder, or an archive's folder."""
    if bundle is None:
        return BUNDLES / "registration"
    path = Path(bundle).expanduser()
    if path.is_dir():
        if not (path / "configs" / "inference.json").is_file():
            raise UsageError(
                f"--bundle {path}: a bundle folder holds configs/inference.json; this one does not"
            )
        return path
    if path.suffix.lower() != ".zip" or not path.is_file():
        raise UsageError(f"--bundle {path}: no such bundle folder or archive (<name>_v<version>.zip)")
    try:
        with zipfile.ZipFile(path) as zf:
            tops = {Path(n).parts[0] for n in zf.namelist() if Path(n).parts}
    except zipfile.BadZipFile:
        raise UsageError(f"--bundle {path}: not a readable zip archive (truncated? fetch it again)") from None
    if len(tops) != 1:
        raise UsageError(
            f"--bundle {path}: a bundle archive holds one folder <name>/, this one {sorted(tops)}"
        )
    (name,) = tops
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    target = CACHE / "bundles" / f"{path.stem}-{digest}"
    if not (target / name).is_dir():
        remove_stale_temps(target.parent, recursive=False)

        def extract(tmp: Path) -> None:
            with zipfile.ZipFile(path) as zf:
                zf.extractall(tmp)

        atomic_write(target, extract)
    return target / name


def register(
    fixed: str,
    moving: str,
    out: str = "registered",
    model: str | None = None,
    bundle: str | None = None,
    fixed_label: str | None = None,
    moving_label: str | None = None,
    fixed_pseudo: str | None = None,
    moving_pseudo: str | None = None,
    instance_opt: bool | None = None,
    overwrite: bool = False,
    device: str | None = None,
    pixdim: tuple | list | None = None,
    spatial_size: tuple | list | None = None,
) -> str:
    """Register MOVING onto FIXED (two scans of any orientation and spacing: NIfTI, NRRD, MetaImage files or DICOM
    series folders); write the field, the ITK transforms in both directions, the warped scan and, with both label
    maps, the Learn2Reg metrics into ``--out``.

    ``--fixed_pseudo``/``--moving_pseudo``: the segmentation bundle's predicted label maps of the two scans, which a
    network trained with predicted labels as input reads (and instance optimisation's Dice term).
    ``--model`` trained weights (default: the bundle's ``models/model.pt`` where there is one); without any, the
    field comes from instance optimisation from the identity. ``--instance_opt True`` refines a network's field
    too. ``--bundle`` a bundle folder or an exported archive (default: this repository's registration bundle).
    ``--pixdim``/``--spatial_size`` the grid to register on (default: the one the model was trained on; 2 mm,
    192x160x256 without a model).
    """
    scans = {
        "fixed": fixed,
        "moving": moving,
        "fixed_label": fixed_label,
        "moving_label": moving_label,
        "fixed_pseudo": fixed_pseudo,
        "moving_pseudo": moving_pseudo,
    }
    for key, value in scans.items():
        if value is not None and not Path(value).exists():
            raise UsageError(f"--{key} {value}: no such file or folder")
    root = _bundle_folder(bundle)
    weights = Path(model).expanduser() if model else root / "models" / "model.pt"
    if model and not weights.is_file():
        raise UsageError(f"--model {model}: no such file")
    overrides: dict = {k: str(Path(v).resolve()) for k, v in scans.items() if v is not None}
    overrides.update(output_dir=str(Path(out).resolve()), make_zip="False", overwrite=str(bool(overwrite)))
    if weights.is_file():
        overrides["ckpt_path"] = str(weights.resolve())
        if instance_opt is not None:
            overrides["instance_opt"] = str(bool(instance_opt))
    else:  # no trained weights: instance optimisation from the identity, the network never runs
        if instance_opt is False:
            raise UsageError(
                f"no trained weights ({weights}) and --instance_opt False: nothing would register"
            )
        overrides.update(instance_opt="True", instance_opt_start="identity")
    if device:
        overrides["device"] = f"$torch.device('{device}')"
    for key, value in (("pixdim", pixdim), ("spatial_size", spatial_size)):
        if value is not None:
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise UsageError(f'--{key} {value!r}: three numbers, e.g. "[2, 2, 2]"')
            overrides[key] = list(value)
    cmd = bundle_command(root, "inference.json", overrides)
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=bundle_env(root))
    if proc.returncode != 0:
        raise UsageError(f"the registration failed (exit {proc.returncode}); its messages are above")
    result = Path(out).resolve()
    print(
        f"written to {result}: submission/ (the field), pairs/*/ (ITK transforms both ways, warped scan), metrics.json"
    )
    return str(result)
