"""`tokenmill bench resume`: a run, then the same run again. Resuming a finished run must start no engine and
redo no shard: it reads the run's record and its `_SUCCESS`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from pipelines.bench.common import bench_input
from pipelines.config.load import load_job


def run_resume(job_path: Path, *, overrides: Sequence[str] = (), engine_overrides: Sequence[str] = (),
               conf_dir: Path | None = None, rows: int = 128) -> dict[str, Any]:
    """A run, then the same run again: resuming a finished run must do no engine work and take little time."""
    from pipelines.run.runner import run_job

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=overrides, conf_dir=conf_dir, engine_overrides=engine_overrides)
        bench_input(job, rows, workdir / "input")
        job = load_job(job_path, conf_dir=conf_dir, engine_overrides=engine_overrides, overrides=[
            *overrides, f"input.path={workdir / 'input'}", f"output.path={workdir / 'output'}"])
        t0 = time.perf_counter()
        first = run_job(job, run_id="bench-resume", progress=False)
        first_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        again = run_job(job, run_id="bench-resume", progress=False)
        again_s = time.perf_counter() - t1
    return {
        "job": job.spec.name,
        "engine": job.engine.name,
        "rows": rows,
        "first_run_s": first_s,
        "first_run_engine_replicas": first.engine_replicas,
        "first_run_output_tokens": first.completion_tokens,
        "resume_s": again_s,
        "resume_shards_redone": again.shards_redone,
        "ratio_resume_to_first": again_s / first_s,
    }


def format_resume(r: dict[str, Any]) -> str:
    return "\n".join([
        f"tokenmill bench resume: {r['job']} on {r['engine']}, {r['rows']} records",
        f"  first run: {r['first_run_s']:.1f} s, {r['first_run_engine_replicas']} engine replica(s), "
        f"{r['first_run_output_tokens']:,} output tokens",
        f"  resume of the finished run: {r['resume_s']:.2f} s, {r['resume_shards_redone']} shards redone, "
        "no engine started",
        f"  ratio resume/first run: {r['ratio_resume_to_first']:.4f}",
    ])
