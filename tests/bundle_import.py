"""Import a bundle's ``scripts`` package in a shared pytest process.

Every MONAI bundle names its plugin package ``scripts``; two of them collide in one
interpreter. This helper swaps ``sys.modules`` so each test gets the bundle it asks for.
Keep imports of bundle code at module level of the bundle's own files (no imports of
``scripts`` inside functions), so a later swap cannot change what was already bound.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
# The MONAI bundle metadata schema (offline validation): the file named by this variable, else
# ``shared/schemas/`` beside the repository (developers' machines and CI).
SCHEMA_VARIABLE = "ABDOREG_MONAI_SCHEMA"
SCHEMA_NAME = "meta_schema_20240725.json"


def metadata_schema() -> Path:
    """The MONAI metadata schema file, or skip the calling test with the reason (a fresh clone has none)."""
    import os

    import pytest

    named = os.environ.get(SCHEMA_VARIABLE)
    path = Path(named) if named else REPO.parent / "shared" / "schemas" / SCHEMA_NAME
    if not path.is_file():
        pytest.skip(
            f"MONAI metadata schema not found at {path}: set {SCHEMA_VARIABLE} to a copy of {SCHEMA_NAME} "
            "(the `schema` URL of the bundles' metadata.json) to validate metadata.json"
        )
    return path


def bundle_dir(name: str) -> Path:
    return BUNDLES / name


def import_bundle_module(bundle: str, module: str = "scripts"):
    """Return ``module`` (e.g. ``"scripts.losses"``) imported from ``bundles/<bundle>``."""
    root = str(bundle_dir(bundle))
    loaded = sys.modules.get("scripts")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(root):
        for key in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
            del sys.modules[key]
    for other in [str(bundle_dir(b)) for b in ("registration", "segmentation", "preprocessing")]:
        while other in sys.path:
            sys.path.remove(other)
    sys.path.insert(0, root)
    return importlib.import_module(module)


def run_bundle(
    bundle: str,
    configs: str | list[str],
    overrides: dict | None = None,
    *,
    entry: str = "run",
    env: dict | None = None,
    timeout: float = 900,
    check: bool = True,
    nproc: int = 1,
):
    """Run ``python -m monai.bundle <entry>`` for a bundle in a subprocess, as a user would.

    ``configs`` are file names under the bundle's ``configs/``; ``overrides`` become
    ``--key value`` pairs (non-strings as Python literals, which MONAI's fire-based CLI parses back).
    ``nproc > 1`` launches it under ``torchrun --standalone`` with that many processes (DDP tests).
    Returns the ``subprocess.CompletedProcess`` (stdout and stderr captured as text).
    """
    import json
    import os
    import subprocess

    root = bundle_dir(bundle)
    files = [configs] if isinstance(configs, str) else list(configs)
    paths = [str(root / "configs" / f) for f in files]
    config_arg = paths[0] if len(paths) == 1 else json.dumps(paths)
    meta = str(root / "configs" / "metadata.json")
    if entry == "verify_metadata":
        cmd = [sys.executable, "-m", "monai.bundle", entry, "--meta_file", meta]
    else:
        launcher = [sys.executable, "-m", "monai.bundle"]
        if nproc > 1:
            launcher = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                "monai.bundle",
            ]
        cmd = [*launcher, entry, "--config_file", config_arg, "--bundle_root", str(root)]
        cmd += ["--meta_file", meta]
    if entry == "run" and (root / "configs" / "logging.conf").exists():
        cmd += ["--logging_file", str(root / "configs" / "logging.conf")]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    full_env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"bundle {bundle} {entry} failed ({proc.returncode}):\n{' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc
