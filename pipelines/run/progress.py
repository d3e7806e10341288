"""A progress line every few seconds while a run goes: records, tokens, output tokens/s and dollars so far."""

from __future__ import annotations

import logging
import time

from pipelines.config.load import Job
from pipelines.io.metrics import set_accrued
from pipelines.run.ledger import read_ledger

log = logging.getLogger(__name__)


class Progress:
    """A progress line every few seconds: records, tokens, output tokens/s and dollars so far (also set as a
    Ray metric)."""

    EVERY_S = 10.0

    def __init__(self, job: Job, run_id: str, fs, run_root: str, *, total: int) -> None:
        self.job, self.run_id, self.fs, self.run_root, self.total = job, run_id, fs, run_root, total
        self.records = self.prompt = self.output = 0
        self.token_usd = 0.0
        self.t0 = self.last = time.perf_counter()

    def accrued_usd(self) -> float:
        if self.job.spec.cost.mode == "per_token":
            return self.token_usd
        now = time.time()
        seconds = sum((e.get("stopped_at") or now) - e["created_at"] for e in read_ledger(self.fs, self.run_root))
        return seconds * self.job.usd_per_replica_s()

    def add(self, written: dict) -> None:
        self.records += written["results_rows"] + written["rejects_rows"]
        self.prompt += written["prompt_tokens"] or 0
        self.output += written["completion_tokens"] or 0
        self.token_usd += written["cost_usd"] or 0.0
        if time.perf_counter() - self.last >= self.EVERY_S:
            self.report()

    def report(self) -> None:
        self.last = time.perf_counter()
        usd = self.accrued_usd()
        set_accrued(usd, tags={"job": self.job.spec.name, "run_id": self.run_id})
        elapsed = self.last - self.t0
        log.info("run %s: %d/%d records, %d prompt + %d output tokens, %.1f output tokens/s, $%.6f so far",
                 self.run_id, self.records, self.total, self.prompt, self.output,
                 self.output / elapsed if elapsed else 0.0, usd)

    def done(self) -> None:
        self.report()
