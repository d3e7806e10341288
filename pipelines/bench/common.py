"""`tokenmill bench`: the same prompts through raw `vllm.LLM.generate` and through the full pipeline.

Both sides generate exactly `max_tokens` tokens per prompt (`ignore_eos`), with
the same engine profile, token ids and sampling parameters, in one invocation.
The raw side runs first, in a child process started with the engine actors'
environment and before Ray is up, so it measures vLLM alone. Engine start-up is
reported apart from steady state on both sides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config.load import Job, load_job
from pipelines.models import resolve_engine_paths
from pipelines.stages.generate import actor_env, bind_cpu_threads, engine_dtype, vm_hwm_mb
from pipelines.stages.processor import prompt_kwargs
from pipelines.stages.prompt import prompt_fields, render_batch, task_instructions
from pipelines.stages.read import plan_input


def bench_input(job: Job, rows: int, out_dir: Path | None, shards: int = 4) -> pa.Table:
    """The job's input rows repeated to `rows`, with fresh ids, written as `shards` Parquet files (unless
    `out_dir` is None)."""
    plan = plan_input(job.spec, job.spec.storage.resolved())
    import pyarrow.dataset as pads

    source = pads.dataset(plan.paths, filesystem=plan.filesystem, format="parquet").to_table(columns=plan.columns)
    if source.num_rows == 0:
        raise ValueError(f"{job.spec.input.path}: no rows to benchmark with")
    reps = -(-rows // source.num_rows)
    table = pa.concat_tables([source] * reps).slice(0, rows)
    id_col = job.spec.input.id_column
    table = table.set_column(table.schema.get_field_index(id_col), id_col, pa.array([f"b{i:07d}" for i in range(rows)]))
    if out_dir is not None:
        _write_shards(table, out_dir, shards)
    return table


def prompt_ids(job: Job, table: pa.Table, tokenizer_path: str) -> list[list[int]]:
    """The same token ids the pipeline's prompt stage gives the engine."""
    rendered = render_batch(
        table, **prompt_kwargs(job, tokenizer_path=tokenizer_path, storage=job.spec.storage.resolved())
    )
    bad = [e for e in rendered.column("error").to_pylist() if e]
    if bad:
        raise ValueError(f"bench input has records the pipeline would reject: {bad[:3]}")
    return rendered.column("prompt_token_ids").to_pylist()


def child_side(args_file: str) -> None:
    """The child process: `raw` (the pipeline bench's raw side) or `constrained` (the task bench)."""
    args = json.loads(Path(args_file).read_text())
    sides = {"constrained": constrained_side, "calibrate": calibrate_side, "pipeline": pipeline_side,
             "ray_data_llm": ray_data_llm_side, "transformers": transformers_side}
    sides.get(args.get("mode"), raw_side)(args)


def raw_side(args: dict) -> None:
    """Start the engine, generate everything in one call, print figures as JSON."""
    from pipelines.config.engine import EngineProfile
    from pipelines.config.job import SamplingSpec
    from pipelines.stages.generate import generate_ids, make_llm, sampling_params

    profile = EngineProfile.model_validate(args["profile"])
    t0 = time.perf_counter()
    llm = make_llm(profile, args["model_path"], args["tokenizer_path"])
    start_s = time.perf_counter() - t0
    params = sampling_params(SamplingSpec.model_validate(args["sampling"]))
    t1 = time.perf_counter()
    outputs = generate_ids(llm, args["prompts"], params)
    steady_s = time.perf_counter() - t1
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    from pipelines.stages.generate import peak_memory_mb

    memory = peak_memory_mb()
    print("TOKENMILL_BENCH " + json.dumps(
        {"engine_start_s": start_s, "steady_s": steady_s, "requests": len(outputs), "output_tokens": tokens,
         "prompt_tokens": sum(len(p) for p in args["prompts"]),
         "driver_peak_rss_mb": memory["actor_peak_rss_mb"], "engine_peak_rss_mb": memory["engine_peak_rss_mb"]}
    ), flush=True)


def _is_answer(text: str, labels: set[str], schema: dict | None) -> bool:
    """Whether an output is a usable answer: one of the labels, or JSON that validates against the schema."""
    if schema is None:
        return text.strip() in labels
    from jsonschema import Draft202012Validator

    try:
        return Draft202012Validator(schema).is_valid(json.loads(text))
    except ValueError:
        return False


