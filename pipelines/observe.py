"""Run statistics gathered from the engine actors: engine start-up apart from steady state.

A small named Ray actor per run receives fire-and-forget reports; the driver
reads them once at the end. It holds O(batches) numbers, never rows.
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineStats:
    engine_start_s: list[float] = dataclasses.field(default_factory=list)
    first_batch_start: float | None = None
    last_batch_end: float | None = None
    batches: int = 0
    rows: int = 0
    output_tokens: int = 0
    busy_s: float = 0.0

    @property
    def steady_seconds(self) -> float | None:
        if self.first_batch_start is None or self.last_batch_end is None:
            return None
        return self.last_batch_end - self.first_batch_start


class RunStats:
    """Collects reports from engine actors (run as a Ray actor)."""

    def __init__(self) -> None:
        self.stats = EngineStats()

    def engine_started(self, seconds: float) -> None:
        self.stats.engine_start_s.append(seconds)

    def batch_done(self, start: float, end: float, rows: int, output_tokens: int) -> None:
        s = self.stats
        s.first_batch_start = start if s.first_batch_start is None else min(s.first_batch_start, start)
        s.last_batch_end = end if s.last_batch_end is None else max(s.last_batch_end, end)
        s.batches += 1
        s.rows += rows
        s.output_tokens += output_tokens
        s.busy_s += end - start

    def get(self) -> EngineStats:
        return self.stats


def start_stats_actor(name: str):
    import ray

    return ray.remote(num_cpus=0)(RunStats).options(name=name).remote()


def stats_handle(name: str | None):
    """The run's stats actor as seen from an engine actor, or None when not running under one."""
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        log.warning("run stats actor %s not found; engine timings will be missing", name)
        return None
