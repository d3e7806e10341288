"""`tokenmill bench throughput`: the same prompts through raw vLLM, the pipeline, Ray's `ray.data.llm` and
transformers, in one invocation.

Every side generates exactly `max_tokens` tokens per prompt (`ignore_eos`),
greedily, with the same engine profile and token ids. The raw side is
`vllm.LLM.generate` on the whole list at once: the ceiling. The pipeline runs
twice: as `tokenmill run` does on a machine of its own (the driver starts a
local cluster), and as production runs it (`pipeline_cluster`: the driver joins
an already running cluster through `RAY_ADDRESS`, as under `ray job submit`).
Engine start-up is reported apart from steady state.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from pipelines.bench.cluster import running_cluster
from pipelines.bench.common import bench_input, cpu_s, fixed_sampling, median, prompt_ids, run_child, write_result
from pipelines.config.load import load_job
from pipelines.models import resolve_engine_paths
from pipelines.stages.engine import actor_env, bind_cpu_threads, engine_dtype, vm_hwm_mb
from pipelines.stages.prompt import prompt_fields, task_instructions

SIDES = ("raw", "pipeline", "pipeline_cluster", "ray_data_llm", "transformers")
DEFAULT_SIDES = ("raw", "pipeline", "pipeline_cluster")
SIDE_NAMES = {"raw": "raw vllm.generate", "pipeline": "pipeline, own cluster",
              "pipeline_cluster": "pipeline, joined cluster", "ray_data_llm": "ray.data.llm",
              "transformers": "transformers generate"}


@dataclasses.dataclass
class PipelineProfile:
    """Where a pipeline side's CPU went, and how its engine was fed."""

    batches: int
    engine_idle_s: float  # the engine waiting for work between batches
    driver_cpu_s: float
    actor_cpu_s: float  # the engine actor's own Python, not the engine
    ray_cpu_s: dict[str, float]  # Ray's own processes that the driver started (none when it joined a cluster)


@dataclasses.dataclass
class SideFigures:
    """What one side measured."""

    requests: int
    output_tokens: int
    prompt_tokens: int | None  # what the side sent the engine: every side must send the same
    wall_s: float | None  # start to end, engine start-up included, where the side has one figure for it
    steady_s: float | None  # after engine start-up; None where nothing outside the side can say when that was
    engine_start_s: float | None
    driver_peak_rss_mb: float
    actor_peak_rss_mb: float | None = None
    engine_peak_rss_mb: float | None = None
    profile: dict[str, Any] | None = None  # a `PipelineProfile`, for the pipeline sides

    @property
    def output_tokens_per_s(self) -> float | None:
        return self.output_tokens / self.steady_s if self.steady_s else None

    @property
    def requests_per_s(self) -> float | None:
        return self.requests / self.steady_s if self.steady_s else None

    @property
    def with_startup_s(self) -> float:
        return self.wall_s or ((self.engine_start_s or 0.0) + (self.steady_s or 0.0))

    @property
    def with_startup_output_tokens_per_s(self) -> float:
        return self.output_tokens / self.with_startup_s

    def report(self) -> dict[str, Any]:
        """The figures with their rates, for `--json`."""
        return {**dataclasses.asdict(self), "output_tokens_per_s": self.output_tokens_per_s,
                "requests_per_s": self.requests_per_s, "with_startup_s": self.with_startup_s,
                "with_startup_output_tokens_per_s": self.with_startup_output_tokens_per_s}


# The sides, each in its own process (`pipelines.bench.__main__`).

def raw_side(args: dict) -> None:
    """Start the engine, generate everything in one call."""
    from pipelines.config.engine import EngineProfile
    from pipelines.config.job import SamplingSpec
    from pipelines.stages.engine import generate_ids, make_llm, peak_memory_mb, sampling_params

    profile = EngineProfile.model_validate(args["profile"])
    t0 = time.perf_counter()
    llm = make_llm(profile, args["model_path"], args["tokenizer_path"])
    start_s = time.perf_counter() - t0
    params = sampling_params(SamplingSpec.model_validate(args["sampling"]))
    t1 = time.perf_counter()
    outputs = generate_ids(llm, args["prompts"], params)
    steady_s = time.perf_counter() - t1
    memory = peak_memory_mb()
    write_result(args, SideFigures(
        requests=len(outputs), output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        prompt_tokens=sum(len(p) for p in args["prompts"]), wall_s=None, steady_s=steady_s, engine_start_s=start_s,
        driver_peak_rss_mb=vm_hwm_mb("self"), engine_peak_rss_mb=memory["engine_peak_rss_mb"]))