def constrained_side(args: dict) -> None:
    """One engine; the same prompts unconstrained and constrained, alternating, `repeats` times each."""
    from pipelines.config.engine import EngineProfile
    from pipelines.config.job import SamplingSpec
    from pipelines.stages.generate import generate_ids, make_llm, sampling_params

    profile = EngineProfile.model_validate(args["profile"])
    t0 = time.perf_counter()
    # Without prefix caching every pass pays the same prefill, whichever ran first.
    llm = make_llm(profile, args["model_path"], args["tokenizer_path"], enable_prefix_caching=False)
    start_s = time.perf_counter() - t0
    spec = SamplingSpec.model_validate(args["sampling"])
    params = {"unconstrained": sampling_params(spec), "constrained": sampling_params(spec, structured=args["structured"])}
    prompts = args["prompts"]
    generate_ids(llm, prompts[:8], params["constrained"])  # warm-up: compiles the grammar once
    figures = {side: {"seconds": 0.0, "requests": 0, "output_tokens": 0, "valid": 0} for side in params}
    labels, schema = set(args.get("labels") or []), args.get("schema")
    for _ in range(args["repeats"]):
        for side, p in params.items():
            t1 = time.perf_counter()
            outputs = generate_ids(llm, prompts, p)
            f = figures[side]
            f["seconds"] += time.perf_counter() - t1
            f["requests"] += len(outputs)
            f["output_tokens"] += sum(len(o.outputs[0].token_ids) for o in outputs)
            f["valid"] += sum(_is_answer(o.outputs[0].text, labels, schema) for o in outputs)
    print("TOKENMILL_BENCH " + json.dumps({"engine_start_s": start_s, **figures}), flush=True)


