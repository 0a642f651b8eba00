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
    """Run ``python -m monai.bundle <entry>`` for a bundle as a user would (the command line of
    ``abdoreg.bundles.bundle_command``: overrides as literals MONAI's CLI parses back; ``nproc > 1`` under
    ``torchrun --standalone``). Returns a ``subprocess.CompletedProcess`` (stdout and stderr as text).

    A one-process command is a child of the tests' fork server (``tests/bundle_server.py``): a process of its
    own, with its exit status, output and global state, without the 5-6 s of ``import monai`` a fresh
    interpreter pays; ``ABDOREG_TEST_FRESH_INTERPRETER=1`` runs every command in a fresh interpreter instead."""
    import subprocess

    from abdoreg.bundles import bundle_command, bundle_env
    from tests import bundle_server

    root = bundle_dir(bundle)
    cmd = bundle_command(root, configs, overrides, entry=entry, nproc=nproc)
    full_env = bundle_env(root)
    full_env.update(env or {})
    if nproc == 1 and not bundle_server.fresh_interpreters():
        proc = bundle_server.run(cmd, cwd=root, env=full_env, timeout=timeout)
    else:
        proc = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"bundle {bundle} {entry} failed ({proc.returncode}):\n{' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc
