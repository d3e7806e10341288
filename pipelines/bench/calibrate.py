"""`tokenmill bench calibrate`: an engine profile's `cost:` figures, measured on this machine, and the job's
`plan:` figure (what its model writes per record).

Engine start-up; the prefill rate (work units, i.e. uncached prompt tokens, per
second); the engine time of an output token and of a prompt token served from
the prefix cache, in work units; and, from a pipeline run, a replica's time
beyond its busy time and its work rate where the other stages share the machine.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from pipelines.bench.common import bench_input, prompt_ids, run_child, write_result
from pipelines.config.load import load_job
from pipelines.models import resolve_engine_paths
from pipelines.stages.engine import engine_dtype, this_machine


@dataclasses.dataclass
class Pass:
    seconds: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


@dataclasses.dataclass
class CalibrationPasses:
    engine_start_s: float
    block_size: int
    prefill: Pass
    again: Pass
    decode: Pass
    cold: Pass
    warm: Pass

    def __post_init__(self) -> None:  # read back from the child's JSON
        for name in ("prefill", "again", "decode", "cold", "warm"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, Pass(**getattr(self, name)))


def calibrate_side(args: dict) -> None:
    """Start-up, then timed passes in one engine: the job's prompts with one output token (prefill), the same
    again (what re-reading them costs), the same with `decode_tokens` output tokens each (decode), and a pair
    over long prompts, cold then warm, that the prefix cache must serve (the weight of a cached token)."""
    from vllm import SamplingParams

    from pipelines.config.engine import EngineProfile
    from pipelines.stages.engine import generate_ids, make_llm

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
    passes: dict[str, Pass] = {}
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
            if name not in passes or seconds < passes[name].seconds:
                passes[name] = Pass(seconds=seconds, prompt_tokens=sum(len(p) for p in batch),
                                    cached_tokens=sum(o.num_cached_tokens or 0 for o in outputs),
                                    output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs))
    write_result(args, CalibrationPasses(engine_start_s=start_s, block_size=block, **passes))


def run_calibration(job_path: Path, *, overrides: Sequence[str] = (), engine_overrides: Sequence[str] = (),
                    conf_dir: Path | None = None, rows: int = 256, decode_tokens: int = 32) -> dict[str, Any]:
    """Measure the job's engine profile for its `cost:` section: engine start-up, work units per second (uncached
    prompt tokens), and the engine time of a cached prompt token and of an output token in those units.

    The engine runs in a child process, as in the raw side of the throughput bench, on the
    job's own prompts (`rows` of them, repeated from the input as needed).
    """
    import datetime as dt
    import platform

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=overrides, conf_dir=conf_dir, engine_overrides=engine_overrides)
        table = bench_input(job, rows, workdir / "input")
        model_path, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        prompts = prompt_ids(job, table, tokenizer_path)
        f = run_child(job, workdir, "calibrate", {
            "profile": job.engine.model_dump(mode="json"), "model_path": model_path,
            "tokenizer_path": tokenizer_path, "prompts": prompts, "decode_tokens": decode_tokens},
            CalibrationPasses, engine_in_child=True)
    prompt_tokens = sum(len(p) for p in prompts)
    prefill, again, decode, cold, warm = (getattr(f, k) for k in ("prefill", "again", "decode", "cold", "warm"))
    work_per_s = prompt_tokens / prefill.seconds
    # The decode pass reads its prompts again first, as the `again` pass did: the rest is decoding.
    decode_s = max(decode.seconds - again.seconds, 1e-9)
    decode_weight = work_per_s * decode_s / (decode.output_tokens - again.output_tokens)
    # The warm pass computes the uncached tails afresh; the rest of its time is what the cached tokens cost.
    cold_rate = cold.prompt_tokens / cold.seconds
    tails = warm.prompt_tokens - warm.cached_tokens
    cached_weight = (max(0.0, warm.seconds * cold_rate - tails) / warm.cached_tokens
                     if warm.cached_tokens else None)
    # The pipeline, on the same prompts: what a replica is billed beyond its busy time, and its work rate
    # there, where the other stages share the machine with the engine.
    pipe = _pipeline_run(job_path, overrides, engine_overrides, conf_dir, rows)
    work = ((pipe["prompt_tokens"] - pipe["cached_prompt_tokens"]) + pipe["cached_prompt_tokens"] * (cached_weight or 0)
            + pipe["completion_tokens"] * decode_weight)
    cores = os.cpu_count()
    measured = (f"tokenmill bench calibrate, {rows} prompts of {job.spec.name}, {platform.machine()} "
                f"with {cores} cores, {engine_dtype(job.engine)}, {dt.date.today().isoformat()}")
    return {
        "pipeline": pipe,
        "startup_s": pipe["replica_s"] - pipe["busy_s"],
        "pipeline_work_per_s": work / pipe["busy_s"],
        "job": job.spec.name,
        "engine": job.engine.name,
        "rows": rows,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "passes": dataclasses.asdict(f),
        "engine_start_s": f.engine_start_s,
        "block_size": f.block_size,
        "work_per_s": work_per_s,
        "cached_weight": cached_weight,
        "decode_weight": decode_weight,
        "measured": measured,
        # What the job's model writes per record: the job's own figure, not the profile's.
        "output_tokens_per_record": pipe["completion_tokens"] / pipe["records"] if pipe["records"] else None,
        "job_measured": f"{measured}, on {job.engine.name} with max_tokens {job.spec.sampling.max_tokens}",
        "machine": this_machine(),
    }


def _pipeline_run(job_path: Path, overrides: Sequence[str], engine_overrides: Sequence[str], conf_dir: Path | None,
                  rows: int) -> dict[str, Any]:
    """A pipeline run of `rows` of the job's records: its token totals and its replicas' billed and busy time."""
    from pipelines.io.storage import filesystem_for
    from pipelines.run.ledger import EngineStats, read_ledger
    from pipelines.run.runner import run_job

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=overrides, conf_dir=conf_dir, engine_overrides=engine_overrides)
        bench_input(job, rows, workdir / "input")
        job = load_job(job_path, conf_dir=conf_dir, engine_overrides=engine_overrides, overrides=[
            *overrides, f"input.path={workdir / 'input'}", f"output.path={workdir / 'output'}"])
        summary = run_job(job, run_id="calibrate", progress=False)
        fs, root = filesystem_for(str(workdir / "output" / "calibrate"), job.spec.storage.resolved())
        engine = EngineStats.from_ledger(read_ledger(fs, root))
    return {"records": summary.records_out, "prompt_tokens": summary.prompt_tokens,
            "cached_prompt_tokens": summary.cached_prompt_tokens, "completion_tokens": summary.completion_tokens,
            "replicas": engine.replicas, "replica_s": engine.replica_s, "busy_s": engine.busy_s,
            "engine_start_s": max(engine.engine_start_s or [0.0])}


def format_calibration(r: dict[str, Any]) -> str:
    p = r["passes"]
    return "\n".join([
        f"tokenmill bench calibrate: {r['engine']} on {r['rows']} prompts of {r['job']} "
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
        f"      machine: {r['machine']}",
        *([] if r.get("output_tokens_per_record") is None else [
            f"  for the job spec's plan: section ({r['pipeline']['completion_tokens']:,} output tokens over "
            f"{r['pipeline']['records']} records):",
            "    plan:",
            f"      output_tokens_per_record: {r['output_tokens_per_record']:.1f}",
            f"      measured: {r['job_measured']}"]),
    ])