def pipeline_side(args: dict) -> None:
    """The tokenmill pipeline, Parquet to Parquet, with this process as its driver."""
    from pipelines.io.storage import filesystem_for, join
    from pipelines.run.ledger import read_ledger
    from pipelines.run.runner import run_job

    job = load_job(Path(args["job"]), overrides=args["overrides"], conf_dir=args["conf_dir"] and Path(args["conf_dir"]),
                   engine_overrides=args["engine_overrides"])
    cpu0 = cpu_s("self")
    summary = run_job(job, run_id=args["run_id"], progress=False)
    fs, root = filesystem_for(job.spec.output.path, job.spec.storage.resolved())
    ledger = read_ledger(fs, join(root, args["run_id"]))
    profile = PipelineProfile(
        batches=sum(e["batches"] for e in ledger), engine_idle_s=sum(e.get("engine_idle_s") or 0 for e in ledger),
        driver_cpu_s=round(cpu_s("self") - cpu0, 2), actor_cpu_s=sum(e.get("actor_cpu_s") or 0 for e in ledger),
        ray_cpu_s=_ray_processes_cpu_s())
    write_result(args, SideFigures(
        requests=summary.records_out, output_tokens=summary.completion_tokens,
        prompt_tokens=summary.prompt_tokens, wall_s=summary.wall_s,
        steady_s=(summary.completion_tokens / summary.steady_output_tokens_per_s
                  if summary.steady_output_tokens_per_s else None),
        engine_start_s=summary.engine_start_s, driver_peak_rss_mb=round(vm_hwm_mb("self"), 1),
        actor_peak_rss_mb=max((e.get("actor_peak_rss_mb") or 0) for e in ledger),
        engine_peak_rss_mb=max((e.get("engine_peak_rss_mb") or 0) for e in ledger) or None,
        profile=dataclasses.asdict(profile)))


def ray_data_llm_side(args: dict) -> None:
    """Ray's own batch processor (`ray.data.llm`) doing the pipeline's job with the same engine settings.

    It reads the same Parquet shards, builds the same chat messages in its
    `preprocess`, and lets its own stages apply the chat template, tokenize and
    detokenize (each a one-actor pool, Ray's default), then writes Parquet, as
    a user of Ray's processor would. On CPU it needs a placement group of one
    CPU bundle (else it waits for a GPU), more CPUs declared than a 2-core
    machine has (its stages ask for more), and no engine metrics (they need
    `ray[serve]`).
    """
    import pyarrow.parquet as pq
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
        engine_kwargs={"tokenizer": args["tokenizer_path"], **profile.engine_args.to_vllm_kwargs(),
                       "dtype": engine_dtype(profile)},
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
    write_result(args, SideFigures(
        requests=len(rows["n"]), output_tokens=sum(rows["n"]), prompt_tokens=sum(rows["p"]), wall_s=wall,
        steady_s=None, engine_start_s=None, driver_peak_rss_mb=round(vm_hwm_mb("self"), 1)))