def calibrate_side(args: dict) -> None:
    """Start-up, then timed passes in one engine: the job's prompts with one output token (prefill), the same
    again (what re-reading them costs), the same with `decode_tokens` output tokens each (decode), and a pair
    over long prompts, cold then warm, that the prefix cache must serve (the weight of a cached token)."""
    from vllm import SamplingParams

    from pipelines.config.engine import EngineProfile
    from pipelines.stages.generate import generate_ids, make_llm

    profile = EngineProfile.model_validate(args["profile"])
    t0 = time.perf_counter()
    llm = make_llm(profile, args["model_path"], args["tokenizer_path"], enable_prefix_caching=True)
    start_s = time.perf_counter() - t0
    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompts = args["prompts"]
    # Two whole blocks from cache and a short uncached tail, for each of 64 distinct long prompts.
    long = [(p * (2 * block // max(1, len(p)) + 2))[: 2 * block + 16] for p in prompts[:64]]
    one = SamplingParams(max_tokens=1, temperature=0)
    many = SamplingParams(max_tokens=args["decode_tokens"], ignore_eos=True, temperature=0)
    generate_ids(llm, [[1, 2, 3]] * 4, one)  # warm-up on a prompt none of the others share
    passes: dict[str, dict] = {}
    # Each series twice, on prompts made distinct from the other round's (a new first token), and the faster
    # round kept: a busy machine only ever adds time.
    for r in range(2):
        mine = [[900 + r, *p[1:]] for p in prompts]
        cold = [[1000 + 100 * r + k, *p[1:]] for k, p in enumerate(long)]
        for name, batch, params in (("prefill", mine, one), ("again", mine, one), ("decode", mine, many),
                                    ("cold", cold, one), ("warm", cold, one)):
            t1 = time.perf_counter()
            outputs = generate_ids(llm, batch, params)
            seconds = time.perf_counter() - t1
            if name not in passes or seconds < passes[name]["seconds"]:
                passes[name] = {"seconds": seconds, "prompt_tokens": sum(len(p) for p in batch),
                                "cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
                                "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}
    print("TOKENMILL_BENCH " + json.dumps({"engine_start_s": start_s, "block_size": block, **passes}), flush=True)


def run_calibration(job_path: Path, *, overrides: Sequence[str] = (), conf_dir: Path | None = None,
                    rows: int = 256, decode_tokens: int = 32) -> dict[str, Any]:
    """Measure the job's engine profile for its `cost:` section: engine start-up, work units per second (uncached
    prompt tokens), and the engine time of a cached prompt token and of an output token in those units.

    The engine runs in a child process, as in the raw side of `run_bench`, on the
    job's own prompts (`rows` of them, repeated from the input as needed).
    """
    import datetime as dt
    import platform

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=overrides, conf_dir=conf_dir)
        table = bench_input(job, rows, workdir / "input")
        model_path, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        prompts = prompt_ids(job, table, tokenizer_path)
        f = run_child(job, workdir, {
            "mode": "calibrate", "profile": job.engine.model_dump(mode="json"), "model_path": model_path,
            "tokenizer_path": tokenizer_path, "prompts": prompts, "decode_tokens": decode_tokens})
    prompt_tokens = sum(len(p) for p in prompts)
    prefill, again, decode, cold, warm = (f[k] for k in ("prefill", "again", "decode", "cold", "warm"))
    work_per_s = prompt_tokens / prefill["seconds"]
    # The decode pass reads its prompts again first, as the `again` pass did: the rest is decoding.
    decode_s = max(decode["seconds"] - again["seconds"], 1e-9)
    decode_weight = work_per_s * decode_s / (decode["output_tokens"] - again["output_tokens"])
    # The warm pass computes the uncached tails afresh; the rest of its time is what the cached tokens cost.
    cold_rate = cold["prompt_tokens"] / cold["seconds"]
    tails = warm["prompt_tokens"] - warm["cached_tokens"]
    cached_weight = (max(0.0, warm["seconds"] * cold_rate - tails) / warm["cached_tokens"]
                     if warm["cached_tokens"] else None)
    # The pipeline, on the same prompts: what a replica is billed beyond its busy time, and its work rate
    # there, where the other stages share the machine with the engine.
    pipe = _pipeline_run(job_path, overrides, conf_dir, rows)
    work = ((pipe["prompt_tokens"] - pipe["cached_prompt_tokens"]) + pipe["cached_prompt_tokens"] * (cached_weight or 0)
            + pipe["completion_tokens"] * decode_weight)
    cores = os.cpu_count()
    return {
        "pipeline": pipe,
        "startup_s": pipe["replica_s"] - pipe["busy_s"],
        "pipeline_work_per_s": work / pipe["busy_s"],
        "job": job.spec.name,
        "engine": job.engine.name,
        "rows": rows,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "passes": f,
        "engine_start_s": f["engine_start_s"],
        "block_size": f["block_size"],
        "work_per_s": work_per_s,
        "cached_weight": cached_weight,
        "decode_weight": decode_weight,
        "measured": f"tokenmill bench --calibrate, {rows} prompts of {job.spec.name}, {platform.machine()} "
                    f"with {cores} cores, {dt.date.today().isoformat()}",
    }


def _pipeline_run(job_path: Path, overrides: Sequence[str], conf_dir: Path | None, rows: int) -> dict[str, Any]:
    """A pipeline run of `rows` of the job's records: its token totals and its replicas' billed and busy time."""
    from pipelines.io.storage import filesystem_for
    from pipelines.run.ledger import EngineStats, read_ledger
    from pipelines.run.runner import run_job

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=overrides, conf_dir=conf_dir)
        bench_input(job, rows, workdir / "input")
        job = load_job(job_path, conf_dir=conf_dir, overrides=[
            *overrides, f"input.path={workdir / 'input'}", f"output.path={workdir / 'output'}"])
        summary = run_job(job, run_id="calibrate", progress=False)
        fs, root = filesystem_for(str(workdir / "output" / "calibrate"), job.spec.storage.resolved())
        engine = EngineStats.from_ledger(read_ledger(fs, root))
    return {"records": summary["records_out"], "prompt_tokens": summary["prompt_tokens"],
            "cached_prompt_tokens": summary["cached_prompt_tokens"], "completion_tokens": summary["completion_tokens"],
            "replicas": engine.replicas, "replica_s": engine.replica_s, "busy_s": engine.busy_s,
            "engine_start_s": max(engine.engine_start_s or [0.0])}


def format_calibration(r: dict[str, Any]) -> str:
    p = r["passes"]
    return "\n".join([
        f"tokenmill bench --calibrate: {r['engine']} on {r['rows']} prompts of {r['job']} "
        f"({r['prompt_tokens']:,} prompt tokens)",
        f"  engine start                 {r['engine_start_s']:.1f} s",
        f"  prefill (engine alone)       {p['prefill']['seconds']:.2f} s -> {r['work_per_s']:,.0f} prompt tokens/s "
        f"(KV block {r['block_size']} tokens; {p['again']['cached_tokens']:,} served from cache on a second read)",
        f"  {r['decode_tokens']} output tokens each      {p['decode']['seconds']:.2f} s -> decode_weight "
        f"{r['decode_weight']:.2f}",
        f"  long prompts cold / warm     {p['cold']['seconds']:.2f} s / {p['warm']['seconds']:.2f} s "
        f"({p['warm']['cached_tokens']:,} tokens from cache) -> cached_weight "
        + (f"{r['cached_weight']:.3f}" if r["cached_weight"] is not None else "not measured"),
        f"  pipeline run, {r['pipeline']['records']} records   {r['pipeline']['replica_s']:.1f} replica-s, "
        f"{r['pipeline']['busy_s']:.1f} s busy (engine start {r['pipeline']['engine_start_s']:.1f} s) -> "
        f"startup_s {r['startup_s']:.1f}, work_per_s {r['pipeline_work_per_s']:,.0f}",
        "  for the engine profile's cost: section:",
        f"    decode_weight: {r['decode_weight']:.2f}",
        f"    cached_weight: {r['cached_weight']:.3f}" if r["cached_weight"] is not None else
        "    cached_weight: (not measured: the engine served no prompt token from its cache)",
        "    throughput:",
        f"      startup_s: {r['startup_s']:.1f}",
        f"      work_per_s: {r['pipeline_work_per_s']:.0f}",
        f"      measured: {r['measured']}",
    ])


def run_child(job: Job, workdir: Path, payload: dict) -> dict:
    """Run a bench side in a child process with the engine actors' environment; its figures as a dict."""
    args_file = workdir / "child-args.json"
    args_file.write_text(json.dumps(payload))
    env = dict(os.environ)
    if payload.get("mode") not in ("pipeline", "ray_data_llm"):
        # The engine runs in the child itself. A Ray driver must not have it: its cluster's processes would
        # inherit it (preloaded OpenMP pinned the engine actor to one core); Ray's engine actors get it
        # through their runtime_env.
        env.update(actor_env(job.engine))
    import ray

    if ray.is_initialized() and payload.get("mode") == "pipeline":
        # Join the caller's cluster (the tests share one) rather than start a second.
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "pipelines.bench", str(args_file)], env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENMILL_BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench child process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("TOKENMILL_BENCH "))


