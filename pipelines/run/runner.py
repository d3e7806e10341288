"""Running a job: check everything, run the pipeline on Ray, commit shard by shard, resume what is left."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid

import polars as pl

from pipelines.config.load import Job, job_snapshot
from pipelines.config.storage import StorageOptions
from pipelines.errors import BudgetSpent, ConfigError, EngineError, RunAborted
from pipelines.io.openai_batch import request_files, stage_requests, write_batch_files
from pipelines.io.storage import filesystem_for, join, read_json, write_json_atomic
from pipelines.models import resolve_engine_paths
from pipelines.models.adapters import Adapter, check_adapter
from pipelines.names import run_id_problem
from pipelines.run.cluster import check_answers, check_reachable, dead_nodes, ensure_ray, is_local
from pipelines.run.commit import (
    RUN_FILE,
    SUCCESS,
    Committer,
    RunRecord,
    Success,
    committed_results,
    create_run_record,
    drop_broken_manifests,
    read_manifests,
    read_run_record,
    remove_uncommitted,
    write_success,
)
from pipelines.run.cost import accelerator_bill, attribute_accelerator_cost
from pipelines.run.drift import compare, previous_run
from pipelines.run.lease import Lease
from pipelines.run.ledger import EngineStats, ReplicaLedger, read_ledger, stop_attempt
from pipelines.run.plan import plan_check, plan_job
from pipelines.run.progress import Progress
from pipelines.run.report import write_report
from pipelines.run.summary import (
    AttemptInfo,
    BudgetFigures,
    ReplayOf,
    RunSummary,
    read_summary,
    scan_results,
    summarize,
)
from pipelines.stages.engine import check_engine_args
from pipelines.stages.processor import build_dataset, rejects_schema
from pipelines.stages.read import InputPlan, duplicate_pass_on_cluster, find_duplicates, plan_input

log = logging.getLogger(__name__)

STAGED_DIR = "input"  # OpenAI batch requests, checked and staged as Parquet


def preflight(job: Job) -> tuple[StorageOptions, Adapter | None, InputPlan | list[str]]:
    """Every check that needs no engine: engine arguments, the LoRA adapter, the input's shards and columns.

    For OpenAI batch input the third item is the request files (their lines are
    checked when the run stages them); otherwise the checked Parquet input.
    """
    storage = job.spec.storage.resolved()
    if job.engine.backend == "vllm":
        check_engine_args(job.engine, f"engine profile {job.engine.name}")
    adapter = check_adapter(job.spec.lora, storage) if job.spec.lora else None
    if job.spec.input.format == "openai_batch":
        return storage, adapter, request_files(job.spec.input.path, storage)[1]
    return storage, adapter, plan_input(job.spec, storage)


def spec_fingerprint(job: Job) -> str:
    """What a run's results depend on: the spec less where it writes and how it is scheduled, and the engine."""
    spec = job.spec.model_dump(mode="json", exclude={"output": {"path"}, "actors": True, "batch_size": True,
                                                        "failures": True, "storage": True, "description": True,
                                                        "lease": True, "gates": True, "budget": True})
    # The stand-in's pace and the process the engine core runs in change how long it takes, not what it answers.
    engine = job.engine.model_dump(mode="json", exclude={"description", "stand_in_s_per_request", "engine_process"})
    payload = {"spec": spec, "engine": engine}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_run_id(job: Job, fingerprint: str) -> str:
    """`<job>-<partition>-<fingerprint>`: a scheduler's retry of the same job on the same input
    lands on the same run and resumes it; a changed spec or input makes a new run. The partition is
    `--date` where given, else the input folder's name."""
    leaf = job.partition or job.spec.input.path.rstrip("/").rsplit("/", 1)[-1] or "input"
    leaf = re.sub(r"[^A-Za-z0-9_.=-]+", "-", leaf).strip("-")[:40] or "input"
    return f"{job.spec.name}-{leaf}-{fingerprint[:10]}"


def _open_run(job: Job, out_fs, run_root: str, run_id: str, fingerprint: str, resume: bool) -> RunSummary | None:
    """Start the run's record, or check an existing one may be resumed; the finished run's summary if any."""
    state = read_run_record(out_fs, run_root)
    where = join(job.spec.output.path, run_id)
    if state is None:
        if out_fs.exists(run_root) and out_fs.ls(run_root):
            raise ConfigError(f"output.path: {where} exists but is not a tokenmill run; choose another --run-id")
        record = RunRecord(run_id=run_id, job=job.spec.name, fingerprint=fingerprint,
                           created_at=dt.datetime.now(dt.timezone.utc).isoformat(), snapshot=job_snapshot(job))
        if create_run_record(out_fs, run_root, record):
            return None
        state = read_run_record(out_fs, run_root)  # another attempt started it a moment ago
        if state is None:
            raise ConfigError(f"output.path: {where}: {RUN_FILE} could not be created nor read; check the store")
    if state.fingerprint != fingerprint:
        raise ConfigError(f"run {run_id!r} at {where} was started from another spec or engine profile; "
                          "resuming would mix results: choose another --run-id")
    if not resume:
        raise ConfigError(f"run {run_id!r} already exists at {where}; resume it (the default) or choose another "
                          "--run-id")
    if out_fs.exists(join(run_root, SUCCESS)):
        log.info("run %s already finished; nothing to do", run_id)
        return read_summary(out_fs, run_root)
    return None


BUDGET_POLL_S = 0.5
BUDGET_DIR = "_budget"  # one file per attempt: what its engines spent, for the next attempt's keeper
PLAN_SAMPLE = 512  # rows the run's own plan estimate reads: enough for its token figures, a second or two


def plan_estimate(job: Job) -> dict | None:
    """`tokenmill plan` on a sample of the input, for the summary's `plan_check`; never a reason to fail a run."""
    try:
        return plan_job(job, sample=PLAN_SAMPLE)
    except Exception as exc:  # noqa: BLE001 - an estimate is worth a log line, not a run
        log.warning("run %s: no plan estimate to check the run against: %s", job.spec.name, exc)
        return None


def start_budget(job: Job, run_id: str, out_fs, run_root: str, manifests: dict, storage: StorageOptions):
    """The run's budget keeper (`pipelines.run.budget`), counting what earlier attempts spent: per token, what
    they committed; in accelerator time, every replica's time in the ledger."""
    from pipelines.run.budget import start_keeper

    spec = job.spec
    # Each earlier attempt's own count of what its engines did, committed or not: a retry does not spend again
    # what an attempt spent on shards it left uncommitted. Attempts that kept none (killed, or older) count what
    # was committed.
    kept = [read_json(out_fs, path) or {} for path in out_fs.find(join(run_root, BUDGET_DIR))] \
        if out_fs.exists(join(run_root, BUDGET_DIR)) else []
    if kept:
        done = (sum(float(k.get("usd", 0.0)) for k in kept), sum(int(k.get("output_tokens", 0)) for k in kept))
    else:
        results = scan_results(committed_results(manifests), storage)
        done = (results.select(pl.col("cost_usd").sum(), pl.col("completion_tokens").sum()).collect().row(0)
                if results is not None else (0.0, 0))
    per_s, prior_usd = 0.0, float(done[0] or 0.0)
    if spec.cost.mode == "accelerator_time":
        rate = job.accelerator_billing()[0]
        per_s = job.usd_per_replica_s()
        prior_usd = accelerator_bill(EngineStats.from_ledger(read_ledger(out_fs, run_root)), rate,
                                     job.engine.billed_units)["total_usd"]
    return start_keeper(max_usd=spec.budget.max_usd, max_output_tokens=spec.budget.max_output_tokens,
                        mode=spec.cost.mode, usd_per_replica_s=per_s, spent_usd=prior_usd,
                        spent_tokens=int(done[1] or 0), tags={"job": spec.name, "run_id": run_id})


def budget_figures(job: Job, state: dict, ledger: list[dict]) -> BudgetFigures:
    """The summary's budget section; in accelerator time, spend is the replicas' billed time, as the bill is."""
    spec = job.spec
    spent = state["spent_usd"]
    if spec.cost.mode == "accelerator_time":
        spent = accelerator_bill(EngineStats.from_ledger(ledger), job.accelerator_billing()[0],
                                 job.engine.billed_units)["total_usd"]
    over = max(0.0, spent - spec.budget.max_usd) if spec.budget.max_usd is not None else 0.0
    largest, before = state["largest_batch_usd"], state["spent_before_first_batch_usd"]
    return BudgetFigures(max_usd=spec.budget.max_usd, max_output_tokens=spec.budget.max_output_tokens,
                         spent_usd=round(spent, 9), spent_output_tokens=state["spent_output_tokens"],
                         batches=state["batches"], batches_refused=state["refused"],
                         largest_batch_usd=round(largest, 9), overshoot_usd=round(over, 9),
                         overshoot_batches=round(over / largest, 3) if largest else 0.0,
                         spent_before_first_batch_usd=None if before is None else round(before, 9))


