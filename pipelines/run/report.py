"""The run report: `summary.json` rebuilt from the committed results, and `report.html` beside it.

`tokenmill report RUN_PATH` rebuilds both from the run's folder alone (its
`_run.json` keeps the job it was started with), so they always agree with the data.
The HTML is one self-contained file: styles inline, plots as PNG data URIs, no
network needed to view it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import io
from typing import Any

import polars as pl

from pipelines.config.load import job_from_snapshot
from pipelines.config.storage import StorageOptions
from pipelines.errors import ConfigError
from pipelines.io.storage import filesystem_for, join
from pipelines.run.commit import RUN_FILE, read_manifests, read_run_record, read_success
from pipelines.run.ledger import EngineStats, read_ledger
from pipelines.run.summary import RunSummary, read_summary, scan_results, summarize, write_summary

REPORT_FILE = "report.html"


def rebuild(run_path: str, *, storage: StorageOptions | None = None) -> RunSummary:
    """Recompute a finished (or partly committed) run's summary from its folder; write `summary.json` and
    `report.html` there; return the summary."""

    run_path = run_path.rstrip("/")
    probe = storage or StorageOptions()
    fs, root = filesystem_for(run_path, probe.resolved())
    state = read_run_record(fs, root)
    if state is None:
        raise ConfigError(f"{run_path}: no {RUN_FILE}: not a tokenmill run folder")
    if state.snapshot is None:
        raise ConfigError(f"{run_path}: the run predates job snapshots in {RUN_FILE}; rerun it to get a report")
    job = job_from_snapshot(state.snapshot)
    parent, _, run_id = run_path.rpartition("/")
    # The run may have been moved since: where it is now wins over where it was written.
    spec = job.spec.model_copy(update={"output": job.spec.output.model_copy(update={"path": parent or "."})})
    storage = storage or spec.storage
    job = dataclasses.replace(job, spec=spec)
    # Figures of the attempts themselves (times, resumes) are not in the results: kept from the summary, or
    # from `_SUCCESS` when the summary is gone.
    earlier = read_summary(fs, root)
    attempts = earlier or read_success(fs, root)
    summary = summarize(job, run_id, read_manifests(fs, root), storage.resolved(), adapter=None,
                        engine=EngineStats.from_ledger(read_ledger(fs, root)),
                        wall=attempts.wall_s if attempts else 0.0,
                        started_at=dt.datetime.fromisoformat(attempts.started_at if attempts else state.created_at),
                        resumed=attempts.resumed if attempts else False,
                        shards_redone=attempts.shards_redone if attempts else 0,
                        attempt=earlier.attempt if earlier else None)
    if attempts is not None:
        summary.finished_at = attempts.finished_at
    if earlier is not None:  # what only the summary kept: the adapter, the OpenAI batch files, drift, plan, budget
        summary.lora = earlier.lora
        for kept in ("drift", "plan_check", "plan_warning", "budget", "stopped", "replay_of"):
            setattr(summary, kept, getattr(earlier, kept))
        summary.output = summary.output.model_copy(update=earlier.output.model_dump(
            include={"output_file", "output_lines", "error_file", "error_lines"}))
    write_report(fs, root, summary, storage.resolved())
    return summary


def write_report(fs, root: str, summary: RunSummary, storage: StorageOptions) -> None:
    """`summary.json` and `report.html` in the run's folder."""
    write_summary(fs, root, summary)
    results = scan_results(summary.output.results, storage)
    page = render_html(summary, results)
    with fs.open(join(root, REPORT_FILE), "wb") as f:
        f.write(page.encode())


# ---- plots -----------------------------------------------------------------

def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def token_histogram(values: list[int], title: str, color: str) -> str:
    fig, ax = _figure(title, "tokens per record", "records")
    ax.hist(values, bins=min(40, max(5, len(set(values)))), color=color, edgecolor="white")
    return _png(fig)


def throughput_series(results: pl.LazyFrame, started_at: str | None) -> pl.DataFrame:
    """Output tokens generated since the run started, at each moment a batch of results was generated."""
    done = (results.filter(pl.col("generated_at").is_not_null())
            .group_by("generated_at").agg(pl.col("completion_tokens").sum().alias("tokens"))
            .sort("generated_at").collect())
    if done.is_empty():
        return pl.DataFrame({"t_s": [0.0], "tokens": [0]})
    t0 = dt.datetime.fromisoformat(started_at) if started_at else done["generated_at"][0]
    t = [(x - t0).total_seconds() for x in done["generated_at"].to_list()]
    return pl.DataFrame({"t_s": [0.0, *t], "tokens": [0, *done["tokens"].cum_sum().to_list()]})


