"""Where each pair's time and memory go: an opt-in handler (``--benchmark True``), which ``abdoreg bench_infer``
switches on. Without it the metrics rows carry no timing but ``runtime_s``, the field source's own seconds."""

from __future__ import annotations

import resource
import sys
import time

import torch
from ignite.engine import Engine, Events

from scripts.pair_events import PairEvents, register_pair_events

__all__ = ["PairTimer", "peak_rss_gb"]


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def _gpu_synchronised() -> bool:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the time includes the GPU's work, not just its launch
        return True
    return False


class PairTimer:
    """Ignite handler adding to each pair's metrics row where its batch's time went, in seconds: ``time_load_s``
    (the data loader), ``time_field_s`` (the field source: network, instance optimisation or classical method),
    ``time_<phase>_s`` summed over the post-processing steps of each phase (``warp``, ``metrics``, ``inverse``),
    ``time_write_s`` (waiting for the files after the last step; the writer's threads write while the steps run),
    ``time_pair_s`` (from loading to the last file), ``cpu_pair_s`` (its CPU seconds, all threads); and the
    process's peak memory so far, ``peak_rss_gb`` (``gpu_peak_gb`` on CUDA).

    List it before the post-processing and the writer (its end-of-iteration mark must come first). Times are per
    batch (one pair per batch in every config of the bundle).
    """

    def __init__(self) -> None:
        self._marks: dict[str, float] = {}
        self._times: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        register_pair_events(engine)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._load_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._field_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._field_completed)
        engine.add_event_handler(PairEvents.STEP_COMPLETED, self._step_completed)
        engine.add_event_handler(PairEvents.FILES_WRITTEN, self._files_written)

    def _load_started(self) -> None:
        self._marks = {"load": time.perf_counter(), "cpu": time.process_time()}

    def _field_started(self) -> None:
        self._marks["field"] = time.perf_counter()

    def _field_completed(self) -> None:
        _gpu_synchronised()
        now = time.perf_counter()
        self._times = {}
        if {"load", "field"} <= set(self._marks):
            self._times = {
                "time_load_s": self._marks["field"] - self._marks["load"],
                "time_field_s": now - self._marks["field"],
            }
        self._marks["last"] = now

    def _step_completed(self, engine: Engine) -> None:
        now = time.perf_counter()
        key = f"time_{engine.state.pair_step}_s"
        self._times[key] = self._times.get(key, 0.0) + now - self._marks.get("last", now)
        self._marks["last"] = now

    def _files_written(self, engine: Engine) -> None:
        now = time.perf_counter()
        times = dict(self._times)
        times["time_write_s"] = now - self._marks.get("last", now)
        if "load" in self._marks:
            times["time_pair_s"] = now - self._marks["load"]
            times["cpu_pair_s"] = time.process_time() - self._marks["cpu"]  # the whole process, all threads
        times["peak_rss_gb"] = peak_rss_gb()
        if _gpu_synchronised():
            times["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        for pair in engine.state.output:
            pair["metrics"].update(times)
