"""Running a job: check everything, run the pipeline on Ray, commit shard by shard, resume what is left."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid
from typing import Any

from pipelines.account import accelerator_bill, attribute_accelerator_cost, hosted_comparison, tokens_cost
from pipelines.adapters import Adapter, check_adapter
from pipelines.config.load import Job, job_snapshot
from pipelines.commit import (
    RUN_FILE, SUCCESS, Committer, read_json, read_manifests, remove_uncommitted, write_json_atomic,
)
from pipelines.errors import ConfigError, EngineError, RunAborted
from pipelines.generate import vllm_engine_args
from pipelines.models import resolve_engine_paths
from pipelines.metrics import set_accrued
from pipelines.observe import EngineStats, read_ledger, stop_attempt
from pipelines.processor import build_dataset, rejects_schema
from pipelines.openai_batch import request_files, stage_requests, write_batch_files
from pipelines.report import SUMMARY_FILE, write_report
from pipelines.read import InputPlan, find_duplicates, plan_input
from pipelines.storage import StorageOptions, filesystem_for, join, protocol_of, to_uri
from pipelines.summary import by_label, by_shard, quality, reject_totals, result_totals, scan_results

log = logging.getLogger(__name__)

STAGED_DIR = "input"  # OpenAI batch requests, checked and staged as Parquet


def ensure_ray() -> None:
    """Join the cluster in `RAY_ADDRESS` (as under `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        with _daemon_env(QUIET_CLUSTER_ENV):
            ray.init(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)
        global _LOCAL_CLUSTER
        _LOCAL_CLUSTER = True
        yield_to_workers()
        poll_nodes_seldom()
        # Ray Data starts its helper actors (stats, autoscaling coordinator, actor locations) when a dataset
        # runs, and they run at 0 until found: look for new ones every few seconds for as long as we live.
        threading.Thread(target=_keep_yielding, name="tokenmill-yield", daemon=True).start()


_LOCAL_CLUSTER = False  # this process started the cluster, so may set its processes' priorities

# What a cluster tokenmill starts for itself hands its daemons, which read it when they start. On a small
# machine every wakeup of Ray's bookkeeping comes out of the engine:
QUIET_CLUSTER_ENV = {
    # Ray starts its workers at niceness 15 and keeps its daemons and this driver at 0, so its bookkeeping
    # preempts the engine; here the engine's actor runs at 0 and the rest yields (yield_to_workers).
    "RAY_worker_niceness": "0",
    # The log monitor globs the log folder for new files ten times a second until there are a thousand;
    # every 2 s is soon enough (a new file is read from its start, so no line is lost).
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "2",
    # The dashboard agent samples every worker's process stats every 5 s for a dashboard a local cluster
    # does not run; its node metrics come every 30 s instead. Application metrics are not affected.
    "REPORTER_UPDATE_INTERVAL_MS": "30000",
}


@contextlib.contextmanager
def _daemon_env(values: dict[str, str]):
    """`values` in the environment (where the user has not set them) while the cluster's daemons start."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# Ray's processes that do bookkeeping, not the job's work: its daemons, by program, and Ray Data's helper
# actors, by process title. The raylet stays as it is (it forks the workers, which would inherit its
# niceness), and so do the task workers that feed the engine.
_RAY_DAEMONS = ("gcs_server", "dashboard/agent.py", "runtime_env/agent/main.py")
_RAY_HELPER_TITLES = ("ray::_", "ray::ActorLocationTracker", "ray::DashboardA")


# Bookkeeping nothing waits on: Ray Data's helper actors and the dashboard agent (called without waiting
# for the answer), and Ray's log and autoscaler monitors, which only poll (by program). They run under
# SCHED_IDLE, only when a core has nothing else to do: a Python Ray worker wakes every 10 ms to check for
# signals, and a waking nice-19 thread may still preempt an engine thread that the engine's other threads
# then wait for. GCS, the runtime-env agent (a starting actor waits for it) and this driver only yield.
_RAY_POLLERS = ("log_monitor.py", "monitor.py")


def _bookkeeping(proc, argv: list[str]) -> str | None:
    """"idle" for bookkeeping nothing waits on, "yield" for the rest of it, None for the job's processes."""
    if proc.name() == "raylet":
        return None
    # The program itself, not its arguments: the raylet names the agents' scripts among its flags.
    program = " ".join(argv[:3])
    if argv[0].startswith(_RAY_HELPER_TITLES) or any(d in program for d in _RAY_POLLERS):
        return "idle"
    return "yield" if any(d in program for d in _RAY_DAEMONS) else None


def yield_to_workers(niceness: int = 19) -> list[int]:
    """Raise the niceness of this driver's threads and of the local cluster's bookkeeping processes (never
    lowers it, so no privilege is needed); the pids changed. Called when the cluster starts, then every few
    seconds (Ray Data starts its helper actors when a dataset runs); a process is looked at once per title."""
    import psutil

    changed = []
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            title = proc.cmdline()
            # A pooled worker takes a new title with each task or actor it runs: look again when it does.
            if not title or title[0] == "ray::IDLE" or (proc.pid, title[0]) in _SEEN:
                continue
            _SEEN.add((proc.pid, title[0]))
            kind = "yield" if proc.pid == me.pid else _bookkeeping(proc, title)
            if kind is None:
                continue
            idle = kind == "idle"
            for tid in [t.id for t in proc.threads()]:  # niceness and policy are per thread on Linux
                if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
                if idle and os.sched_getscheduler(tid) != os.SCHED_IDLE:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            changed.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return changed


_SEEN: set[tuple[int, str]] = set()  # (pid, title) pairs yield_to_workers has dealt with


def _keep_yielding() -> None:
    # Helper actors appear within seconds of a dataset's start; a scan costs tens of milliseconds of /proc
    # reading, so look often at first and seldom after.
    for delay in itertools.chain((1, 2, 4, 8, 15, 30), itertools.repeat(60)):
        time.sleep(delay)
        yield_to_workers()


def calm_scheduling(wait_s: float = 0.5) -> None:
    """Let Ray Data's scheduler wait longer for finished tasks before it looks again.

    Its loop wakes every 0.1 s, and each turn costs milliseconds of the driver's
    CPU: a few percent of one core, which on a small machine comes out of the
    engine. Our tasks run for seconds (an engine batch for tens), so looking
    twice a second delays nothing that matters. The setting is a module constant
    of Ray Data's executor; where a Ray version lacks it, nothing changes.
    """
    from ray.data._internal.execution import streaming_executor_state as state

    if isinstance(getattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", None), (int, float)):
        state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = max(state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S, wait_s)


def poll_nodes_seldom(ttl_s: float = 30.0) -> None:
    """Let Ray Data's actor pool ask which nodes are draining, and where its actors live, every `ttl_s`
    instead of every second; `ensure_ray` calls it only for a cluster it started: one node, which never drains.

    Each answer is a GCS query and a call to Ray Data's location-tracking actor, made by the scheduling loop
    once a second for as long as the run lasts: measured with py-spy over 90 s of a run, 84 of the driver's 581
    busy samples, and the tracker's and the GCS's CPU besides, all of it out of the engine on a small machine. The pool
    imports both functions by name, wrapped in a one-second cache; they are wrapped again with a longer one.
    Where a Ray version lacks them, nothing changes.
    """
    from ray.data._internal.execution.operators import actor_pool_map_operator as pool
    from ray.data._internal.utils.cache import timed_cache

    for name in ("get_draining_nodes", "get_actor_locations"):
        current = getattr(pool, name, None)
        inner = getattr(current, "__wrapped__", None)
        if callable(inner) and not getattr(current, "_tokenmill_seldom", False):
            seldom = timed_cache(ttl=ttl_s)(inner)
            seldom._tokenmill_seldom = True
            setattr(pool, name, seldom)


def preflight(job: Job) -> tuple[StorageOptions, Adapter | None, InputPlan | list[str]]:
    """Every check that needs no engine: engine arguments, the LoRA adapter, the input's shards and columns.

    For OpenAI batch input the third item is the request files (their lines are
    checked when the run stages them); otherwise the checked Parquet input.
    """
    storage = job.spec.storage.resolved()
    vllm_engine_args(job.engine, f"engine profile {job.engine.name}")
    adapter = check_adapter(job.spec.lora, storage) if job.spec.lora else None
    if job.spec.input.format == "openai_batch":
        return storage, adapter, request_files(job.spec.input.path, storage)[1]
    return storage, adapter, plan_input(job.spec, storage)


def spec_fingerprint(job: Job) -> str:
    """What a run's results depend on: the spec less where it writes and how it is scheduled, and the engine."""
    spec = job.spec.model_dump(mode="json", exclude={"output": {"path"}, "actors": True, "batch_size": True,
                                                        "failures": True, "storage": True, "description": True})
    payload = {"spec": spec, "engine": job.engine.model_dump(mode="json", exclude={"description"})}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_run_id(job: Job, fingerprint: str) -> str:
    """`<job>-<partition>-<fingerprint>`: a scheduler's retry of the same job on the same input
    lands on the same run and resumes it; a changed spec or input makes a new run. The partition is
    `--date` where given, else the input folder's name."""
    leaf = job.partition or job.spec.input.path.rstrip("/").rsplit("/", 1)[-1] or "input"
    leaf = re.sub(r"[^A-Za-z0-9_.=-]+", "-", leaf).strip("-")[:40] or "input"
    return f"{job.spec.name}-{leaf}-{fingerprint[:10]}"


def _open_run(job: Job, out_fs, run_root: str, run_id: str, fingerprint: str, resume: bool) -> dict | None:
    """Start the run's record, or check an existing one may be resumed; the finished run's summary if any."""
    state = read_json(out_fs, join(run_root, RUN_FILE))
    where = join(job.spec.output.path, run_id)
    if state is None:
        if out_fs.exists(run_root) and out_fs.ls(run_root):
            raise ConfigError(f"output.path: {where} exists but is not a tokenmill run; choose another --run-id")
        created = write_json_atomic(out_fs, join(run_root, RUN_FILE), {
            "run_id": run_id, "job": job.spec.name, "fingerprint": fingerprint,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(), "snapshot": job_snapshot(job)},
            exclusive=True)
        if created:
            return None
        state = read_json(out_fs, join(run_root, RUN_FILE))  # another attempt started it a moment ago
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"run {run_id!r} at {where} was started from another spec or engine profile; "
                          "resuming would mix results: choose another --run-id")
    if not resume:
        raise ConfigError(f"run {run_id!r} already exists at {where}; resume it (the default) or choose another "
                          "--run-id")
    if out_fs.exists(join(run_root, SUCCESS)):
        log.info("run %s already finished; nothing to do", run_id)
        return read_json(out_fs, join(run_root, SUMMARY_FILE))
    return None


def run_job(job: Job, *, run_id: str | None = None, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Run a job end to end, or resume it; return its summary (also written as `summary.json`).

    Args:
        job: A validated job (`pipelines.config.load_job`).
        run_id: The run's id; default `default_run_id`. Everything goes under
            `<output.path>/<run_id>/` (see `pipelines.commit` for the layout).
        progress: Show Ray Data's progress bars.
        resume: Go on with an existing run of this id (shards it committed are
            skipped, the others redone); False refuses an existing run.
    """
    spec = job.spec
    fingerprint = spec_fingerprint(job)
    run_id = run_id or default_run_id(job, fingerprint)
    storage, adapter, plan = preflight(job)
    out_fs, out_root = filesystem_for(spec.output.path, storage)
    run_root = join(out_root, run_id)
    finished = _open_run(job, out_fs, run_root, run_id, fingerprint, resume)
    if finished is not None:
        return {**finished, "resumed": True, "shards_redone": 0}
    if spec.input.format == "openai_batch":
        stage_requests(spec, storage, out_fs, join(run_root, STAGED_DIR))  # deterministic: safe to redo
        plan = plan_input(spec, storage, uri=join(spec.output.path, run_id, STAGED_DIR))

    manifests = read_manifests(out_fs, run_root)
    resumed = bool(manifests)
    removed = remove_uncommitted(out_fs, run_root, manifests)
    todo = plan.without(set(manifests))
    if resumed:
        log.info("run %s: resuming: %d shards committed, %d to do, %d stale files removed",
                 run_id, len(manifests), len(todo.shards), removed)
    committer = Committer(out_fs, run_root, todo, rejects=rejects_schema(job, plan), run_id=run_id)
    committer.quarantine_unread(todo)
    duplicates = (find_duplicates(plan, spec.id_column, spec.input.duplicate_ids, storage)
                  if spec.input.format == "parquet" and todo.shards else {})

    started_at = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    aborted = None
    if todo.shards:
        _, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        ensure_ray()
        import ray
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = progress
        calm_scheduling()
        attempt = uuid.uuid4().hex[:8]
        processed = failed = 0
        meter = Progress(job, run_id, out_fs, run_root, total=sum(s.num_rows for s in todo.shards))
        try:
            ds = build_dataset(job, todo, run_id=run_id, run_root=run_root, out_fs=out_fs,
                               tokenizer_path=tokenizer_path, storage=storage, adapter=adapter,
                               attempt=attempt, duplicates=duplicates)
            for n, written in enumerate(ds.iter_rows()):
                committer.record(written)
                meter.add(written)
                processed += written["results_rows"] + written["rejects_rows"]
                failed += written["failed_rows"] + written["rejects_rows"]
                limit = spec.failures
                if processed >= limit.min_records and failed > limit.max_share * processed:
                    aborted = (f"run {run_id} stopped: {failed} of the {processed} records processed so far failed "
                               f"({failed / processed:.0%}, more than failures.max_share {limit.max_share:.0%}); "
                               f"{len(committer.committed)} shards committed stay valid; see the rejects, fix the "
                               "cause and run again to resume")
                    break
        except ray.exceptions.RayError as exc:
            raise EngineError(f"run {run_id} failed: {exc}; committed shards stay valid, run again to resume") \
                from exc
        finally:
            stop_attempt(out_fs, run_root, attempt)  # the pool is shut down with the dataset: billing ends
        meter.done()
    wall = time.perf_counter() - t0
    incomplete = committer.finish()
    if aborted:
        raise RunAborted(aborted)
    if incomplete:
        raise EngineError(f"run {run_id}: {len(incomplete)} shards were not fully written "
                          f"({', '.join(p.uri for p in incomplete[:3])}); run again to resume")

    manifests = read_manifests(out_fs, run_root)
    remove_uncommitted(out_fs, run_root, manifests)  # files of retried tasks and quarantined shards
    engine = EngineStats.from_ledger(read_ledger(out_fs, run_root))
    if spec.cost.mode == "accelerator_time":
        bill = accelerator_bill(engine, job.accelerator_price, job.engine.billed_units)
        attribute_accelerator_cost(out_fs, committed_results(manifests), compute_usd=bill["compute_usd"],
                                   overhead_usd=bill["overhead_usd"], compression=spec.output.parquet_compression)
    summary = summarize(job, run_id, manifests, storage, adapter=adapter, engine=engine, wall=wall,
                        started_at=started_at, resumed=resumed, shards_redone=len(todo.shards))
    if spec.output.format == "openai_batch":
        batch = write_batch_files(summary["output"]["results"], summary["output"]["rejects"], out_fs, run_root,
                                  id_column=spec.id_column, run_id=run_id, created=int(started_at.timestamp()))
        summary["output"].update(
            output_file=join(spec.output.path, run_id, "output.jsonl"), output_lines=batch["output_lines"],
            error_file=join(spec.output.path, run_id, "errors.jsonl"), error_lines=batch["error_lines"])
    write_report(out_fs, run_root, summary, storage)
    write_json_atomic(out_fs, join(run_root, SUCCESS), {
        "run_id": run_id, "results": summary["output"]["results"], "rejects": summary["output"]["rejects"],
        **{k: summary[k] for k in ("records_in", "records_out", "records_rejected", "prompt_tokens",
                                   "completion_tokens", "cost_usd", "started_at", "finished_at", "wall_s",
                                   "resumed", "shards_redone")}})
    return summary


def summarize(job: Job, run_id: str, manifests: dict[str, dict], storage: StorageOptions, *, adapter, engine,
              wall: float, started_at: dt.datetime, resumed: bool, shards_redone: int) -> dict[str, Any]:
    """The run's summary from its committed files only, so it always agrees with what readers see."""
    spec = job.spec
    protocol = protocol_of(spec.output.path)
    committed = [m for m in manifests.values() if m["state"] == "committed"]
    quarantined = [{"path": m["path"], "reason": m["reason"]} for m in manifests.values()
                   if m["state"] == "quarantined"]
    files = sorted(to_uri(f, protocol) for m in committed for f in m["results"])
    reject_files = sorted(to_uri(f, protocol) for m in manifests.values() for f in m["rejects"])
    results = scan_results(files, storage, with_file=True)
    totals = result_totals(results, spec.id_column)
    rejects = reject_totals(scan_results(reject_files, storage))
    records_in = sum(m["rows"] for m in committed)
    kinds = dict(totals.pop("errors_by_kind"))
    for kind, n in rejects["by_reason"].items():
        kinds[kind] = kinds.get(kind, 0) + n
    summary = {
        "run_id": run_id,
        "job": spec.name,
        "job_spec": str(job.spec_path),
        "engine": job.engine.name,
        "model": job.engine.display_model,
        "lora": dataclasses.asdict(adapter) if adapter else None,
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "wall_s": round(wall, 3),
        "task": spec.task,
        "resumed": resumed,
        "shards_redone": shards_redone,
        "records_in": records_in,
        **totals,
        "records_rejected": rejects["rows"],
        "records_failed": totals["records_failed"] + rejects["rows"],
        "duplicate_ids": rejects["by_reason"].get("duplicate_id", 0),
        "errors_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "records_per_s": round(totals["records_out"] / wall, 3) if wall and totals["records_out"] else None,
        "output_tokens_per_s": round(totals["completion_tokens"] / wall, 3) if wall else None,
        "engine_start_s": round(max(engine.engine_start_s), 3) if engine.engine_start_s else None,
        "engine_replicas": engine.replicas,
        "steady_output_tokens_per_s": round(engine.output_tokens / engine.steady_s, 3) if engine.steady_s else None,
        "cost": cost_lines(job, totals, engine),
        "cache": None,
        "price": {"model": job.engine.display_model, **job.price.model_dump(mode="json")},
        "input": {"path": spec.input.path, "format": spec.input.format, "shards": len(committed),
                  "quarantined": quarantined},
        "output": {"path": join(spec.output.path, run_id), "format": spec.output.format, "results": files,
                   "rejects": reject_files},
    }
    summary["cache"] = cache_lines(job, totals, summary["cost"])
    summary["hosted_comparison"] = hosted_comparison(totals, summary["cost"]["total_usd"], job.hosted)
    if files:
        summary["by_shard"] = by_shard(results, {k: m["path"] for k, m in manifests.items()})
        if spec.task == "classify":
            summary["by_label"] = by_label(results)
    found = quality(results, spec) if files else None
    if found is not None:
        summary["quality"] = found
    if totals["records_out"] + rejects["rows"] != records_in:
        log.error("run %s: %d records in committed shards but %d results and %d rejects", run_id, records_in,
                  totals["records_out"], rejects["rows"])
    return summary


def committed_results(manifests: dict[str, dict]) -> list[str]:
    """The results files of the committed shards."""
    return sorted(f for m in manifests.values() if m["state"] == "committed" for f in m["results"])


def cost_lines(job: Job, totals: dict, engine: EngineStats) -> dict[str, Any]:
    """The run's cost as a finance reader wants it: the mode, the total, its parts, and per 1k records."""
    records = totals["records_out"]
    total = totals["cost_usd"] or 0.0
    lines: dict[str, Any] = {"mode": job.spec.cost.mode, "total_usd": total,
                             "per_1k_records_usd": 1000 * total / records if records else None}
    if job.spec.cost.mode == "per_token":
        # Answers from the response cache cost nothing: only the generated records' tokens are billed.
        p = job.price
        prompt = totals["prompt_tokens"] - totals["cached_records_prompt_tokens"]
        cached = totals["cached_prompt_tokens"] - totals["cached_records_cached_prompt_tokens"]
        output = totals["completion_tokens"] - totals["cached_records_completion_tokens"]
        lines.update(input_usd=tokens_cost(prompt - cached, 0, 0, p),
                     cached_input_usd=tokens_cost(cached, cached, 0, p),
                     output_usd=tokens_cost(0, 0, output, p),
                     rates={"model": job.engine.display_model, **p.model_dump(mode="json")})
        return lines
    rate, weights = job.accelerator_price, job.engine.cost
    bill = accelerator_bill(engine, rate, job.engine.billed_units)
    lines.update(bill, compute_share=bill["compute_usd"] / bill["total_usd"] if bill["total_usd"] else None,
                 work_units=totals.get("work_units"), attributed_usd=total,
                 rates={"accelerator": weights.accelerator, "units_per_replica": job.engine.billed_units,
                        **rate.model_dump(mode="json"), "decode_weight": weights.decode_weight,
                        "cached_weight": weights.cached_weight})
    lines["total_usd"] = bill["total_usd"]
    lines["per_1k_records_usd"] = 1000 * bill["total_usd"] / records if records else None
    return lines


def cache_lines(job: Job, totals: dict, cost: dict[str, Any]) -> dict[str, Any] | None:
    """What the response cache answered and what generating those answers would have cost at this run's
    rates (token prices, or the run's own dollars per unit of engine work)."""
    n = totals["records_cached"]
    if job.spec.cache is None and not n:
        return None
    prompt, cached, output = (totals[f"cached_records_{k}"] for k in ("prompt_tokens", "cached_prompt_tokens",
                                                                       "completion_tokens"))
    if job.spec.cost.mode == "per_token":
        saved = tokens_cost(prompt, cached, output, job.price)
    else:
        w = job.engine.cost
        work = (prompt - cached) + w.cached_weight * cached + w.decode_weight * output
        if totals["work_units"]:
            saved = work * cost["compute_usd"] / totals["work_units"]
        elif w.throughput:  # nothing generated: the profile's measured rate
            saved = work / w.throughput.work_per_s * job.accelerator_price.usd_per_hour * job.engine.billed_units / 3600
        else:
            saved = None
    return {"path": job.spec.cache.path if job.spec.cache else None, "records": n,
            "share": n / totals["records_out"] if totals["records_out"] else None,
            "prompt_tokens": prompt, "completion_tokens": output, "saved_usd": saved}


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
        rate = self.job.accelerator_price
        now = time.time()
        seconds = sum((e.get("stopped_at") or now) - e["created_at"] for e in read_ledger(self.fs, self.run_root))
        return seconds * rate.usd_per_hour * self.job.engine.billed_units / 3600

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