def throughput_plot(series: pl.DataFrame) -> str:
    fig, ax = _figure("Throughput over the run", "seconds since the run started", "output tokens generated")
    t, tokens = series["t_s"].to_list(), series["tokens"].to_list()
    ax.step(t, tokens, where="post", color="#2b6cb0", marker="o", markersize=3)
    ax.fill_between(t, tokens, step="post", alpha=0.15, color="#2b6cb0")
    if len(t) > 1 and t[-1] > 0:
        ax.annotate(f"{tokens[-1] / t[-1]:,.1f} output tokens/s overall", (0.02, 0.92), xycoords="axes fraction",
                    fontsize=9)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    return _png(fig)


def label_cost_plot(by_label: dict[str, dict]) -> str:
    fig, ax = _figure("Cost by label", "label", "US dollars")
    names = list(by_label)
    ax.bar(names, [by_label[n]["cost_usd"] for n in names], color="#38a169")
    for i, n in enumerate(names):
        ax.annotate(f"{by_label[n]['records']} rec", (i, by_label[n]["cost_usd"]), ha="center", va="bottom",
                    fontsize=8)
    return _png(fig)


def plots(summary: RunSummary, results: pl.LazyFrame | None) -> list[tuple[str, str]]:
    """(title, PNG data URI) for each plot the run has data for."""
    if results is None:
        return []
    tokens = results.select("prompt_tokens", "completion_tokens").collect()
    out = [
        ("Prompt tokens per record", token_histogram(tokens["prompt_tokens"].drop_nulls().to_list(),
                                                     "Prompt tokens per record", "#805ad5")),
        ("Completion tokens per record", token_histogram(tokens["completion_tokens"].drop_nulls().to_list(),
                                                         "Completion tokens per record", "#dd6b20")),
        ("Throughput over the run", throughput_plot(throughput_series(results, summary.started_at))),
    ]
    if summary.by_label:
        out.append(("Cost by label", label_cost_plot(summary.by_label)))
    return out


# ---- the page --------------------------------------------------------------

def _usd(v: float | None) -> str:
    if v is None:
        return "–"
    return f"${v:,.2f}" if abs(v) >= 100 else f"${v:,.6f}".rstrip("0").rstrip(".") if v else "$0"


def _when(iso: str | None) -> str:
    return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC") if iso else "–"


def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".")
    return f"{v:,}" if isinstance(v, int) else html.escape(str(v))