def _stopped_summary(job: Job, run_id: str, out_fs, run_root: str, storage: StorageOptions, *, adapter, wall: float,
                     started_at: dt.datetime, resumed: bool, shards_redone: int, state: dict,
                     lineage: ReplayOf | None) -> BudgetFigures:
    """Write the summary of a run its budget stopped (what it committed, `stopped: budget`; no `_SUCCESS`);
    return its budget figures."""
    manifests = read_manifests(out_fs, run_root)
    ledger = read_ledger(out_fs, run_root)
    summary = summarize(job, run_id, manifests, storage, adapter=adapter, engine=EngineStats.from_ledger(ledger),
                        wall=wall, started_at=started_at, resumed=resumed, shards_redone=shards_redone)
    summary.stopped, summary.replay_of = "budget", lineage
    summary.budget = figures = budget_figures(job, state, ledger)
    write_report(out_fs, run_root, summary, storage)
    return figures


def attempt_info(lease: Lease, ledger: list[dict], *, engine_rows: int, shards_lost: int) -> AttemptInfo:
    """What this attempt did besides its results: its lease, and what it lost and redid (replicas, nodes, rows)."""
    mine = [e for e in ledger if e["attempt"] == lease.attempt]
    nodes = {e["node"] for e in mine if e.get("node")}
    lost = sorted(nodes & dead_nodes()) if nodes else []
    return AttemptInfo(attempt=lease.attempt, holder=lease.holder, lease_token=lease.token,
                       took_over_from=lease.previous.holder if lease.previous else None, shards_lost=shards_lost,
                       replicas_started=len(mine), nodes_lost=lost,
                       rows_redone=max(0, sum(e["rows"] for e in mine) - engine_rows))


def run_job(job: Job, *, run_id: str | None = None, progress: bool = True, resume: bool = True,
            lineage: ReplayOf | None = None) -> RunSummary:
    """Run a job end to end, or resume it; return its summary (also written as `summary.json`).

    Args:
        job: A validated job (`pipelines.config.load_job`).
        run_id: The run's id; default `default_run_id`. Everything goes under
            `<output.path>/<run_id>/` (see `pipelines.run.commit` for the layout).
        progress: Show Ray Data's progress bars.
        resume: Go on with an existing run of this id (shards it committed are
            skipped, the others redone); False refuses an existing run.
        lineage: The run this one replays the rejects of (`pipelines.run.replay`), kept in its summary.
    """
    spec = job.spec
    fingerprint = spec_fingerprint(job)
    if run_id is not None and (problem := run_id_problem(run_id)):
        raise ConfigError(problem)
    run_id = run_id or default_run_id(job, fingerprint)
    storage, adapter, checked = preflight(job)
    out_fs, out_root = filesystem_for(spec.output.path, storage)
    run_root = join(out_root, run_id)
    # Joining a running cluster, as under `ray job submit`: one that does not answer, or a local path the other
    # nodes cannot reach, is refused before anything is written. Otherwise the cluster is joined when the attempt
    # needs it, after the lease: a retry that finds the run busy is refused (or waits) without joining.
    if address := os.environ.get("RAY_ADDRESS"):
        paths = {"output.path": spec.output.path, "input.path": spec.input.path,
                 "cache.path": spec.cache.path if spec.cache else None,
                 "lora.path": spec.lora.path if spec.lora else None}
        check_answers(address)
        if any(path and is_local(path) for path in paths.values()):
            ensure_ray()
            check_reachable(paths)
    finished = _open_run(job, out_fs, run_root, run_id, fingerprint, resume)
    if finished is not None:
        return finished.model_copy(update={"resumed": True, "shards_redone": 0})
    attempt = uuid.uuid4().hex[:8]
    lease = Lease(out_fs, run_root, attempt=attempt, ttl_s=spec.lease.ttl_s).acquire(wait_s=spec.lease.wait_s)
    try:
        finished = read_summary(out_fs, run_root) if out_fs.exists(join(run_root, SUCCESS)) else None
        if finished is not None:  # the attempt this one waited for finished the run
            return finished.model_copy(update={"resumed": True, "shards_redone": 0})
        return _run_attempt(job, run_id=run_id, out_root=out_root, run_root=run_root, out_fs=out_fs,
                            storage=storage, adapter=adapter, checked=checked, lease=lease, progress=progress,
                            lineage=lineage)
    finally:
        lease.release()


