"""Drift between nights: a run's summary against the previous successful run of its job, and the gates on it.

The comparison needs only the two summaries: the label distribution (population
stability index), each field's fill and exact-match rates, the parse-error and
reject rates, mean tokens per record and cost per 1,000 records. Each figure is
reported with its change; `gates:` in the spec turns some into limits.
"""

from __future__ import annotations

import math
from typing import Literal

from pipelines.config.job import GatesSpec
from pipelines.io.storage import join
from pipelines.run.commit import SUCCESS, Success, read_record
from pipelines.run.summary import Comparison, Drift, RunSummary, read_summary
from pipelines.schema import Reason

# Shares below this count as this, so that a label absent from one night does not make the index infinite.
PSI_FLOOR = 1e-4


def previous_run(fs, out_root: str, *, job: str, run_id: str, before: str) -> tuple[str, RunSummary] | None:
    """The latest run of `job` under `out_root` that finished (its `_SUCCESS`) before `before` (ISO time), did not
    fail a gate and is not a replay of rejects, with its summary; None where there is none."""
    candidates: list[tuple[str, str]] = []
    for entry in fs.ls(out_root, detail=False) if fs.exists(out_root) else []:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name == run_id or name.startswith((".", "_")):
            continue
        done = read_record(Success, fs, join(out_root, name, SUCCESS), name="_SUCCESS marker")
        if done is None or done.gates == "gate_failed" or done.finished_at >= before:
            continue
        if done.job not in (None, job):
            continue
        candidates.append((done.finished_at, name))
    for _, name in sorted(candidates, reverse=True):
        summary = read_summary(fs, join(out_root, name))
        if summary is not None and summary.job == job and summary.replay_of is None:  # a replay is no night
            return name, summary
    return None


def label_psi(previous: dict[str, int], current: dict[str, int]) -> float | None:
    """Population stability index of two label counts (`(none)` is a label like any other)."""
    n_prev, n_cur = sum(previous.values()), sum(current.values())
    if not n_prev or not n_cur:
        return None
    total = 0.0
    for label in set(previous) | set(current):
        p = max(previous.get(label, 0) / n_prev, PSI_FLOOR)
        q = max(current.get(label, 0) / n_cur, PSI_FLOOR)
        total += (q - p) * math.log(q / p)
    return round(total, 6)


def _share(num: int | float, den: int) -> float | None:
    return round(num / den, 6) if den else None


def figures(summary: RunSummary) -> dict[str, float | None]:
    """The figures compared between nights, by metric name."""
    records = summary.records_in
    out: dict[str, float | None] = {
        "parse_error_rate": _share(summary.errors_by_kind.get(Reason.PARSE, 0), records),
        "reject_rate": _share(summary.records_rejected, records),
        "tokens_per_record": _share(summary.prompt_tokens + summary.completion_tokens, summary.records_out),
        "cost_per_1k_records_usd": _share(1000 * summary.cost_usd, records),
    }
    for field, rate in (summary.fill_rates or {}).items():
        out[f"fill_rate:{field}"] = rate
    quality = summary.quality or {}
    if "accuracy" in quality:
        out["exact_match:label"] = quality["accuracy"]
    for field, found in (quality.get("fields") or {}).items():
        out[f"exact_match:{field}"] = found["exact_match_rate"]
    return out


def _label_counts(summary: RunSummary) -> dict[str, int]:
    return {label: row["records"] for label, row in (summary.by_label or {}).items()}


def compare(current: RunSummary, previous: RunSummary | None, gates: GatesSpec, *, previous_run: str | None = None
            ) -> Drift:
    """`current` against `previous`, with the gates' limits applied when both runs are large enough."""
    if previous is None:
        return Drift(previous_run=None, status="not_compared", gated=False)
    gated = min(current.records_in, previous.records_in) >= gates.min_records
    rows: list[Comparison] = []

    def add(metric: str, prev: float | None, cur: float | None, change: float | None,
            watch: Literal["rise", "drop", "either"], limit: float | None) -> None:
        moved = None if change is None else {"rise": change, "drop": -change, "either": abs(change)}[watch]
        rows.append(Comparison(metric=metric, previous=prev, current=cur,
                               change=None if change is None else round(change, 6), watch=watch, limit=limit,
                               breached=bool(gated and limit is not None and moved is not None and moved > limit)))

    if current.task == "classify":
        add("label_psi", None, None, label_psi(_label_counts(previous), _label_counts(current)), "rise",
            gates.label_psi_max)
    before, now = figures(previous), figures(current)
    for metric in sorted(set(before) | set(now)):
        prev, cur = before.get(metric), now.get(metric)
        diff = None if prev is None or cur is None else cur - prev
        if metric.startswith("fill_rate:"):
            add(metric, prev, cur, diff, "drop", gates.fill_rate_drop_max)
        elif metric.startswith("exact_match:"):
            add(metric, prev, cur, diff, "drop", gates.exact_match_drop_max)
        elif metric == "parse_error_rate":
            add(metric, prev, cur, diff, "rise", gates.parse_error_rate_rise_max)
        elif metric == "reject_rate":
            add(metric, prev, cur, diff, "rise", gates.reject_rate_rise_max)
        else:  # tokens per record, cost per 1,000 records: relative, either way
            relative = None if diff is None or not prev else diff / prev
            add(metric, prev, cur, relative, "either", gates.tokens_per_record_change_max
                if metric == "tokens_per_record" else gates.cost_per_1k_change_max)
    status: Literal["passed", "gate_failed"] = "gate_failed" if any(r.breached for r in rows) else "passed"
    return Drift(previous_run=previous_run, previous_finished_at=previous.finished_at, status=status, gated=gated,
                 comparisons=rows)