def _table(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _grid(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def cost_rows(cost: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("cost mode", html.escape(cost["mode"])), ("total", _usd(cost["total_usd"])),
            ("per 1,000 records", _usd(cost["per_1k_records_usd"]))]
    if cost["mode"] == "per_token":
        rows += [("uncached prompt tokens", _usd(cost["input_usd"])),
                 ("cached prompt tokens", _usd(cost["cached_input_usd"])),
                 ("output tokens", _usd(cost["output_usd"]))]
    else:
        r = cost["rates"]
        rows += [("accelerator", f"{html.escape(r['description'])}: {_usd(r['usd_per_hour'])}/h × "
                                 f"{_num(r['units_per_replica'])} per replica"),
                 ("replicas", _num(cost["replicas"])),
                 ("replica time", f"{cost['replica_hours'] * 3600:,.1f} s ({cost['replica_hours']:.4f} h), of which "
                                  f"{cost['busy_hours'] * 3600:,.1f} s busy"),
                 ("busy: shared by work", _usd(cost["compute_usd"])),
                 ("start-up: shared evenly", _usd(cost["startup_usd"])),
                 ("idle: shared evenly", _usd(cost["idle_usd"])),
                 ("records' costs add up to", _usd(cost["attributed_usd"]))]
    return rows


def render_html(summary: RunSummary, results: pl.LazyFrame | None) -> str:
    """The report page for a summary (`pipelines.run.summary.summarize`)."""
    s = summary.to_json()  # the page shows the summary as its readers know it, key by key
    e = html.escape
    totals = [("records in", _num(s["records_in"])), ("records generated", _num(s["records_out"])),
              ("ok", _num(s["records_ok"])), ("failed (generated, not parsed)", _num(s["records_out"] - s["records_ok"])),
              ("rejected (never generated)", _num(s["records_rejected"])),
              ("prompt tokens", _num(s["prompt_tokens"])), ("cached prompt tokens", _num(s["cached_prompt_tokens"])),
              ("output tokens", _num(s["completion_tokens"])), ("wall time", f"{_num(s['wall_s'])} s"),
              ("engine start", f"{_num(s['engine_start_s'])} s"),
              ("steady output tokens/s", _num(s["steady_output_tokens_per_s"]))]
    hosted = [[e(h["description"]), _usd(h["cost_usd"]),
               f"{h['times_run_cost']:,.1f}×" if h["times_run_cost"] else "–",
               e(h["source"]), e(h["taken"])] for h in s.get("hosted_comparison", {}).values()]
    sections = [
        f"<h2>Totals</h2>{_table(totals)}",
        f"<h2>Cost</h2>{_table(cost_rows(s['cost']))}",
        "<h2>What the same tokens would have cost hosted</h2>"
        + _grid(["offering", "cost", "× this run", "source", "price taken"], hosted),
    ]
    quality = s.get("quality") or {}
    if "accuracy" in quality:
        sections.append(f"<h2>Quality</h2>{_table([('accuracy', _num(quality['accuracy'])), ('compared', _num(quality['records_with_truth']))])}")
    elif "fields" in quality:
        sections.append("<h2>Quality</h2>" + _grid(["field", "exact match", "compared"], [
            [e(k), _num(v["exact_match_rate"]), _num(v["compared"])] for k, v in quality["fields"].items()]))
    if s.get("by_label"):
        sections.append("<h2>By label</h2>" + _grid(["label", "records", "output tokens", "cost", "per 1k records"], [
            [e(k), _num(v["records"]), _num(v["completion_tokens"]), _usd(v["cost_usd"]),
             _usd(v["cost_per_1k_records_usd"])] for k, v in s["by_label"].items()]))
    if s.get("by_shard"):
        sections.append("<h2>By input shard</h2>" + _grid(["shard", "records", "failed", "prompt tokens", "cost"], [
            [e(k), _num(v["records"]), _num(v["failed"]), _num(v["prompt_tokens"]), _usd(v["cost_usd"])]
            for k, v in s["by_shard"].items()]))
    if summary.plan_check:
        sections.append("<h2>The plan against the run</h2>" + _grid(["figure", "plan", "run", "error"], [
            [e(k), _num(v["estimate"]), _num(v["actual"]),
             "–" if v["error_pct"] is None else f"{v['error_pct']:+.1f}%"] for k, v in summary.plan_check.items()])
            + (f"<p>The plan's wall time and cost: {e(summary.plan_warning)}</p>" if summary.plan_warning else ""))
    if summary.budget is not None:
        b = summary.budget
        sections.append("<h2>Budget</h2>" + _table([
            ("cap", f"{_usd(b.max_usd) if b.max_usd is not None else '–'}, "
                    f"{_num(b.max_output_tokens)} output tokens"),
            ("spent", f"{_usd(b.spent_usd)}, {_num(b.spent_output_tokens)} output tokens"),
            ("spent before the first batch", _usd(b.spent_before_first_batch_usd)
             if b.spent_before_first_batch_usd is not None else "–"),
            ("batches sent / refused", f"{_num(b.batches)} / {_num(b.batches_refused)}"),
            ("past the cap", f"{_usd(b.overshoot_usd)} ({_num(b.overshoot_batches)} batches)"),
            ("stopped", "yes: a higher cap resumes it" if summary.stopped else "no")]))
    drift = summary.drift
    if drift is not None and drift.previous_run is not None:
        verdict = {"passed": "passed", "gate_failed": "<b>gate failed</b>", "not_compared": "not compared"}
        sections.append(
            f"<h2>Against the previous night</h2><p>{verdict[drift.status]} against {e(drift.previous_run)}"
            + ("" if drift.gated else " (too few records to gate)") + "</p>"
            + _grid(["figure", "previous", "this run", "change", "gate", ""], [
                [e(c.metric), _num(c.previous), _num(c.current), _num(c.change),
                 "–" if c.limit is None else f"{e(c.watch)} ≤ {_num(c.limit)}", "breached" if c.breached else ""]
                for c in drift.comparisons]))
    elif drift is not None:
        sections.append("<h2>Against the previous night</h2><p>Not compared: no earlier successful run of this job "
                        "under this output path.</p>")
    figures = "".join(
        f'<figure><img alt="{e(t)}" src="{uri}" onload="this.dataset.rendered=this.naturalWidth>0">'
        f"<figcaption>{e(t)}</figcaption></figure>" for t, uri in plots(summary, results))
    sections.append(f'<h2>Plots</h2><div class="plots">{figures or "<p>No results to plot.</p>"}</div>')
    title = f"tokenmill run {s['run_id']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1a202c;padding:0 1em}}
h1{{font-size:1.5em;margin-bottom:.2em}} h2{{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #e2e8f0}}
.meta{{color:#4a5568}} table{{border-collapse:collapse;margin:.5em 0}}
th,td{{padding:.25em .8em;text-align:left;border-bottom:1px solid #edf2f7;font-size:.92em}}
table.kv th{{color:#4a5568;font-weight:normal}} table.grid thead th{{background:#f7fafc}}
.headline{{font-size:1.2em;margin:.8em 0}} .plots{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{margin:0}} figcaption{{text-align:center;color:#4a5568;font-size:.85em}}
</style></head>
<body>
<h1>{e(title)}</h1>
<p class="meta">job <b>{e(s['job'])}</b> ({e(s['task'])}) · model <b>{e(s['model'])}</b> on engine profile
{e(s['engine'])} · started {_when(s['started_at'])} · finished {_when(s.get('finished_at'))}</p>
<p class="headline">{_num(s['records_out'])} records for <b>{_usd(s['cost']['total_usd'])}</b>
({_usd(s['cost']['per_1k_records_usd'])} per 1,000 records, {e(s['cost']['mode'].replace('_', ' '))})</p>
{''.join(sections)}
</body></html>
"""