def run_task_bench(job_path: Path, *, overrides: Sequence[str] = (), conf_dir: Path | None = None, rows: int = 256,
                   repeats: int = 2) -> dict[str, Any]:
    """Constrained against unconstrained decoding on the same `rows` prompts of a classify or extract job.

    One engine serves both sides, alternating `repeats` times, so they share the
    machine's state; the sampling is the job's, constraint aside.
    """
    from pipelines.stages.generate import structured_outputs

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=overrides, conf_dir=conf_dir)
        if job.spec.task == "generate":
            raise ValueError(f"{job_path}: task is generate; --task bench needs a classify or extract job")
        table = bench_input(job, rows, workdir / "input")
        model_path, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        figures = run_child(job, workdir, {
            "mode": "constrained",
            "profile": job.engine.model_dump(mode="json"),
            "sampling": job.spec.sampling.model_dump(mode="json"),
            "structured": structured_outputs(job.spec),
            "labels": job.spec.classify.names if job.spec.classify else None,
            "schema": job.spec.extract.schema_dict if job.spec.extract else None,
            "model_path": model_path,
            "tokenizer_path": tokenizer_path,
            "prompts": prompt_ids(job, table, tokenizer_path),
            "repeats": repeats,
        })
    for side in ("unconstrained", "constrained"):
        f = figures[side]
        f["requests_per_s"] = f["requests"] / f["seconds"]
        f["output_tokens_per_s"] = f["output_tokens"] / f["seconds"]
        f["output_tokens_per_request"] = f["output_tokens"] / f["requests"]
        f["valid_share"] = f["valid"] / f["requests"]
    u, c = figures["unconstrained"], figures["constrained"]
    return {
        "job": job.spec.name,
        "task": job.spec.task,
        "engine": job.engine.name,
        "rows": rows,
        "repeats": repeats,
        "max_tokens": job.spec.sampling.max_tokens,
        "engine_start_s": figures["engine_start_s"],
        "unconstrained": u,
        "constrained": c,
        "ratio_requests_per_s": c["requests_per_s"] / u["requests_per_s"],
        "ratio_output_tokens_per_s": c["output_tokens_per_s"] / u["output_tokens_per_s"],
    }