def transformers_side(args: dict) -> None:
    """Plain transformers `generate`, batched with left padding, greedy, exactly `max_tokens` tokens each."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.config.engine import EngineProfile

    profile = EngineProfile.model_validate(args["profile"])
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(engine_dtype(profile), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args["model_path"], dtype=dtype).eval()
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
    write_result(args, SideFigures(
        requests=len(prompts), output_tokens=tokens, prompt_tokens=None, wall_s=None, steady_s=steady_s,
        engine_start_s=start_s, driver_peak_rss_mb=round(vm_hwm_mb("self"), 1)))


def _ray_processes_cpu_s() -> dict[str, float]:
    """CPU seconds of the Ray processes this driver started, still alive at the end: its daemons, and its
    workers by title (Ray Data's helper actors; the engine actor is gone by then). None when it joined a
    cluster, whose processes are not its children."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            argv = proc.cmdline()
            program = " ".join(argv[:3])
            name = next((d for d in ("gcs_server", "raylet", "dashboard/agent.py", "runtime_env/agent",
                                     "log_monitor", "monitor.py") if d in program), None)
            if name is None and argv and argv[0].startswith("ray::"):
                name = argv[0].split("(")[0]
            if name:
                t = proc.cpu_times()
                out[name.split("/")[0]] = round(out.get(name.split("/")[0], 0.0) + t.user + t.system, 2)
        except psutil.Error:
            continue
    return out


# The parent.

def ratios(f: dict[str, SideFigures]) -> dict[str, float]:
    """Each comparison the sides of one run allow: steady state where both sides have it, else wall to wall."""
    out: dict[str, float] = {}
    raw = f.get("raw")
    for side in ("pipeline", "pipeline_cluster"):
        if raw is None or side not in f:
            continue
        steady, raw_steady = f[side].output_tokens_per_s, raw.output_tokens_per_s
        if steady and raw_steady:
            out[f"ratio_{side}_to_raw"] = steady / raw_steady
        out[f"ratio_with_startup_{side}_to_raw"] = (f[side].with_startup_output_tokens_per_s
                                                    / raw.with_startup_output_tokens_per_s)
    if "pipeline" in f and "ray_data_llm" in f:
        out["ratio_with_startup_pipeline_to_ray_data_llm"] = (f["pipeline"].with_startup_output_tokens_per_s
                                                              / f["ray_data_llm"].with_startup_output_tokens_per_s)
    if raw is not None and "ray_data_llm" in f:
        out["ratio_with_startup_ray_data_llm_to_raw"] = (f["ray_data_llm"].with_startup_output_tokens_per_s
                                                         / raw.with_startup_output_tokens_per_s)
    if raw is not None and "transformers" in f:
        t, r = f["transformers"].output_tokens_per_s, raw.output_tokens_per_s
        if t and r:
            out["ratio_transformers_to_raw"] = t / r
    return out


def run_throughput(job_path: Path, *, overrides: Sequence[str] = (), engine_overrides: Sequence[str] = (),
                   conf_dir: Path | None = None, rows: int = 512, max_tokens: int = 32, runs: int = 1,
                   sides: Sequence[str] = DEFAULT_SIDES, transformers_rows: int = 256) -> dict[str, Any]:
    """Every side on the same `rows` prompts, `runs` times, the sides in turn within each run. Returns per-run
    figures, their ratios and the ratios' medians.

    `pipeline_cluster` joins the cluster in `RAY_ADDRESS`, or the one this process is connected to, or else a
    head this bench starts for the purpose (`ray start --head`) and stops at the end.
    """
    unknown = set(sides) - set(SIDES)
    if unknown or not sides:
        raise ValueError(f"--sides: choose from {', '.join(SIDES)}")
    fixed = fixed_sampling(max_tokens)
    runs_out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=[*overrides, *fixed], conf_dir=conf_dir, engine_overrides=engine_overrides)
        table = bench_input(job, rows, workdir / "input")
        pipe_overrides = [*overrides, *fixed, f"input.path={workdir / 'input'}", f"output.path={workdir / 'output'}"]
        job = load_job(job_path, conf_dir=conf_dir, overrides=pipe_overrides, engine_overrides=engine_overrides)
        if job.spec.prompt is None:
            raise ValueError(f"{job_path}: the throughput bench needs a job with a prompt template")
        model_path, tokenizer_path = resolve_engine_paths(job.engine.model, job.engine.tokenizer)
        prompts = prompt_ids(job, table, tokenizer_path)
        del table
        # ray.data.llm builds the same messages from the same shards in its own preprocess.
        prompt_text = {"system": job.spec.prompt.system, "user": job.spec.prompt.user,
                       "instructions": task_instructions(job.spec)}
        common = {"profile": job.engine.model_dump(mode="json"), "model_path": model_path,
                  "tokenizer_path": tokenizer_path, "max_tokens": max_tokens}
        pipeline = {"job": str(job_path), "overrides": pipe_overrides, "engine_overrides": list(engine_overrides),
                    "conf_dir": str(conf_dir) if conf_dir else None}
        batch_size = job.spec.batch_size or job.engine.engine_args.max_num_seqs
        with running_cluster(needed="pipeline_cluster" in sides, temp=workdir / "ray") as joined:
            for r in range(runs):
                figures: dict[str, SideFigures] = {}
                for side in [s for s in SIDES if s in sides]:
                    if side == "raw":
                        figures[side] = run_child(job, workdir, side, {
                            **common, "sampling": job.spec.sampling.model_dump(mode="json"), "prompts": prompts},
                            SideFigures, engine_in_child=True)
                    elif side in ("pipeline", "pipeline_cluster"):
                        join = joined.driver_env if joined and side == "pipeline_cluster" else None
                        figures[side] = run_child(job, workdir, "pipeline", {**pipeline, "run_id": f"{side}-{r}"},
                                                  SideFigures, engine_in_child=False, join=join)
                    elif side == "ray_data_llm":
                        figures[side] = run_child(job, workdir, side, {
                            **common, "input": str(workdir / "input"), "output": str(workdir / f"ray-data-llm-{r}"),
                            "columns": prompt_fields(prompt_text["system"], prompt_text["user"] or ""),
                            "batch_size": batch_size, "env": actor_env(job.engine), **prompt_text},
                            SideFigures, engine_in_child=False)
                    else:
                        figures[side] = run_child(job, workdir, side, {
                            **common, "prompts": prompts[:transformers_rows], "batch_size": 64},
                            SideFigures, engine_in_child=True)
                runs_out.append({"sides": figures, **ratios(figures)})
    ratio_keys = sorted({k for run in runs_out for k in run if k.startswith("ratio_")})
    return {
        "job": job.spec.name,
        "engine": job.engine.name,
        "dtype": engine_dtype(job.engine),  # this machine's choice where the profile says auto
        "rows": rows,
        "max_tokens": max_tokens,
        "cluster": joined.how if joined else None,
        "transformers_rows": min(rows, transformers_rows) if "transformers" in sides else None,
        "runs": [{**run, "sides": {s: f.report() for s, f in run["sides"].items()}} for run in runs_out],
        "median": {k: median([run[k] for run in runs_out if k in run]) for k in ratio_keys},
        "median_output_tokens_per_s": {
            side: median([run["sides"][side].output_tokens_per_s for run in runs_out])
            for side in runs_out[0]["sides"] if runs_out[0]["sides"][side].output_tokens_per_s is not None},
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mb(value) -> str:
    return f"{value:,.0f}" if value else "-"


def format_throughput(r: dict[str, Any]) -> str:
    lines = [f"tokenmill bench throughput: {r['job']} on {r['engine']} ({r['dtype']}), {r['rows']} prompts x "
             f"{r['max_tokens']} output tokens (ignore_eos), {len(r['runs'])} run(s), the sides in turn within each run"]
    if r.get("cluster"):
        lines.append(f"  the joined cluster: {r['cluster']}")
    for k, run in enumerate(r["runs"], 1):
        lines.append(f"run {k}:")
        lines.append(f"  {'side':<26}{'start s':>8}{'steady s':>9}{'tok/s':>8}{'req/s':>7}{'with start tok/s':>17}"
                     f"{'driver MB':>10}{'actor MB':>9}{'engine MB':>10}")
        for side, f in run["sides"].items():
            start = f.get("engine_start_s")
            lines.append(
                f"  {SIDE_NAMES[side]:<26}{(f'{start:.1f}' if start else '-'):>8}{_fmt(f['steady_s'], '.1f'):>9}"
                f"{_fmt(f['output_tokens_per_s'], '.1f'):>8}{_fmt(f['requests_per_s'], '.2f'):>7}"
                f"{f['with_startup_output_tokens_per_s']:>17.1f}{_mb(f.get('driver_peak_rss_mb')):>10}"
                f"{_mb(f.get('actor_peak_rss_mb')):>9}{_mb(f.get('engine_peak_rss_mb')):>10}")
        sent = {f.get("prompt_tokens") for f in run["sides"].values() if f.get("prompt_tokens") is not None}
        if len(sent) > 1:
            lines.append("  WARNING: the sides sent the engine different prompt tokens: " + ", ".join(
                f"{SIDE_NAMES[s]} {f['prompt_tokens']:,}" for s, f in run["sides"].items() if f.get("prompt_tokens")))
        for side in ("pipeline", "pipeline_cluster"):
            p = (run["sides"].get(side) or {}).get("profile")
            if p:
                ray_cpu = ", ".join(f"{k} {v:.1f}" for k, v in sorted(p["ray_cpu_s"].items()))
                lines.append(f"  {SIDE_NAMES[side]}: {p['batches']} batches, engine idle between batches "
                             f"{p['engine_idle_s']:.1f} s; CPU s: driver {p['driver_cpu_s']:.1f}, engine actor "
                             f"(not the engine) {p['actor_cpu_s']:.1f}; Ray's own processes: {ray_cpu or '-'}")
    if r.get("transformers_rows"):
        lines.append(f"  (transformers runs the first {r['transformers_rows']} prompts: its rate, not its total)")
    lines.append(f"median of {len(r['runs'])} run(s):")
    for k, v in r["median"].items():
        lines.append(f"  {k.removeprefix('ratio_').replace('_to_', '/').replace('_', ' ')}: {v:.3f}")
    return "\n".join(lines)
