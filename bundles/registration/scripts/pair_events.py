"""The Ignite events of a pair after its field is made: the post-processing fires them, the writer writes what
each step made while the next step runs, and the opt-in ``PairTimer`` times them."""

from __future__ import annotations

from ignite.engine import Engine, EventEnum

__all__ = ["PairEvents", "register_pair_events"]


class PairEvents(EventEnum):
    """``PAIRS_READY``: the batch's pairs, each with its ddf as written (``engine.state.output``, a list of pair
    dicts); ``STEP_COMPLETED``: one post-processing step of one pair (``engine.state.pair_step`` names its phase);
    ``FILES_WRITTEN``: every file of the batch's pairs is written, their metrics rows not yet."""

    PAIRS_READY = "pairs_ready"
    STEP_COMPLETED = "pair_step_completed"
    FILES_WRITTEN = "pair_files_written"


def register_pair_events(engine: Engine) -> None:
    """Let ``engine`` fire ``PairEvents`` (once, whichever handler attaches first)."""
    registered = getattr(engine, "has_registered_events", None)  # ignite >= 0.5 (MONAI Label's 0.4 has none)
    if registered is None or not registered(PairEvents.PAIRS_READY):
        engine.register_events(*PairEvents)
