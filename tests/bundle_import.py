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
