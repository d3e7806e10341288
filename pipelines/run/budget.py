"""The run's budget (`budget:` in the spec): one keeper, asked by every replica before each batch.

A replica reserves a batch's worst case before sending it and settles the
actual figures after. A reservation that would take spend (what earlier
attempts committed, what this one settled, what is reserved in flight) past a
cap is refused, and so is every one after it: no new batch goes to an engine,
the batches in flight finish. In `per_token` mode the reservation is the
batch's most expensive outcome (every prompt token uncached, every row at its
`max_tokens`), so spend never passes the cap. In `accelerator_time` mode spend
is the replicas' time, which grows while they start and wait; a batch is
reserved at the mean time of the batches settled so far, so once batches flow
the cap is passed by at most about one batch. Nothing asks the keeper before
the first batch: a cap the replicas pass while they start or wait for their
first input is seen when that batch asks, and `spent_before_first_batch_usd`
says how much that was.
"""

from __future__ import annotations

import time
from typing import Any

from pipelines.io.metrics import set_budget


class BudgetKeeper:
    """Kept in one Ray actor per attempt (`start_keeper`); its methods are the replicas' and the driver's."""

    def __init__(self, *, max_usd: float | None, max_output_tokens: int | None, mode: str,
                 usd_per_replica_s: float, spent_usd: float = 0.0, spent_tokens: int = 0,
                 tags: dict[str, str] | None = None):
        self.max_usd, self.max_tokens, self.mode = max_usd, max_output_tokens, mode
        self.per_s = usd_per_replica_s
        self.prior_usd, self.prior_tokens = spent_usd, spent_tokens  # committed by earlier attempts
        self.settled_usd, self.settled_tokens = 0.0, 0
        self.in_flight: dict[str, tuple[float, int]] = {}
        self.replicas: dict[str, float] = {}  # replica -> when it started (accelerator_time)
        self.batch_s: list[float] = []
        self.batch_usd: list[float] = []
        self.sent_rows = 0  # rows of settled batches: the driver waits to see them written before it stops
        self.refused = 0
        self.before_first_usd: float | None = None  # spend when the first batch asked to go
        self.stopped: str | None = None  # which cap stopped the run
        self.tags = tags or {}
        self._export()

    def replica_started(self, replica: str, at: float) -> None:
        self.replicas.setdefault(replica, at)

    def spent_usd(self, now: float | None = None) -> float:
        if self.mode == "accelerator_time":
            now = time.time() if now is None else now
            return self.prior_usd + sum(max(0.0, now - t) for t in self.replicas.values()) * self.per_s
        return self.prior_usd + self.settled_usd

    def reserve(self, key: str, usd: float, tokens: int) -> bool:
        """Whether the batch `key` may go to the engine; `usd` and `tokens` are its worst case (per_token)."""
        if self.before_first_usd is None:
            self.before_first_usd = self.spent_usd()
        if self.stopped:
            self.refused += 1
            return False
        if self.mode == "accelerator_time":  # the time a batch takes, as the batches so far took
            usd = (sum(self.batch_s) / len(self.batch_s) * self.per_s) if self.batch_s else 0.0
        flight_usd = sum(u for u, _ in self.in_flight.values())
        flight_tokens = sum(t for _, t in self.in_flight.values())
        if self.max_usd is not None and self.spent_usd() + flight_usd + usd > self.max_usd:
            self.stopped = "max_usd"
        elif self.max_tokens is not None and (self.prior_tokens + self.settled_tokens + flight_tokens + tokens
                                              > self.max_tokens):
            self.stopped = "max_output_tokens"
        if self.stopped:
            self.refused += 1
            return False
        self.in_flight[key] = (usd, tokens)
        return True

    def settle(self, key: str, usd: float, tokens: int, seconds: float, rows: int) -> None:
        """The batch `key` is done: what it cost (per_token), generated and took, and how many rows it sent."""
        self.in_flight.pop(key, None)
        self.sent_rows += rows
        self.settled_usd += usd
        self.settled_tokens += tokens
        self.batch_s.append(seconds)
        self.batch_usd.append(usd if self.mode != "accelerator_time" else seconds * self.per_s)
        self._export()

    def state(self) -> dict[str, Any]:
        return {"stopped": self.stopped, "in_flight": len(self.in_flight), "refused": self.refused,
                "sent_rows": self.sent_rows, "settled_usd": self.settled_usd, "settled_tokens": self.settled_tokens,
                "batches": len(self.batch_s), "spent_usd": self.spent_usd(),
                "spent_output_tokens": self.prior_tokens + self.settled_tokens,
                "largest_batch_usd": max(self.batch_usd, default=0.0),
                "spent_before_first_batch_usd": self.before_first_usd}

    def _export(self) -> None:
        set_budget(self.spent_usd(), self.max_usd, self.prior_tokens + self.settled_tokens, self.max_tokens,
                   tags=self.tags)


def start_keeper(**kwargs):
    """The keeper as a Ray actor (no CPU of its own: it only counts)."""
    import ray

    return ray.remote(BudgetKeeper).options(num_cpus=0, max_concurrency=1).remote(**kwargs)