def run_resume_bench(job_path: Path, *, overrides: Sequence[str] = (), conf_dir: Path | None = None,
                     rows: int = 128) -> dict[str, Any]:
    """A run, then the same run again: resuming a finished run must do no engine work and take little time."""
    from pipelines.run.runner import run_job

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=overrides, conf_dir=conf_dir)
        bench_input(job, rows, workdir / "input")
        job = load_job(job_path, conf_dir=conf_dir, overrides=[
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
        "first_run_engine_replicas": first["engine_replicas"],
        "first_run_output_tokens": first["completion_tokens"],
        "resume_s": again_s,
        "resume_shards_redone": again["shards_redone"],
        "ratio_resume_to_first": again_s / first_s,
    }


def distinct_input(job: Job, rows: int, out_dir: Path, *, tag: str, shards: int = 4) -> pa.Table:
    """`rows` records with distinct prompts: the job's input repeated, each record's last prompt column marked
    with its own reference, ids `<tag>0000000`..."""
    import pyarrow.compute as pc

    table = bench_input(job, rows, None)
    column = job.spec.prompt_columns[-1]
    refs = pa.array([f" (ref {tag}{i})" for i in range(rows)])
    table = table.set_column(table.schema.get_field_index(column), column,
                             pc.binary_join_element_wise(pc.cast(table.column(column), pa.string()), refs, ""))
    id_col = job.spec.input.id_column
    table = table.set_column(table.schema.get_field_index(id_col), id_col,
                             pa.array([f"{tag}{i:07d}" for i in range(rows)]))
    _write_shards(table, out_dir, shards)
    return table


def _write_shards(table: pa.Table, out_dir: Path, shards: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    per = -(-table.num_rows // shards)
    for k in range(shards):
        pq.write_table(table.slice(k * per, per), out_dir / f"part-{k:05d}.parquet")


# Result columns that differ between a generated answer and the same answer from the cache.
CACHE_DIFFERS = {"cached", "cost_usd", "compute_usd", "overhead_usd", "work_units", "run_id"}


def run_cache_bench(job_path: Path, *, overrides: Sequence[str] = (), conf_dir: Path | None = None,
                    rows: int = 512, max_tokens: int = 32) -> dict[str, Any]:
    """Two runs with a response cache: `rows` distinct prompts, then `rows` of which half repeat the first
    run's. Compares their throughput and checks the repeated records' results are the first run's."""
    import polars as pl

    from pipelines.run.runner import run_job

    fixed = [f"sampling.max_tokens={max_tokens}", "sampling.ignore_eos=true", "sampling.temperature=0"]
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=[*overrides, *fixed], conf_dir=conf_dir)
        first_in = distinct_input(job, rows, workdir / "in1", tag="a")
        second_in = pa.concat_tables([first_in.slice(0, rows // 2),
                                      distinct_input(job, rows - rows // 2, workdir / "new", tag="b")])
        _write_shards(second_in, workdir / "in2", 4)
        runs = {}
        for name, folder in (("first", "in1"), ("second", "in2")):
            job = load_job(job_path, conf_dir=conf_dir, overrides=[
                *overrides, *fixed, f"input.path={workdir / folder}", f"output.path={workdir / 'out'}",
                f"cache.path={workdir / 'cache'}"])
            summary = run_job(job, run_id=f"bench-cache-{name}", progress=False)
            results = pl.concat([pl.read_parquet(f) for f in summary["output"]["results"]])
            runs[name] = {"summary": summary, "results": results}
    id_col = job.spec.input.id_column
    first, second = runs["first"]["results"], runs["second"]["results"]
    repeated = second.filter(pl.col(id_col).str.starts_with("a"))
    same_cols = [c for c in first.columns if c not in CACHE_DIFFERS]
    joined = repeated.select(same_cols).sort(id_col).equals(
        first.filter(pl.col(id_col).is_in(repeated[id_col].implode())).select(same_cols).sort(id_col))
    out: dict[str, Any] = {"job": job.spec.name, "engine": job.engine.name, "rows": rows, "max_tokens": max_tokens}
    for name, run in runs.items():
        s = run["summary"]
        busy = s["wall_s"] - (s["engine_start_s"] or 0)
        out[name] = {"wall_s": s["wall_s"], "engine_start_s": s["engine_start_s"], "records": s["records_out"],
                     "records_cached": (s["cache"] or {}).get("records", 0),
                     "saved_usd": (s["cache"] or {}).get("saved_usd"), "cost_usd": s["cost"]["total_usd"],
                     "records_per_s": s["records_out"] / busy, "records_per_s_with_startup": s["records_out"] / s["wall_s"]}
    out["repeated_records"] = repeated.height
    out["repeated_cached"] = int(repeated["cached"].sum())
    out["repeated_identical_except_cached"] = bool(joined)
    out["ratio_records_per_s"] = out["second"]["records_per_s"] / out["first"]["records_per_s"]
    out["ratio_with_startup"] = out["second"]["records_per_s_with_startup"] / out["first"]["records_per_s_with_startup"]
    return out


def format_cache_bench(r: dict[str, Any]) -> str:
    lines = [f"tokenmill bench --cache: {r['job']} on {r['engine']}, {r['rows']} records per run, "
             f"{r['max_tokens']} output tokens each (ignore_eos); the second run repeats half of the first's",
             f"  {'run':<8}{'records':>9}{'cached':>8}{'wall s':>8}{'start s':>9}{'records/s':>11}"
             f"{'with start':>12}{'cost $':>11}{'saved $':>11}"]
    for name in ("first", "second"):
        f = r[name]
        lines.append(f"  {name:<8}{f['records']:>9}{f['records_cached']:>8}{f['wall_s']:>8.1f}"
                     f"{(f['engine_start_s'] or 0):>9.1f}{f['records_per_s']:>11.2f}"
                     f"{f['records_per_s_with_startup']:>12.2f}{f['cost_usd']:>11.6f}"
                     f"{(f['saved_usd'] or 0):>11.6f}")
    lines += [
        f"  repeated records: {r['repeated_records']}, answered from the cache: {r['repeated_cached']}, "
        f"results identical to the first run's except `cached` and cost: {r['repeated_identical_except_cached']}",
        f"  ratio second/first run, records/s after engine start: {r['ratio_records_per_s']:.3f}",
        f"  ratio second/first run, records/s with start-up: {r['ratio_with_startup']:.3f}",
    ]
    return "\n".join(lines)


def format_resume_bench(r: dict[str, Any]) -> str:
    return "\n".join([
        f"tokenmill bench --resume: {r['job']} on {r['engine']}, {r['rows']} records",
        f"  first run: {r['first_run_s']:.1f} s, {r['first_run_engine_replicas']} engine replica(s), "
        f"{r['first_run_output_tokens']:,} output tokens",
        f"  resume of the finished run: {r['resume_s']:.2f} s, {r['resume_shards_redone']} shards redone, "
        "no engine started",
        f"  ratio resume/first run: {r['ratio_resume_to_first']:.4f}",
    ])


def format_task_bench(r: dict[str, Any]) -> str:
    lines = [
        f"tokenmill bench --task {r['task']}: {r['job']} on {r['engine']}, {r['rows']} prompts x {r['repeats']} "
        f"passes per side, max_tokens {r['max_tokens']}",
        f"  {'decoding':<16}{'requests/s':>12}{'output tok/s':>14}{'tokens/request':>16}"
        + f"{'usable answers':>16}",
    ]
    for side in ("unconstrained", "constrained"):
        f = r[side]
        lines.append(f"  {side:<16}{f['requests_per_s']:>12.2f}{f['output_tokens_per_s']:>14.1f}"
                     f"{f['output_tokens_per_request']:>16.2f}"
                     + f"{f['valid_share']:>16.1%}")
    lines += [
        f"  ratio constrained/unconstrained, requests/s: {r['ratio_requests_per_s']:.3f}",
        f"  ratio constrained/unconstrained, output tokens/s: {r['ratio_output_tokens_per_s']:.3f}",
    ]
    return "\n".join(lines)


SIDES = ("raw", "pipeline", "ray_data_llm", "transformers")
SIDE_NAMES = {"raw": "raw vllm.generate", "pipeline": "tokenmill pipeline", "ray_data_llm": "ray.data.llm",
              "transformers": "transformers generate"}


def pipeline_side(args: dict) -> None:
    """The tokenmill pipeline, Parquet to Parquet, in a process of its own so its peak memory is its own."""
    from pipelines.io.storage import filesystem_for, join
    from pipelines.run.ledger import read_ledger
    from pipelines.run.runner import run_job

    job = load_job(Path(args["job"]), overrides=args["overrides"], conf_dir=args.get("conf_dir") and Path(args["conf_dir"]),
                   engine_overrides=args.get("engine_overrides", ()))
    cpu0 = _cpu_s("self")
    summary = run_job(job, run_id=args["run_id"], progress=False)
    daemons = _ray_daemons_cpu_s()
    fs, root = filesystem_for(job.spec.output.path, job.spec.storage.resolved())
    ledger = read_ledger(fs, join(root, args["run_id"]))
    print("TOKENMILL_BENCH " + json.dumps({
        "engine_start_s": summary["engine_start_s"], "wall_s": summary["wall_s"],
        "requests": summary["records_out"], "output_tokens": summary["completion_tokens"],
        "prompt_tokens": summary["prompt_tokens"],
        "steady_output_tokens_per_s": summary["steady_output_tokens_per_s"],
        "steady_s": summary["completion_tokens"] / summary["steady_output_tokens_per_s"],
        "driver_peak_rss_mb": round(vm_hwm_mb("self"), 1),
        "driver_cpu_s": round(_cpu_s("self") - cpu0, 2),
        "ray_daemons_cpu_s": daemons,
        "actor_peak_rss_mb": max((e.get("actor_peak_rss_mb") or 0) for e in ledger),
        "engine_peak_rss_mb": max((e.get("engine_peak_rss_mb") or 0) for e in ledger),
        "engine_idle_s": sum(e.get("engine_idle_s") or 0 for e in ledger),
        "actor_cpu_s": sum(e.get("actor_cpu_s") or 0 for e in ledger),
        "batches": sum(e["batches"] for e in ledger),
    }), flush=True)


def ray_data_llm_side(args: dict) -> None:
    """Ray's own batch processor (`ray.data.llm`) doing the pipeline's job with the same engine settings.

    It reads the same Parquet shards, builds the same chat messages in its
    `preprocess`, and lets its own stages apply the chat template, tokenize and
    detokenize (each a one-actor pool, Ray's default), then writes Parquet, as
    a user of Ray's processor would. The prompt tokens it sent are reported so
    the bench can check both sides asked the engine the same thing.

    On CPU it needs a placement group of one CPU bundle (else it waits for a
    GPU), more CPUs declared than a 2-core machine has (its stages ask for
    more), and no engine metrics (they need `ray[serve]`).
    """
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from pipelines.config.engine import EngineProfile
    from pipelines.stages.prompt import build_messages

    profile = EngineProfile.model_validate(args["profile"])
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    stage = {"model_source": args["tokenizer_path"]}
    env = dict(args["env"])
    if profile.device == "cpu":
        # Ray caps an actor's OMP_NUM_THREADS at its CPUs (one bundle CPU here), which would leave the engine
        # one core; the pipeline's actor binds every core, so this side does too.
        bind_cpu_threads(env)
    config = vLLMEngineProcessorConfig(
        model_source=args["model_path"],
        engine_kwargs={"tokenizer": args["tokenizer_path"], **profile.engine_args.to_vllm_kwargs()},
        runtime_env={"env_vars": env},
        batch_size=args["batch_size"],
        concurrency=1,
        placement_group_config={"bundles": [{"CPU": 1}]} if profile.device == "cpu" else None,
        log_engine_metrics=False,
        chat_template_stage=stage,
        tokenize_stage=stage,
        detokenize_stage=stage,
    )
    system, user, instructions = args["system"], args["user"], args["instructions"]
    sampling = {"max_tokens": args["max_tokens"], "ignore_eos": True, "temperature": 0.0}
    processor = build_processor(
        config,
        preprocess=lambda row: {"messages": build_messages(row, system, user, instructions=instructions),
                                "sampling_params": sampling},
        postprocess=lambda row: {"n": row["num_generated_tokens"], "p": row["num_input_tokens"],
                                 "text": row["generated_text"]},
    )
    out = str(Path(args["output"]))
    processor(ray.data.read_parquet(args["input"], columns=args["columns"])).write_parquet(out)
    wall = time.perf_counter() - t0
    rows = pq.read_table(out, columns=["n", "p"]).to_pydict()
    # No steady-state figure: from outside the processor nothing says when its engine became ready, and its
    # rows reach postprocess in lumps, so a window from their timestamps comes out too short (it once gave
    # this side 1.4x the raw engine's rate). It is compared wall to wall, start-up counted, as a user sees it.
    print("TOKENMILL_BENCH " + json.dumps({
        "wall_s": wall, "steady_s": None, "engine_start_s": None, "requests": len(rows["n"]),
        "output_tokens": sum(rows["n"]), "prompt_tokens": sum(rows["p"]),
        "driver_peak_rss_mb": round(vm_hwm_mb("self"), 1),
    }), flush=True)


def transformers_side(args: dict) -> None:
    """Plain transformers `generate`, batched with left padding, greedy, exactly `max_tokens` tokens each."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.config.engine import EngineProfile

    profile = EngineProfile.model_validate(args["profile"])
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(profile.engine_args.dtype), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args["model_path"], torch_dtype=dtype).eval()
    start_s = time.perf_counter() - t0
    prompts, batch_size, n = args["prompts"], args["batch_size"], args["max_tokens"]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    tokens = 0
    t1 = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(prompts), batch_size):
            chunk = prompts[k:k + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
            tokens += (out.shape[1] - width) * len(chunk)
    steady_s = time.perf_counter() - t1
    print("TOKENMILL_BENCH " + json.dumps({
        "engine_start_s": start_s, "steady_s": steady_s, "requests": len(prompts), "output_tokens": tokens,
        "driver_peak_rss_mb": round(vm_hwm_mb("self"), 1),
    }), flush=True)


def _cpu_s(pid: int | str) -> float:
    import psutil

    t = (psutil.Process() if pid == "self" else psutil.Process(int(pid))).cpu_times()
    return t.user + t.system


def _ray_daemons_cpu_s() -> dict[str, float]:
    """CPU seconds of the local Ray cluster's own processes still alive at the end: its daemons, and its
    workers by title (Ray Data's helper actors; the engine actor is gone by then)."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            argv = proc.cmdline()
            program = " ".join(argv[:3])
            name = next((d for d in ("gcs_server", "raylet", "dashboard/agent.py", "runtime_env/agent",
                                     "log_monitor", "monitor.py") if d in program), None)
            if name is None and argv and argv[0].startswith("ray::"):
                name = argv[0].split("(")[0]  # a worker by its title: Ray Data's helper actors, idle workers
            if name:
                t = proc.cpu_times()
                out[name.split("/")[0]] = round(out.get(name.split("/")[0], 0.0) + t.user + t.system, 2)
        except psutil.Error:
            continue
    return out


def _rates(f: dict) -> dict:
    """Tokens/s and requests/s at steady state, and with start-up counted where the side has one."""
    steady = f["steady_s"]
    f["output_tokens_per_s"] = f["output_tokens"] / steady if steady else None
    f["requests_per_s"] = f["requests"] / steady if steady else None
    total = f.get("wall_s") or ((f.get("engine_start_s") or 0) + steady)
    f["with_startup_s"] = total
    f["with_startup_output_tokens_per_s"] = f["output_tokens"] / total
    return f


def _median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def run_bench(job_path: Path, *, overrides: Sequence[str] = (), conf_dir: Path | None = None, rows: int = 512,
              max_tokens: int = 32, runs: int = 1, sides: Sequence[str] = SIDES,
              transformers_rows: int = 256, engine_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Every side on the same `rows` prompts, `runs` times, the sides in turn within each run; each side in a
    process of its own. Returns per-run figures, their ratios and the ratios' medians."""
    unknown = set(sides) - set(SIDES)
    if unknown or not sides:
        raise ValueError(f"--sides: choose from {', '.join(SIDES)}")
    fixed = [f"sampling.max_tokens={max_tokens}", "sampling.ignore_eos=true", "sampling.temperature=0"]
    runs_out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=[*overrides, *fixed], conf_dir=conf_dir, engine_overrides=engine_overrides)
        table = bench_input(job, rows, workdir / "input")
        pipe_overrides = [*overrides, *fixed, f"input.path={workdir / 'input'}", f"output.path={workdir / 'output'}"]
        job = load_job(job_path, conf_dir=conf_dir, overrides=pipe_overrides, engine_overrides=engine_overrides)
        model_path, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        prompts = prompt_ids(job, table, tokenizer_path)
        del table
        # ray.data.llm builds the same messages from the same shards in its own preprocess.
        prompt_text = {"system": job.spec.prompt.system, "user": job.spec.prompt.user,
                       "instructions": task_instructions(job.spec)}
        prompt_columns = prompt_fields(prompt_text["system"], prompt_text["user"])
        common = {"profile": job.engine.model_dump(mode="json"), "model_path": model_path,
                  "tokenizer_path": tokenizer_path, "max_tokens": max_tokens}
        batch_size = job.spec.batch_size or job.engine.engine_args.max_num_seqs
        for r in range(runs):
            figures: dict[str, dict] = {}
            for side in [s for s in SIDES if s in sides]:
                if side == "raw":
                    payload = {**common, "sampling": job.spec.sampling.model_dump(mode="json"), "prompts": prompts}
                elif side == "pipeline":
                    payload = {"mode": "pipeline", "job": str(job_path), "overrides": pipe_overrides,
                               "engine_overrides": list(engine_overrides),
                               "conf_dir": str(conf_dir) if conf_dir else None, "run_id": f"bench-{r}"}
                elif side == "ray_data_llm":
                    payload = {**common, "mode": "ray_data_llm", "input": str(workdir / "input"),
                               "output": str(workdir / f"ray-data-llm-{r}"), "columns": prompt_columns,
                               "batch_size": batch_size, "env": actor_env(job.engine), **prompt_text}
                else:
                    payload = {**common, "mode": "transformers", "prompts": prompts[:transformers_rows],
                               "batch_size": 64}
                figures[side] = _rates(run_child(job, workdir, payload))
            runs_out.append({"sides": figures, **_ratios(figures)})
    ratio_keys = [k for k in runs_out[0] if k.startswith("ratio_")]
    return {
        "job": job.spec.name,
        "engine": job.engine.name,
        "dtype": engine_dtype(job.engine),  # this machine's choice where the profile says auto
        "rows": rows,
        "max_tokens": max_tokens,
        "runs": runs_out,
        "transformers_rows": min(rows, transformers_rows) if "transformers" in sides else None,
        "median": {k: _median([run[k] for run in runs_out]) for k in ratio_keys},
        "median_output_tokens_per_s": {
            side: _median([run["sides"][side]["output_tokens_per_s"] for run in runs_out])
            for side in runs_out[0]["sides"] if runs_out[0]["sides"][side]["output_tokens_per_s"] is not None},
        # The last run's figures at the top level, as before.
        **({"raw_vllm": runs_out[-1]["sides"]["raw"]} if "raw" in sides else {}),
        **({"pipeline": runs_out[-1]["sides"]["pipeline"]} if "pipeline" in sides else {}),
        **{k: runs_out[-1][k] for k in ratio_keys},
    }


def _ratios(f: dict[str, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "raw" not in f:
        return out
    raw = f["raw"]
    if "pipeline" in f:
        out["ratio_pipeline_to_raw"] = f["pipeline"]["output_tokens_per_s"] / raw["output_tokens_per_s"]
        out["ratio_with_startup_pipeline_to_raw"] = (f["pipeline"]["with_startup_output_tokens_per_s"]
                                                     / raw["with_startup_output_tokens_per_s"])
        if "ray_data_llm" in f:
            out["ratio_with_startup_pipeline_to_ray_data_llm"] = (
                f["pipeline"]["with_startup_output_tokens_per_s"]
                / f["ray_data_llm"]["with_startup_output_tokens_per_s"])
    if "ray_data_llm" in f:
        out["ratio_with_startup_ray_data_llm_to_raw"] = (f["ray_data_llm"]["with_startup_output_tokens_per_s"]
                                                         / raw["with_startup_output_tokens_per_s"])
    if "transformers" in f:
        out["ratio_transformers_to_raw"] = f["transformers"]["output_tokens_per_s"] / raw["output_tokens_per_s"]
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mb(value) -> str:
    return f"{value:,.0f}" if value else "-"


def format_bench(r: dict[str, Any]) -> str:
    lines = [f"tokenmill bench: {r['job']} on {r['engine']} ({r['dtype']}), {r['rows']} prompts x {r['max_tokens']} output tokens "
             f"(ignore_eos), {len(r['runs'])} run(s), the sides in turn within each run"]
    for k, run in enumerate(r["runs"], 1):
        lines.append(f"run {k}:")
        lines.append(f"  {'side':<24}{'start s':>8}{'steady s':>9}{'tok/s':>8}{'req/s':>7}{'with start tok/s':>17}"
                     f"{'driver MB':>10}{'actor MB':>9}{'engine MB':>10}")
        for side, f in run["sides"].items():
            start = f.get("engine_start_s")
            lines.append(
                f"  {SIDE_NAMES[side]:<24}{(f'{start:.1f}' if start else '-'):>8}{_fmt(f['steady_s'], '.1f'):>9}"
                f"{_fmt(f['output_tokens_per_s'], '.1f'):>8}{_fmt(f['requests_per_s'], '.2f'):>7}"
                f"{f['with_startup_output_tokens_per_s']:>17.1f}{_mb(f.get('driver_peak_rss_mb')):>10}"
                f"{_mb(f.get('actor_peak_rss_mb')):>9}{_mb(f.get('engine_peak_rss_mb')):>10}")
        sent = {f.get("prompt_tokens") for f in run["sides"].values() if f.get("prompt_tokens") is not None}
        if len(sent) > 1:
            lines.append("  WARNING: the sides sent the engine different prompt tokens: " + ", ".join(
                f"{SIDE_NAMES[s]} {f['prompt_tokens']:,}" for s, f in run["sides"].items() if f.get("prompt_tokens")))
        if "pipeline" in run["sides"]:
            p = run["sides"]["pipeline"]
            daemons = ", ".join(f"{k} {v:.1f}" for k, v in sorted(p["ray_daemons_cpu_s"].items()))
            lines.append(f"  pipeline profile: {p['batches']} batches, engine idle between batches "
                         f"{p['engine_idle_s']:.1f} s; CPU s over {p['wall_s']:.0f} s: driver {p['driver_cpu_s']:.1f}, "
                         f"engine actor (not the engine) {p['actor_cpu_s']:.1f}; "
                         f"Ray's own processes: {daemons or '-'}")
    if r.get("transformers_rows"):
        lines.append(f"  (transformers runs the first {r['transformers_rows']} prompts: its rate, not its total)")
    lines.append(f"median of {len(r['runs'])} run(s):")
    for k, v in r["median"].items():
        lines.append(f"  {k.removeprefix('ratio_').replace('_to_', '/').replace('_', ' ')}: {v:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    child_side(sys.argv[1])
