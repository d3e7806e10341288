"""Live counters of a run, through Ray's metrics: each node's metrics agent exports them for Prometheus
(`ray_tokenmill_*`, tagged with the job and the run id).

The write stage counts what it wrote; the driver sets the dollars accrued so far
(in `accelerator_time` mode the cost grows with the replicas' time, not per record).
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

TAG_KEYS = ("job", "run_id")
COUNTERS = {
    "tokenmill_records": ("results_rows", "Records generated (results written)."),
    "tokenmill_rejected_records": ("rejects_rows", "Records rejected (never generated)."),
    "tokenmill_prompt_tokens": ("prompt_tokens", "Prompt tokens of generated records."),
    "tokenmill_output_tokens": ("completion_tokens", "Output tokens generated."),
    "tokenmill_cost_usd": ("cost_usd", "Dollars at per-token prices (per_token mode)."),
}
_made: dict[str, object] = {}


def _metric(kind: str, name: str, description: str):
    if name not in _made:
        from ray.util import metrics

        _made[name] = getattr(metrics, kind)(name, description=description, tag_keys=TAG_KEYS)
    return _made[name]


def count_written(written: pa.Table, *, tags: dict[str, str]) -> None:
    """Add one write task's figures (`pipelines.stages.write.WRITTEN` rows) to the run's counters."""
    try:
        for name, (column, description) in COUNTERS.items():
            value = pc.sum(written.column(column)).as_py()
            if value:
                _metric("Counter", name, description).inc(value, tags=tags)
    except Exception as exc:  # noqa: BLE001 - metrics are never worth a failed batch
        log.debug("metrics not recorded: %s", exc)


def set_accrued(usd: float, *, tags: dict[str, str]) -> None:
    """The run's dollars so far, as the driver sees them."""
    try:
        _metric("Gauge", "tokenmill_accrued_usd", "Dollars the run has cost so far, in its cost mode.").set(
            usd, tags=tags)
    except Exception as exc:  # noqa: BLE001
        log.debug("metrics not recorded: %s", exc)


def set_budget(spent_usd: float, cap_usd: float | None, spent_tokens: int, cap_tokens: int | None, *,
               tags: dict[str, str]) -> None:
    """The run's spend against its budget (`budget:` in the spec), as the budget keeper counts it."""
    try:
        _metric("Gauge", "tokenmill_budget_spent_usd", "Dollars spent, against budget.max_usd.").set(spent_usd, tags=tags)
        _metric("Gauge", "tokenmill_budget_spent_output_tokens", "Output tokens generated, against "
                "budget.max_output_tokens.").set(spent_tokens, tags=tags)
        if cap_usd is not None:
            _metric("Gauge", "tokenmill_budget_max_usd", "The run's budget.max_usd.").set(cap_usd, tags=tags)
        if cap_tokens is not None:
            _metric("Gauge", "tokenmill_budget_max_output_tokens", "The run's budget.max_output_tokens.").set(
                cap_tokens, tags=tags)
    except Exception as exc:  # noqa: BLE001
        log.debug("metrics not recorded: %s", exc)
