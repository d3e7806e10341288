"""Running a job: check everything, run the pipeline on Ray, write results and summary.json."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import time
import uuid
from typing import Any

from pipelines.adapters import Adapter, check_adapter
from pipelines.config.load import Job
from pipelines.errors import ConfigError, EngineError
from pipelines.generate import vllm_engine_args
from pipelines.models import resolve_engine_paths
from pipelines.observe import EngineStats, start_stats_actor
from pipelines.processor import build_dataset
from pipelines.read import InputPlan, plan_input
from pipelines.storage import StorageOptions, arrow_filesystem, filesystem_for, join, protocol_of, to_uri
from pipelines.openai_batch import request_files, stage_requests, write_batch_files
from pipelines.summary import quality, result_totals, scan_results
from pipelines.write import write_json

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
RESULTS_DIR = "results"
STAGED_DIR = "input"  # OpenAI batch requests, checked and staged as Parquet


def new_run_id(job_name: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{job_name}-{stamp}-{uuid.uuid4().hex[:6]}"


def ensure_ray() -> None:
    """Join the cluster in `RAY_ADDRESS` (as under `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)


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


def run_job(job: Job, *, run_id: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run a job end to end; return its summary (also written as `summary.json`).

    Args:
        job: A validated job (`pipelines.config.load_job`).
        run_id: The run's id; default `<job>-<UTC time>-<random>`. Results go to
            `<output.path>/<run_id>/results/` and the summary beside them.
        progress: Show Ray Data's progress bars.
    """
    spec = job.spec
    run_id = run_id or new_run_id(spec.name)
    storage, adapter, plan = preflight(job)
    out_fs, out_root = filesystem_for(spec.output.path, storage)
    run_root = join(out_root, run_id)
    if out_fs.exists(run_root):
        raise ConfigError(f"output.path: run {run_id!r} already exists at {join(spec.output.path, run_id)}; "
                          "choose another --run-id")
    if spec.input.format == "openai_batch":
        stage_requests(spec, storage, out_fs, join(run_root, STAGED_DIR))
        plan = plan_input(spec, storage, uri=join(spec.output.path, run_id, STAGED_DIR))

    _, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
    ensure_ray()
    import ray
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = progress
    stats_name = f"tokenmill-stats-{run_id}"
    stats_actor = start_stats_actor(stats_name)
    started_at = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    try:
        ds = build_dataset(job, plan, run_id=run_id, tokenizer_path=tokenizer_path, storage=storage,
                           adapter=adapter, stats_actor=stats_name)
        results_root = join(run_root, RESULTS_DIR)
        ds.write_parquet(
            results_root,
            filesystem=arrow_filesystem(out_fs),
            compression=None if spec.output.compression == "none" else spec.output.compression,
        )
        wall = time.perf_counter() - t0
        engine: EngineStats = ray.get(stats_actor.get.remote())
    except ray.exceptions.RayError as exc:
        raise EngineError(f"run {run_id} failed: {exc}") from exc
    finally:
        ray.kill(stats_actor)
    finished_at = dt.datetime.now(dt.timezone.utc)

    protocol = protocol_of(spec.output.path)
    files = sorted(to_uri(p, protocol) for p in out_fs.find(results_root) if p.endswith(".parquet"))
    results = scan_results(files, storage)
    totals = result_totals(results, spec.id_column)
    steady = engine.steady_seconds
    summary = {
        "run_id": run_id,
        "job": spec.name,
        "job_spec": str(job.spec_path),
        "engine": job.engine.name,
        "model": job.engine.display_model,
        "lora": dataclasses.asdict(adapter) if adapter else None,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "wall_s": round(wall, 3),
        "task": spec.task,
        "records_in": plan.num_rows,
        **totals,
        "records_per_s": round(totals["records_out"] / wall, 3) if wall else None,
        "output_tokens_per_s": round(totals["completion_tokens"] / wall, 3) if wall else None,
        "engine_start_s": round(max(engine.engine_start_s), 3) if engine.engine_start_s else None,
        "engine_replicas": len(engine.engine_start_s),
        "steady_output_tokens_per_s": round(engine.output_tokens / steady, 3) if steady else None,
        "price": {"model": job.engine.display_model, **job.price.model_dump(mode="json")},
        "input": {"path": spec.input.path, "format": spec.input.format, "shards": len(plan.shards)},
        "output": {"path": join(spec.output.path, run_id), "format": spec.output.format, "results": files},
    }
    found = quality(results, spec)
    if found is not None:
        summary["quality"] = found
    if spec.output.format == "openai_batch":
        batch = write_batch_files(files, out_fs, run_root, id_column=spec.id_column, run_id=run_id,
                                  created=int(started_at.timestamp()))
        summary["output"].update(
            output_file=join(spec.output.path, run_id, "output.jsonl"), output_lines=batch["output_lines"],
            error_file=join(spec.output.path, run_id, "errors.jsonl"), error_lines=batch["error_lines"])
    if totals["records_out"] != plan.num_rows:
        log.error("run %s: %d records in but %d out", run_id, plan.num_rows, totals["records_out"])
    write_json(out_fs, join(run_root, SUMMARY_FILE), summary)
    return summary
