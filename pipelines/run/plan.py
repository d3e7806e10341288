"""`tokenmill plan`: what a run would do and cost, before any engine starts.

It reads the input (or its first `sample` rows), renders and tokenizes every
prompt with the engine's real chat template, exactly as the prompt stage does,
and counts what the run would generate and reject. Accelerator time comes from
each engine profile's measured throughput (`cost.throughput`, measured by
`tokenmill bench calibrate`): start-up plus the work over the work rate, the
work weighted as records are charged (`pipelines.stages.account.work_units`).
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.config.engine import EngineProfile
from pipelines.config.load import Job, load_engine, load_price_book
from pipelines.errors import ConfigError
from pipelines.io.storage import filesystem_for
from pipelines.models import resolve_engine_paths
from pipelines.paths import REPO_DIR
from pipelines.run.cluster import ensure_ray
from pipelines.run.commit import read_run_record
from pipelines.run.cost import hosted_comparison
from pipelines.run.summary import RunSummary, read_summary
from pipelines.stages.account import tokens_cost
from pipelines.stages.engine import this_machine
from pipelines.stages.processor import prompt_kwargs
from pipelines.stages.prompt import load_tokenizer, render_batch
from pipelines.stages.read import duplicate_pass_on_cluster, find_duplicates, plan_input, read_shard_rows

log = logging.getLogger(__name__)


def _shared_prefix(a: list[int], b: list[int], block: int) -> int:
    """Tokens of `b` the prefix cache can serve after `a`: their common prefix in whole blocks, short of
    `b`'s last token (which the engine always computes)."""
    n = 0
    for x, y in zip(a, b[:-1]):
        if x != y:
            break
        n += 1
    return n // block * block


def previous_run(job: Job) -> RunSummary | None:
    """The latest finished run of this job on this engine profile under `output.path`, as its summary."""
    storage = job.spec.storage.resolved()
    fs, root = filesystem_for(job.spec.output.path, storage)
    if not fs.exists(root):
        return None
    best = None
    for folder in fs.ls(root, detail=False):
        try:
            state = read_run_record(fs, folder) if fs.isdir(folder) else None
        except ConfigError as exc:  # another run's damaged or newer record: not one to learn from
            log.info("plan: skipping %s: %s", folder, exc)
            continue
        if state is None or state.job != job.spec.name:
            continue
        try:
            summary = read_summary(fs, folder)
        except ConfigError as exc:
            log.info("plan: skipping %s: %s", folder, exc)
            continue
        if summary and summary.engine == job.engine.name and summary.records_out:
            if best is None or summary.finished_at > best.finished_at:
                best = summary
    return best


def count_input(job: Job, *, sample: int | None = None) -> dict[str, Any]:
    """Rows, rejects by reason, and prompt tokens of what the run would generate."""
    spec = job.spec
    storage = spec.storage.resolved()
    with tempfile.TemporaryDirectory(prefix="tokenmill-plan-") as staged:
        if spec.input.format == "openai_batch":
            from pipelines.io.openai_batch import stage_requests

            local, _ = filesystem_for(staged, storage)
            stage_requests(spec, storage, local, staged)
            plan = plan_input(spec, storage, uri=staged)
        else:
            plan = plan_input(spec, storage)
        # A sample's repeated ids are not worth a pass over every id of the input.
        whole = sample is None and spec.input.format == "parquet" and bool(plan.shards)
        if whole and duplicate_pass_on_cluster(plan):
            ensure_ray()
        duplicates = find_duplicates(plan, spec.id_column, spec.input.duplicate_ids, storage) if whole else {}
        _, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        kwargs = prompt_kwargs(job, tokenizer_path=tokenizer_path, storage=storage)
        shards = pa.table({"key": [s.key for s in plan.shards], "path": [s.path for s in plan.shards]})
        read = 0
        reasons: Counter[str] = Counter()
        lengths: list[int] = []
        max_tokens: list[int] = []
        cached = 0
        previous: list[int] | None = None
        for part in read_shard_rows(shards, filesystem=plan.filesystem, schema=plan.schema, batch_rows=1024,
                                    duplicates=duplicates):
            if sample is not None and read >= sample:
                break
            if sample is not None:
                part = part.slice(0, sample - read)
            if part.num_rows and part.column("_row")[0].as_py() == -1:
                reasons[part.column("reject_code")[0].as_py()] += 1
                continue
            read += part.num_rows
            rendered = render_batch(part, **kwargs)
            per_row = (rendered.column("max_tokens").to_pylist() if "max_tokens" in rendered.column_names
                       else [None] * rendered.num_rows)
            for ids, code, mt in zip(rendered.column("prompt_token_ids").to_pylist(),
                                     rendered.column("error_code").to_pylist(), per_row):
                if code is not None:
                    reasons[code] += 1
                    continue
                lengths.append(len(ids))
                max_tokens.append(mt or spec.sampling.max_tokens)
                if previous is not None and job.engine.engine_args.enable_prefix_caching:
                    cached += _shared_prefix(previous, ids, job.engine.kv_block_size)
                previous = ids
    total_rows = plan.num_rows
    return {
        "rows": total_rows,
        "rows_read": read,
        "sampled": sample is not None and read < total_rows,
        "scale": total_rows / read if read and sample is not None else 1.0,
        "shards": len(plan.shards),
        "quarantined": [{"path": q.uri, "reason": q.reason} for q in plan.quarantined],
        "rejects": dict(reasons.most_common()),
        "generated": len(lengths),
        "prompt_tokens": sum(lengths),
        "cached_prompt_tokens_estimate": cached,
        "max_tokens_total": sum(max_tokens),
        "lengths": lengths,
        "tokenizer_path": tokenizer_path,
    }


