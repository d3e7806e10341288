"""What every benchmark shares: its input, the prompts the pipeline would send, and its child processes.

Each side of a benchmark runs in a child process of its own (`python -m
pipelines.bench ARGS_FILE`), so that its start-up, memory and CPU are its own.
The child writes its figures as JSON to the file the parent names, the parent
reads them into the side's dataclass: nothing is parsed from the child's output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config.load import Job
from pipelines.stages.engine import actor_env
from pipelines.stages.processor import prompt_kwargs
from pipelines.stages.prompt import render_batch
from pipelines.stages.read import plan_input

T = TypeVar("T")


def fixed_sampling(max_tokens: int) -> list[str]:
    """Overrides that make every side generate exactly `max_tokens` tokens per prompt, greedily."""
    return [f"sampling.max_tokens={max_tokens}", "sampling.ignore_eos=true", "sampling.temperature=0"]


def bench_input(job: Job, rows: int, out_dir: Path | None, shards: int = 4) -> pa.Table:
    """The job's input rows repeated to `rows`, with fresh ids, written as `shards` Parquet files (unless
    `out_dir` is None)."""
    import pyarrow.dataset as pads

    plan = plan_input(job.spec, job.spec.storage.resolved())
    source = pads.dataset(plan.paths, filesystem=plan.filesystem, format="parquet").to_table(columns=plan.columns)
    if source.num_rows == 0:
        raise ValueError(f"{job.spec.input.path}: no rows to benchmark with")
    reps = -(-rows // source.num_rows)
    table = pa.concat_tables([source] * reps).slice(0, rows)
    id_col = job.spec.id_column
    table = table.set_column(table.schema.get_field_index(id_col), id_col, pa.array([f"b{i:07d}" for i in range(rows)]))
    if out_dir is not None:
        write_shards(table, out_dir, shards)
    return table


def distinct_input(job: Job, rows: int, out_dir: Path, *, tag: str, shards: int = 4) -> pa.Table:
    """`rows` records with distinct prompts: the job's input repeated, each record's last prompt column marked
    with its own reference, ids `<tag>0000000`..."""
    import pyarrow.compute as pc

    table = bench_input(job, rows, None)
    column = job.spec.prompt_columns[-1]
    refs = pa.array([f" (ref {tag}{i})" for i in range(rows)])
    table = table.set_column(table.schema.get_field_index(column), column,
                             pc.binary_join_element_wise(pc.cast(table.column(column), pa.string()), refs, ""))
    id_col = job.spec.id_column
    table = table.set_column(table.schema.get_field_index(id_col), id_col,
                             pa.array([f"{tag}{i:07d}" for i in range(rows)]))
    write_shards(table, out_dir, shards)
    return table


def write_shards(table: pa.Table, out_dir: Path, shards: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    per = -(-table.num_rows // shards)
    for k in range(shards):
        pq.write_table(table.slice(k * per, per), out_dir / f"part-{k:05d}.parquet")


def prompt_ids(job: Job, table: pa.Table, tokenizer_path: str) -> list[list[int]]:
    """The same token ids the pipeline's prompt stage gives the engine."""
    rendered = render_batch(
        table, **prompt_kwargs(job, tokenizer_path=tokenizer_path, storage=job.spec.storage.resolved())
    )
    bad = [e for e in rendered.column("error").to_pylist() if e]
    if bad:
        raise ValueError(f"bench input has records the pipeline would reject: {bad[:3]}")
    return rendered.column("prompt_token_ids").to_pylist()


def run_child(job: Job, workdir: Path, mode: str, payload: dict[str, Any], result: Callable[..., T], *,
              engine_in_child: bool, join: dict[str, str] | None = None) -> T:
    """Run one side (`mode`, see `pipelines.bench.__main__`) in a child process; its figures as `result(**json)`.

    `engine_in_child`: the engine runs in the child itself and gets the engine
    actors' environment; a Ray driver must not have it (its cluster's processes
    would inherit it: preloaded OpenMP pinned the engine actor to one core), and
    Ray's engine actors get it through their runtime_env. `join`: the
    environment that makes the child join a running cluster (`RunningCluster.driver_env`), as a driver
    under `ray job submit` does.
    """
    args_file, result_file = workdir / f"{mode}-args.json", workdir / f"{mode}-result.json"
    result_file.unlink(missing_ok=True)
    args_file.write_text(json.dumps({**payload, "mode": mode, "result_file": str(result_file)}))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    if engine_in_child:
        env.update(actor_env(job.engine))
    env.update(join or {})
    proc = subprocess.run([sys.executable, "-m", "pipelines.bench", str(args_file)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"bench side {mode!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return result(**json.loads(result_file.read_text()))


def write_result(args: dict[str, Any], figures: Any) -> None:
    """The child's side of `run_child`: its figures (a dataclass) to the file the parent named."""
    Path(args["result_file"]).write_text(json.dumps(dataclasses.asdict(figures)))


def median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def cpu_s(pid: int | str) -> float:
    """A process's CPU seconds (user and system), `self` for this one."""
    import psutil

    t = (psutil.Process() if pid == "self" else psutil.Process(int(pid))).cpu_times()
    return t.user + t.system
