"""The one place that builds a ``python -m monai.bundle`` command line for a bundle, and its environment.

The pipeline runner, the benchmarks, the tests and the MONAI Label app all run bundles as a user would, in a
subprocess; they call ``bundle_command`` and ``bundle_env``. Standard library only: the MONAI Label app
imports it in an environment without the core dependencies.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"

__all__ = ["REPO", "BUNDLES", "bundle_root", "cli_value", "bundle_command", "bundle_env"]


def bundle_root(bundle: str | os.PathLike) -> Path:
    """A bundle folder: a name under ``bundles/`` (``registration``) or a path to any bundle folder."""
    path = Path(bundle)
    return path if path.is_absolute() or len(path.parts) > 1 else BUNDLES / str(bundle)


def cli_value(value: Any) -> str:
    """A ``--key value`` argument as MONAI's (fire) command line parses it back: strings as they are, anything
    else as a Python literal."""
    return value if isinstance(value, str) else repr(value)


def bundle_command(
    bundle: str | os.PathLike,
    configs: str | Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    *,
    entry: str = "run",
    nproc: int = 1,
    python: str | None = None,
) -> list[str]:
    """``python -m monai.bundle <entry>`` of ``configs`` (file names under the bundle's ``configs/``, merged in
    order) with ``--key value`` overrides; under ``torchrun --standalone`` when ``nproc`` > 1.

    ``run`` gets ``--bundle_root``, ``--meta_file`` and the bundle's ``logging.conf``; ``verify_metadata``
    reads ``metadata.json`` itself (``configs`` is ignored).
    """
    root = bundle_root(bundle)
    python = python or sys.executable
    meta = str(root / "configs" / "metadata.json")
    if entry == "verify_metadata":
        cmd = [python, "-m", "monai.bundle", entry, "--meta_file", meta]
    else:
        files = [configs] if isinstance(configs, str) else list(configs)
        paths = [str(root / "configs" / f) for f in files]
        launcher = [python, "-m", "monai.bundle"]
        if nproc > 1:
            launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            launcher += ["-m", "monai.bundle"]
        config_arg = paths[0] if len(paths) == 1 else json.dumps(paths)
        cmd = [*launcher, entry, "--config_file", config_arg, "--bundle_root", str(root), "--meta_file", meta]
        logging_conf = root / "configs" / "logging.conf"
        if entry == "run" and logging_conf.is_file():
            cmd += ["--logging_file", str(logging_conf)]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", cli_value(value)]
    return cmd


def bundle_env(bundle: str | os.PathLike, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a bundle's process: ``env`` (default: this process's) with the bundle folder first on
    ``PYTHONPATH``, so that its configs' ``$import scripts`` finds the bundle's own ``scripts``."""
    base = dict(os.environ if env is None else env)
    path = os.pathsep.join(p for p in (str(bundle_root(bundle)), base.get("PYTHONPATH", "")) if p)
    return {**base, "PYTHONPATH": path}
