"""``abdoreg``: the command line that makes synthetic data and chains the bundles' stages."""

from __future__ import annotations

import fire

from .synth import ALL_COHORTS, generate


def synth(
    out: str = "data/synthetic",
    size: str = "tiny",
    n_l2r: int = 9,
    n_other: int = 3,
    cohorts: str | tuple[str, ...] = ALL_COHORTS,
    seed: int = 0,
) -> str:
    """Generate synthetic cohorts in their native layouts (sizes: tiny, demo, small, full)."""
    names = cohorts.split(",") if isinstance(cohorts, str) else tuple(cohorts)
    return str(generate(out, size=size, n_l2r=n_l2r, n_other=n_other, cohorts=names, seed=seed))


COMMANDS = {"synth": synth}


def main() -> None:
    fire.Fire(COMMANDS)


if __name__ == "__main__":
    main()