def distribution(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"min": ordered[0], "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 2)}


def output_estimate(job: Job, counts: dict, previous: RunSummary | None) -> dict[str, Any]:
    """Output tokens per generated record: the bound `max_tokens` sets, and the best estimate there is."""
    n = counts["generated"]
    out: dict[str, Any] = {"upper_bound_total": counts["max_tokens_total"]}
    cap = job.spec.sampling.max_tokens
    measured = job.spec.plan
    if previous:
        mean = previous.completion_tokens / previous.records_out
        out.update(basis=f"observed in run {previous.run_id}", mean_per_record=round(mean, 3))
    elif measured.output_tokens_per_record is not None:
        # A figure measured under another max_tokens cannot pass this one's.
        out.update(basis="the job spec's plan.output_tokens_per_record, "
                   + (f"measured: {measured.measured}" if measured.measured else "source not given"),
                   mean_per_record=min(measured.output_tokens_per_record, float(cap)))
    elif job.spec.task == "classify" and job.spec.classify is not None:
        tokenizer = load_tokenizer(counts["tokenizer_path"])
        # The label's tokens and the end-of-sequence token, averaged over the labels.
        sizes = [len(tokenizer(name, add_special_tokens=False)["input_ids"]) + 1 for name in job.spec.classify.names]
        out.update(basis="the labels' token lengths (constrained decoding)", mean_per_record=statistics.fmean(sizes))
    else:
        out.update(basis="sampling.max_tokens, an upper bound (no earlier run to observe; "
                         "`tokenmill bench calibrate` measures plan.output_tokens_per_record)",
                   mean_per_record=counts["max_tokens_total"] / n if n else 0.0)
    out["total"] = round(out["mean_per_record"] * n)
    return out


def throughput_basis(profile: EngineProfile, machine: str | None = None) -> tuple[Any, str, str | None] | None:
    """The throughput a profile's estimates come from, what it is, and a warning where it may not hold here:
    its calibration, else a published figure (named, dated), else None."""
    c = profile.cost
    if c is None:
        return None
    if c.throughput is not None:
        warning = None
        if profile.device == "cpu":
            here = machine or this_machine()
            if c.throughput.machine is None:
                warning = "calibrated on a machine it does not name: rerun `tokenmill bench calibrate` here"
            elif c.throughput.machine != here:
                warning = (f"calibrated on another machine ({c.throughput.machine}; this one is {here}): "
                           "rerun `tokenmill bench calibrate` here")
        return c.throughput, f"calibrated: {c.throughput.measured}", warning
    if c.prior is not None:
        return c.prior, f"published figure, not calibrated: {c.prior.source}, taken {c.prior.taken}", None
    return None


def profile_estimate(profile: EngineProfile, rate, *, prompt: int, cached: int, output: int,
                     deadline_s: float | None, machine: str | None = None,
                     capacity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Accelerator time and cost of the work on one profile, the replicas a deadline needs, and whether the
    cluster's worker group for the profile (`capacity`: its KubeRay manifest's maxReplicas) can provide them."""
    est: dict[str, Any] = {"profile": profile.name, "model": profile.display_model, "device": profile.device}
    found = throughput_basis(profile, machine)
    if found is None:
        est["note"] = est["caveat"] = "no measured throughput (run `tokenmill bench calibrate` with this profile)"
        return est
    t, basis, warning = found
    c = profile.cost
    assert c is not None
    est["basis"] = basis
    if warning:
        est["warning"] = warning
    # Why its wall time and cost may not hold, for a run's summary to say beside their errors.
    est["caveat"] = warning or (basis if t is c.prior else None)
    work = (prompt - cached) + cached * c.cached_weight + output * c.decode_weight
    busy_s = work / t.work_per_s
    replicas: int | None = 1
    if deadline_s is not None:
        if deadline_s <= t.startup_s:
            est["note"] = f"the deadline is shorter than one replica's start-up ({t.startup_s:.0f} s)"
            replicas = None
        else:
            replicas = max(1, math.ceil(busy_s / (deadline_s - t.startup_s)))
    n = replicas or 1
    replica_s = n * t.startup_s + busy_s
    est.update(work_units=work, busy_s=busy_s, startup_s=t.startup_s, replicas=replicas,
               wall_s=t.startup_s + busy_s / n, replica_s=replica_s,
               accelerator_hours=replica_s * profile.billed_units / 3600)
    if capacity is not None:
        est["cluster"] = capacity
        est["fits_cluster"] = replicas is not None and replicas <= capacity["max_replicas"]
    if rate is not None:
        est["cost_usd"] = replica_s / 3600 * rate.usd_per_hour * profile.billed_units
        est["accelerator"] = rate.description
    else:
        est["note"] = f"no hourly rate for {c.accelerator!r} in the price book"
    return est


def cluster_capacity(manifests: Path) -> dict[str, dict[str, Any]]:
    """Per engine profile, the KubeRay RayCluster in `manifests` that serves it (its `tokenmill.io/engine-profile`
    annotation) and the most replicas its GPU worker groups can hold (their `maxReplicas`)."""
    import yaml

    found: dict[str, dict[str, Any]] = {}
    for path in sorted(manifests.glob("*.yaml")) if manifests.is_dir() else []:
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "RayCluster":
                continue
            profile = (doc.get("metadata", {}).get("annotations") or {}).get("tokenmill.io/engine-profile")
            groups = doc.get("spec", {}).get("workerGroupSpecs") or []
            if profile:
                found[profile] = {"manifest": path.name, "cluster": doc["metadata"]["name"],
                                  "max_replicas": sum(int(g.get("maxReplicas", g.get("replicas", 0))) for g in groups)}
    return found


def plan_job(job: Job, *, sample: int | None = None, deadline_s: float | None = None,
             manifests: Path | None = None) -> dict[str, Any]:
    """The dry run: see the module's docstring. No engine is started. `manifests`: the KubeRay manifests whose
    worker groups say how many replicas each profile's cluster can hold (default `infra/k8s/`)."""
    counts = count_input(job, sample=sample)
    previous = previous_run(job)
    output = output_estimate(job, counts, previous)
    scale = counts["scale"]
    prompt = round(counts["prompt_tokens"] * scale)
    if previous and previous.prompt_tokens:
        cached = round(prompt * previous.cached_prompt_tokens / previous.prompt_tokens)
        cached_basis = f"observed in run {previous.run_id}"
    else:
        cached = round(counts["cached_prompt_tokens_estimate"] * scale)
        cached_basis = f"prompts' shared prefixes in {job.engine.kv_block_size}-token blocks"
    out_total = round(output["total"] * scale)
    book = load_price_book(job.conf_dir)
    profiles = sorted(p.stem for p in (job.conf_dir / "engines").glob("*.yaml"))
    estimates = []
    capacity = cluster_capacity(manifests if manifests is not None else REPO_DIR / "infra" / "k8s")
    machine = this_machine()
    for name in [job.engine.name, *[p for p in profiles if p != job.engine.name]]:
        profile = job.engine if name == job.engine.name else load_engine(name, job.conf_dir)
        if profile.backend == "stand-in" and profile is not job.engine:
            continue  # a test engine: nothing to plan on
        rate = book.accelerators.get(profile.cost.accelerator) if profile.cost else None
        estimates.append(profile_estimate(profile, rate, prompt=prompt, cached=cached, output=out_total,
                                          deadline_s=deadline_s, machine=machine, capacity=capacity.get(name)))
    totals = {"prompt_tokens": prompt, "cached_prompt_tokens": cached, "completion_tokens": out_total}
    own = estimates[0]
    run_cost = (own.get("cost_usd") if job.spec.cost.mode == "accelerator_time"
                else tokens_cost(prompt, cached, out_total, job.price))
    lengths = counts.pop("lengths")
    return {
        "job": job.spec.name,
        "engine": job.engine.name,
        "input": job.spec.input.path,
        **{k: v for k, v in counts.items() if k != "tokenizer_path"},
        "prompt_tokens_distribution": distribution(lengths),
        "prompt_tokens_total": prompt,
        "cached_prompt_tokens_estimate": cached,
        "cached_basis": cached_basis,
        "output_tokens": {**output, "total": out_total},
        "previous_run": previous.run_id if previous else None,
        "deadline_s": deadline_s,
        "profiles": estimates,
        "cost_mode": job.spec.cost.mode,
        "estimated_cost_usd": run_cost,
        "hosted_comparison": hosted_comparison(totals, run_cost or 0.0, job.hosted),
    }


def format_plan(p: dict[str, Any]) -> str:
    d = p["prompt_tokens_distribution"] or {}
    o = p["output_tokens"]
    lines = [
        f"tokenmill plan: {p['job']} on {p['engine']} (no engine started)",
        f"  input          {p['input']}: {p['rows']:,} rows in {p['shards']} shards"
        + (f", {len(p['quarantined'])} quarantined" if p["quarantined"] else "")
        + (f" (first {p['rows_read']:,} read, scaled x{p['scale']:.2f})" if p["sampled"] else ""),
        f"  would generate {p['generated']:,} records; rejected: "
        + (", ".join(f"{k} {v}" for k, v in p["rejects"].items()) or "none"),
        f"  prompt tokens  {p['prompt_tokens_total']:,} (per record: min {d.get('min')}, median {d.get('p50')}, "
        f"p90 {d.get('p90')}, p99 {d.get('p99')}, max {d.get('max')}); cached about "
        f"{p['cached_prompt_tokens_estimate']:,} ({p['cached_basis']})",
        f"  output tokens  about {o['total']:,} ({o['mean_per_record']:.1f} per record, {o['basis']}); "
        f"at most {o['upper_bound_total']:,}",
        "  engine profiles" + (f" (deadline {p['deadline_s']:.0f} s)" if p["deadline_s"] else "") + ":",
    ]
    lines[2:2] = [f"  quarantined    {q['path']}: {q['reason']}" for q in p["quarantined"]]
    for e in p["profiles"]:
        if "replica_s" not in e:
            lines.append(f"    {e['profile']:<24} {e['note']}")
            continue
        cost = f"${e['cost_usd']:.6f}" if "cost_usd" in e else "no rate"
        reps = "deadline unreachable" if e["replicas"] is None else f"{e['replicas']} replica(s)"
        if "cluster" in e:
            reps += (f", {'within' if e['fits_cluster'] else 'MORE than'} the {e['cluster']['max_replicas']} "
                     f"of {e['cluster']['cluster']} ({e['cluster']['manifest']})")
        lines.append(f"    {e['profile']:<24} {e['replica_s']:,.0f} replica-s "
                     f"({e['accelerator_hours']:.4f} accelerator-h), {cost}, {reps}, wall about {e['wall_s']:,.0f} s")
        lines.append(f"    {'':<24} {e['basis']}")
        if e.get("warning"):
            lines.append(f"    {'':<24} WARNING: {e['warning']}")
    lines.append(f"  estimated cost ({p['cost_mode'].replace('_', ' ')}): "
                 + (f"${p['estimated_cost_usd']:.6f}" if p["estimated_cost_usd"] is not None else "unknown"))
    for h in p["hosted_comparison"].values():
        times = f", {h['times_run_cost']:,.1f}x" if h["times_run_cost"] else ""
        lines.append(f"    at {h['description']}: ${h['cost_usd']:.6f}{times}")
    return "\n".join(lines)


def plan_check(plan: dict[str, Any], summary: RunSummary) -> dict[str, dict[str, float | None]]:
    """The plan's estimates against what the run did: each figure's estimate, actual and error in percent
    (positive: the plan said more)."""
    own = plan["profiles"][0] if plan.get("profiles") else {}

    def row(estimate: float | None, actual: float | None) -> dict[str, float | None]:
        error = (round(100 * (estimate - actual) / actual, 1) if estimate is not None and actual else None)
        return {"estimate": None if estimate is None else round(estimate, 6), "actual": actual, "error_pct": error}

    return {
        "records": row(plan["generated"] * plan["scale"], summary.records_out),
        "prompt_tokens": row(plan["prompt_tokens_total"], summary.prompt_tokens),
        "output_tokens": row(plan["output_tokens"]["total"], summary.completion_tokens),
        "wall_s": row(own.get("wall_s"), summary.wall_s),
        "cost_usd": row(plan.get("estimated_cost_usd"), summary.cost.get("total_usd")),
    }
