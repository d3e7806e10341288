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
from pipelines.generate import actor_env
from pipelines.models import resolve_engine_paths
from pipelines.processor import prompt_kwargs
from pipelines.prompt import render_batch
from pipelines.read import plan_input


def bench_input(job: Job, rows: int, out_dir: Path, shards: int = 4) -> pa.Table:
    """The job's input rows repeated to `rows`, with fresh ids, written as `shards` Parquet files."""
    plan = plan_input(job.spec, job.spec.storage.resolved())
    import pyarrow.dataset as pads

    source = pads.dataset(plan.paths, filesystem=plan.filesystem, format="parquet").to_table(columns=plan.columns)
    if source.num_rows == 0:
        raise ValueError(f"{job.spec.input.path}: no rows to benchmark with")
    reps = -(-rows // source.num_rows)
    table = pa.concat_tables([source] * reps).slice(0, rows)
    id_col = job.spec.input.id_column
    table = table.set_column(table.schema.get_field_index(id_col), id_col, pa.array([f"b{i:07d}" for i in range(rows)]))
    out_dir.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    for k in range(shards):
        pq.write_table(table.slice(k * per, per), out_dir / f"part-{k:05d}.parquet")
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
    {"constrained": constrained_side, "calibrate": calibrate_side}.get(args.get("mode"), raw_side)(args)


def raw_side(args: dict) -> None:
    """Start the engine, generate everything in one call, print figures as JSON."""
    from pipelines.config.engine import EngineProfile
    from pipelines.config.job import SamplingSpec
    from pipelines.generate import generate_ids, make_llm, sampling_params

    profile = EngineProfile.model_validate(args["profile"])
    t0 = time.perf_counter()
    llm = make_llm(profile, args["model_path"], args["tokenizer_path"])
    start_s = time.perf_counter() - t0
    params = sampling_params(SamplingSpec.model_validate(args["sampling"]))
    t1 = time.perf_counter()
    outputs = generate_ids(llm, args["prompts"], params)
    steady_s = time.perf_counter() - t1
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("TOKENMILL_BENCH " + json.dumps(
        {"engine_start_s": start_s, "steady_s": steady_s, "requests": len(outputs), "output_tokens": tokens}
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
    from pipelines.generate import generate_ids, make_llm, sampling_params

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
    from pipelines.generate import generate_ids, make_llm

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
    from pipelines.observe import EngineStats, read_ledger
    from pipelines.runner import run_job
    from pipelines.storage import filesystem_for

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
    env = {**os.environ, **actor_env(job.engine)}
    proc = subprocess.run([sys.executable, "-m", "pipelines.bench", str(args_file)], env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENMILL_BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench child process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("TOKENMILL_BENCH "))


def run_raw(job: Job, prompts: list[list[int]], model_path: str, tokenizer_path: str, workdir: Path) -> dict:
    raw = run_child(job, workdir, {
        "profile": job.engine.model_dump(mode="json"),
        "sampling": job.spec.sampling.model_dump(mode="json"),
        "model_path": model_path,
        "tokenizer_path": tokenizer_path,
        "prompts": prompts,
    })
    raw["output_tokens_per_s"] = raw["output_tokens"] / raw["steady_s"]
    raw["requests_per_s"] = raw["requests"] / raw["steady_s"]
    return raw


def run_task_bench(job_path: Path, *, overrides: Sequence[str] = (), conf_dir: Path | None = None, rows: int = 256,
                   repeats: int = 2) -> dict[str, Any]:
    """Constrained against unconstrained decoding on the same `rows` prompts of a classify or extract job.

    One engine serves both sides, alternating `repeats` times, so they share the
    machine's state; the sampling is the job's, constraint aside.
    """
    from pipelines.generate import structured_outputs

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
    from pipelines.runner import run_job

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


def run_bench(job_path: Path, *, overrides: Sequence[str] = (), conf_dir: Path | None = None, rows: int = 512,
              max_tokens: int = 32) -> dict[str, Any]:
    """Run both sides on the same `rows` prompts; return the figures and their ratios."""
    from pipelines.runner import run_job

    fixed = [f"sampling.max_tokens={max_tokens}", "sampling.ignore_eos=true", "sampling.temperature=0"]
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=[*overrides, *fixed], conf_dir=conf_dir)
        table = bench_input(job, rows, workdir / "input")
        job = load_job(job_path, conf_dir=conf_dir, overrides=[
            *overrides, *fixed, f"input.path={workdir / 'input'}", f"output.path={workdir / 'output'}"])
        model_path, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        prompts = prompt_ids(job, table, tokenizer_path)

        raw = run_raw(job, prompts, model_path, tokenizer_path, workdir)
        summary = run_job(job, run_id="bench", progress=False)

    pipe_tokens = summary["completion_tokens"]
    pipeline = {
        "engine_start_s": summary["engine_start_s"],
        "wall_s": summary["wall_s"],
        "requests": summary["records_out"],
        "output_tokens": pipe_tokens,
        "output_tokens_per_s": summary["steady_output_tokens_per_s"],
        "requests_per_s": summary["records_out"] * summary["steady_output_tokens_per_s"] / pipe_tokens,
        "end_to_end_output_tokens_per_s": pipe_tokens / (summary["wall_s"] - summary["engine_start_s"]),
    }
    return {
        "job": job.spec.name,
        "engine": job.engine.name,
        "rows": rows,
        "max_tokens": max_tokens,
        "raw_vllm": raw,
        "pipeline": pipeline,
        "ratio_pipeline_to_raw": pipeline["output_tokens_per_s"] / raw["output_tokens_per_s"],
        "ratio_end_to_end_to_raw": pipeline["end_to_end_output_tokens_per_s"] / raw["output_tokens_per_s"],
    }


def format_bench(r: dict[str, Any]) -> str:
    raw, pipe = r["raw_vllm"], r["pipeline"]
    lines = [
        f"tokenmill bench: {r['job']} on {r['engine']}, {r['rows']} prompts x {r['max_tokens']} output tokens",
        f"  {'side':<22}{'engine start s':>16}{'output tok/s':>14}{'requests/s':>12}",
        f"  {'raw vllm.generate':<22}{raw['engine_start_s']:>16.1f}{raw['output_tokens_per_s']:>14.1f}"
        f"{raw['requests_per_s']:>12.2f}",
        f"  {'pipeline (steady)':<22}{pipe['engine_start_s']:>16.1f}{pipe['output_tokens_per_s']:>14.1f}"
        f"{pipe['requests_per_s']:>12.2f}",
        f"  {'pipeline (end to end)':<22}{'':>16}{pipe['end_to_end_output_tokens_per_s']:>14.1f}",
        f"  ratio pipeline/raw at steady state: {r['ratio_pipeline_to_raw']:.3f}",
        f"  ratio pipeline/raw end to end (start-up excluded): {r['ratio_end_to_end_to_raw']:.3f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    child_side(sys.argv[1])