def _run_attempt(job: Job, *, run_id: str, out_root: str, run_root: str, out_fs, storage: StorageOptions,
                 adapter: Adapter | None, checked: InputPlan | list[str], lease: Lease, progress: bool,
                 lineage: ReplayOf | None = None) -> RunSummary:
    """The run, by the attempt that holds its lease: clean up, generate what is left, commit, summarise."""
    spec = job.spec
    attempt = lease.attempt
    if isinstance(checked, InputPlan):
        plan = checked
    else:  # OpenAI batch request files: checked and staged as Parquet, then read like any input
        stage_requests(spec, storage, out_fs, join(run_root, STAGED_DIR))  # deterministic: safe to redo
        plan = plan_input(spec, storage, uri=join(spec.output.path, run_id, STAGED_DIR))

    manifests = read_manifests(out_fs, run_root)
    resumed = bool(manifests)
    lease.check("clean up the run folder")
    # Only this attempt holds the lease, so every file no manifest lists is another attempt's debris.
    manifests, lost = drop_broken_manifests(out_fs, run_root, manifests)
    removed = remove_uncommitted(out_fs, run_root, manifests)
    todo = plan.without(set(manifests))
    if resumed:
        log.info("run %s: resuming: %d shards committed, %d to do, %d stale files removed",
                 run_id, len(manifests), len(todo.shards), removed)
    committer = Committer(out_fs, run_root, todo, rejects=rejects_schema(job, plan), run_id=run_id, lease=lease)
    committer.quarantine_unread(todo)
    if todo.shards and duplicate_pass_on_cluster(plan):
        ensure_ray()
    duplicates = (find_duplicates(plan, spec.id_column, spec.input.duplicate_ids, storage)
                  if spec.input.format == "parquet" and todo.shards else {})

    # What `tokenmill plan` would have said, from a sample, to be checked against the run at its end.
    estimate = plan_estimate(job) if todo.shards and not resumed else None
    started_at = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    keeper = budget_state = None
    aborted = None
    engine_rows = 0  # rows this attempt's engines generated that were committed
    if todo.shards:
        _, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        ensure_ray()
        import ray
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = progress
        processed = failed = 0
        meter = Progress(job, run_id, out_fs, run_root, total=sum(s.num_rows for s in todo.shards))
        keeper = start_budget(job, run_id, out_fs, run_root, manifests, storage) if spec.budget.capped else None
        polled, sent_seen, spent_state = time.monotonic(), 0, None
        try:
            ds = build_dataset(job, todo, run_id=run_id, run_root=run_root, out_fs=out_fs,
                               tokenizer_path=tokenizer_path, storage=storage, adapter=adapter,
                               ledger=functools.partial(ReplicaLedger, out_fs, run_root, attempt=attempt),
                               duplicates=duplicates, budget=keeper)
            for written in ds.iter_rows():
                lease.check("go on with the run")  # an attempt fenced out stops at once, not at its next commit
                committer.record(written)
                meter.add(written)
                processed += written["results_rows"] + written["rejects_rows"]
                engine_rows += written["engine_rows"]
                failed += written["failed_rows"] + written["rejects_rows"]
                limit = spec.failures
                if processed >= limit.min_records and failed > limit.max_share * processed:
                    aborted = (f"run {run_id} stopped: {failed} of the {processed} records processed so far failed "
                               f"({failed / processed:.0%}, more than failures.max_share {limit.max_share:.0%}); "
                               f"{len(committer.committed)} shards committed stay valid; see the rejects, fix the "
                               "cause and run again to resume")
                    break
                if keeper is not None:
                    sent_seen += written["sent_rows"]
                    if spent_state is None and time.monotonic() - polled > BUDGET_POLL_S:
                        polled = time.monotonic()
                        state = ray.get(keeper.state.remote())
                        spent_state = state if state["stopped"] and not state["in_flight"] else None
                    # Spent, nothing in flight, and every batch sent is written: the rest would only be refused,
                    # so the replicas go now rather than idle (billed) while the remaining input is read.
                    if spent_state is not None and sent_seen >= spent_state["sent_rows"]:
                        break
        except ray.exceptions.RayError as exc:
            raise EngineError(f"run {run_id} failed: {exc}; committed shards stay valid, run again to resume") \
                from exc
        finally:
            stop_attempt(out_fs, run_root, attempt)  # the pool is shut down with the dataset: billing ends
            if keeper is not None:  # its last word: the pool is gone, nothing more settles
                budget_state = ray.get(keeper.state.remote())
                write_json_atomic(out_fs, join(run_root, BUDGET_DIR, f"{attempt}.json"), {
                    "attempt": attempt, "usd": budget_state["settled_usd"],
                    "output_tokens": budget_state["settled_tokens"]})
        meter.done()
    wall = time.perf_counter() - t0
    incomplete = committer.finish()
    if aborted:
        raise RunAborted(aborted)
    if budget_state is not None and budget_state["stopped"]:
        spent = _stopped_summary(job, run_id, out_fs, run_root, storage, adapter=adapter, wall=wall,
                                 started_at=started_at, resumed=resumed, shards_redone=len(todo.shards),
                                 state=budget_state, lineage=lineage)
        raise BudgetSpent(
            f"run {run_id} stopped: budget.{budget_state['stopped']} reached (spent ${spent.spent_usd:.6f}"
            f" and {spent.spent_output_tokens:,} output tokens); {len(committer.committed)} shards "
            f"committed stay valid, {len(incomplete)} left; raise the cap (--set budget.{budget_state['stopped']}"
            "=...) and run again to resume")
    if incomplete:
        raise EngineError(f"run {run_id}: {len(incomplete)} shards were not fully written "
                          f"({', '.join(p.uri for p in incomplete[:3])}); run again to resume")

    manifests = read_manifests(out_fs, run_root)
    lease.check("finish the run")
    remove_uncommitted(out_fs, run_root, manifests)  # files of retried tasks and quarantined shards
    ledger = read_ledger(out_fs, run_root)
    engine = EngineStats.from_ledger(ledger)
    if spec.cost.mode == "accelerator_time":
        bill = accelerator_bill(engine, job.accelerator_billing()[0], job.engine.billed_units)
        attribute_accelerator_cost(out_fs, committed_results(manifests), compute_usd=bill["compute_usd"],
                                   overhead_usd=bill["overhead_usd"], compression=spec.output.parquet_compression)
    summary = summarize(job, run_id, manifests, storage, adapter=adapter, engine=engine, wall=wall,
                        started_at=started_at, resumed=resumed, shards_redone=len(todo.shards),
                        attempt=attempt_info(lease, ledger, engine_rows=engine_rows, shards_lost=len(lost)))
    if spec.output.format == "openai_batch":
        batch = write_batch_files(summary.output.results, summary.output.rejects, out_fs, run_root,
                                  id_column=spec.id_column, run_id=run_id, created=int(started_at.timestamp()))
        summary.output = summary.output.model_copy(update=dict(
            output_file=join(spec.output.path, run_id, "output.jsonl"), output_lines=batch["output_lines"],
            error_file=join(spec.output.path, run_id, "errors.jsonl"), error_lines=batch["error_lines"]))
    summary.replay_of = lineage
    summary.plan_check = plan_check(estimate, summary) if estimate else None
    if estimate and estimate.get("profiles"):
        summary.plan_warning = estimate["profiles"][0].get("caveat")
    if budget_state is not None:
        summary.budget = budget_figures(job, budget_state, ledger)
    # Against the previous successful night of this job under this output path; a breached gate still commits.
    # A replay holds only the records that failed: it is no night to compare.
    found = None if lineage else previous_run(out_fs, out_root, job=spec.name, run_id=run_id,
                                              before=summary.started_at)
    summary.drift = compare(summary, found[1] if found else None, spec.gates,
                            previous_run=found[0] if found else None)
    write_report(out_fs, run_root, summary, storage)
    lease.check("write _SUCCESS")
    write_success(out_fs, run_root, Success(
        run_id=run_id, results=summary.output.results, rejects=summary.output.rejects, job=spec.name,
        gates=summary.drift.status,
        **summary.model_dump(include={"records_in", "records_out", "records_rejected", "prompt_tokens",
                                      "completion_tokens", "cost_usd", "started_at", "finished_at", "wall_s",
                                      "resumed", "shards_redone"})))
    return summary
