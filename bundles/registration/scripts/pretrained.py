"""Where fine-tuning starts: the ``pretrained`` source of ``finetune.json``, resolved to a checkpoint file.

A source is a bundle folder (its ``models/model.pt``), a training run's ``ckpt_dir`` (its ``model.pt``), a
checkpoint file, a bundle archive as ``monai.bundle download`` reads it (``<name>_v<version>.zip`` holding
one folder ``<name>/``), or a ``file://`` or ``https://`` URL of such an archive. Nothing is downloaded
unless the user passes an ``https://`` URL. Archives are extracted once into ``cache_dir`` under a name
that includes their content hash, so a re-exported archive is never confused with an older one. Before
training starts the source's weights are checked against the network, so a source of another
architecture fails with its name and the first differences rather than deep inside ``load_state_dict``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import torch

from scripts.atomic import atomic_write, remove_stale_temps
from scripts.errors import InputError, as_flag
from scripts.weights import mismatch, read_state

__all__ = ["resolve_pretrained", "check_fits"]

logger = logging.getLogger("registration.pretrained")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_path(source: str, cache_dir: Path) -> Path:
    """The local file or folder a source names; an ``https://`` archive is downloaded into ``cache_dir``."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "https":
        from monai.apps.utils import download_url

        target = cache_dir / (Path(unquote(parsed.path)).name or "pretrained.zip")
        if not target.is_file():  # the user asked for this download by passing the URL
            logger.info("downloading the pretrained source %s to %s", source, target)
            download_url(url=source, filepath=target, progress=False)
        return target
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"pretrained source {source!r}: only file:// and https:// URLs are accepted")
    return Path(source)


def _archive_model(archive: Path) -> tuple[str, str]:
    """The top-level folder of a bundle archive and its weights' member name, or a ValueError naming the file."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(
            f"{archive}: not a readable bundle archive ({exc}); it may be truncated (an interrupted download or "
            "copy): fetch it again"
        ) from None
    tops = {Path(n).parts[0] for n in names if Path(n).parts}
    if len(tops) != 1:
        raise ValueError(
            f"{archive}: a bundle archive holds exactly one top-level folder <name>/, found {sorted(tops)}"
        )
    (name,) = tops
    member = f"{name}/models/model.pt"
    if member not in names:
        raise FileNotFoundError(f"{archive}: the archive has no {member}")
    return name, member


def _extract_archive(archive: Path, cache_dir: Path, name: str) -> Path:
    """The bundle folder of an archive, extracted once per content hash (atomically: a second run never sees a
    half-extracted folder, and what a killed run left is removed by the next)."""
    target = cache_dir / f"{archive.stem}-{_sha256(archive)[:12]}"
    if not (target / name).is_dir():
        from monai.apps.utils import extractall

        remove_stale_temps(cache_dir, recursive=False)
        atomic_write(target, lambda tmp: extractall(archive, output_dir=tmp, has_base=False))
    return target / name


def resolve_pretrained(
    source: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    network: torch.nn.Module | None = None,
    strict: bool = True,
) -> str | None:
    """The checkpoint file to start fine-tuning from (None without a source); with ``network`` and
    ``strict``, also check that its weights fit that network."""
    if source is None or str(source).strip() in ("", "None", "null"):
        return None
    cache = Path(cache_dir)
    path = _local_path(str(source), cache)
    if not path.exists():
        raise FileNotFoundError(f"pretrained source {source}: no such file or folder")
    if path.is_dir():
        candidates = [path / "models" / "model.pt", path / "model.pt"]
        ckpt = next((c for c in candidates if c.is_file()), None)
        if ckpt is None:
            raise FileNotFoundError(
                f"pretrained source {source}: a bundle folder needs models/model.pt (or a ckpt_dir model.pt)"
            )
    elif path.suffix.lower() == ".zip":  # by name: a torch checkpoint is a zip file too
        name, member = _archive_model(path)
        if network is not None and as_flag(strict):  # checked inside the archive: nothing is written if unfit
            with zipfile.ZipFile(path) as zf:
                check_fits(io.BytesIO(zf.read(member)), network, source, name=f"{path}:{member}")
        ckpt = _extract_archive(path, cache, name) / "models" / "model.pt"
        network = None  # checked
    else:
        ckpt = path
    if network is not None and as_flag(strict):
        check_fits(ckpt, network, source)
    logger.info("fine-tuning starts from %s (source %s)", ckpt, source)
    return str(ckpt)


def check_fits(
    ckpt: str | os.PathLike | BinaryIO, network: torch.nn.Module, source: object, name: str | None = None
) -> None:
    """Raise a ValueError naming ``source`` when the weights in ``ckpt`` do not fit ``network``."""
    try:
        state = read_state(ckpt, name=name)
    except InputError as exc:
        raise ValueError(f"pretrained source {source}: {exc}") from exc
    why = mismatch(state, network)
    if why:
        raise ValueError(
            f"pretrained source {source} does not fit this network ({type(network).__name__}): {why}. "
            "Pass the settings it was trained with (a checkpoint records them; an exported bundle's are in its "
            "configs/train.json), or --initial_ckpt_strict false to load only what fits"
        )
