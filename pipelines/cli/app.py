"""The `tokenmill` command. Library code logs; only this module prints."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipelines.errors import ConfigError, GateFailed, TokenmillError

if TYPE_CHECKING:  # the commands import the runtime when they run, so that `tokenmill --help` stays quick
    from pipelines.run.summary import RunSummary


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero (argparse names the flag when it is not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above zero")
    return value


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", type=Path, help="job spec, e.g. conf/jobs/ticket_triage.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec field (repeatable), e.g. --set input.path=s3://bucket/tickets/")
    p.add_argument("--engine-set", dest="engine_overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a field of the engine profile (repeatable), e.g. --engine-set engine_args.dtype=float32")
    p.add_argument("--conf-dir", type=Path, help="folder holding engines/ and prices.yaml")
    p.add_argument("--date", metavar="YYYY-MM-DD",
                   help="the night (partition): replaces {date} in input.path and output.path, and names the run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="Batch LLM jobs on your own hardware.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job: Parquet in, results Parquet and summary.json out")
    _add_job_args(run)
    run.add_argument("--run-id", help="the run's id (default: <job>-<input folder>-<hash of spec and engine>, so "
                                      "that a retry of the same job on the same input resumes the same run)")
    run.add_argument("--resume", dest="resume", action="store_true", default=True,
                     help="go on with an existing run of this id: skip its committed shards, redo the rest (default)")
    run.add_argument("--no-resume", dest="resume", action="store_false", help="refuse a run id that already exists")
    run.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")
    run.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    run.add_argument("--wait", type=positive_seconds, metavar="SECONDS",
                     help="when another attempt holds the run's lease, wait up to this long for it to end instead "
                          "of refusing at once (sets lease.wait_s)")

    check = sub.add_parser("check", help="validate a job spec and its input without running it")
    _add_job_args(check)

    models = sub.add_parser("models", help="models tokenmill prepares itself")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="turn an embedded model into a Hugging Face folder (idempotent)")
    prep.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    prep.add_argument("--force", action="store_true", help="rebuild even when already prepared")
    msub.add_parser("list", help="list embedded models and where they are prepared")

    samples = sub.add_parser("samples", help="generate sample datasets (with their true answers)")
    ssub = samples.add_subparsers(dest="samples_command", required=True)
    for name, what in [("tickets", "support tickets (ticket_triage)"), ("reviews", "product reviews "
                       "(review_sentiment)"), ("invoices", "invoice emails (invoice_fields)")]:
        one = ssub.add_parser(name, help=f"synthetic {what} as Parquet shards")
        one.add_argument("out", type=Path)
        one.add_argument("--rows", type=int, help="default: as committed under data/samples/")
        one.add_argument("--shards", type=int, default=4)
        one.add_argument("--seed", type=int, default=20261128)

    bench = sub.add_parser("bench", help="benchmarks, one kind each: throughput, decoding, cache, resume, calibrate")
    kinds = bench.add_subparsers(dest="bench_kind", required=True, metavar="KIND")
    for kind, what, job in BENCH_KINDS:
        one = kinds.add_parser(kind, help=what)
        one.add_argument("job", type=Path, nargs="?", help=f"job spec (default {job})")
        one.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                         help="override a spec field (repeatable)")
        one.add_argument("--engine-set", dest="engine_overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                         help="override a field of the engine profile, e.g. engine_args.dtype=bfloat16")
        one.add_argument("--conf-dir", type=Path)
        one.add_argument("--json", type=Path, help="also write the figures to this file")
        if kind != "decoding":
            one.add_argument("--rows", type=int, default=BENCH_ROWS[kind],
                             help=f"records (the job's input repeated); default {BENCH_ROWS[kind]}")
        if kind in ("throughput", "cache"):
            one.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt (ignore_eos)")
    throughput = kinds.choices["throughput"]
    throughput.add_argument("--runs", type=int, default=1,
                            help="repeat every side this many times, in turn; the ratios' medians are reported")
    throughput.add_argument("--sides", default="raw,pipeline,pipeline_cluster",
                            help="comma-separated, from raw, pipeline (the driver starts its own local cluster), "
                                 "pipeline_cluster (the driver joins a running cluster: $RAY_ADDRESS, or a head "
                                 "the bench starts), ray_data_llm, transformers")
    throughput.add_argument("--transformers-rows", type=int, default=256,
                            help="prompts for the transformers side (slow on CPU; its rate is what is compared)")
    decoding = kinds.choices["decoding"]
    decoding.add_argument("--rows", type=int, help="prompts (default 128 for classify, 64 for extract)")
    decoding.add_argument("--repeats", type=int, default=2, help="passes per side, alternating")

    plan = sub.add_parser("plan", help="dry run: rows, rejects, tokens, accelerator time and cost per engine "
                                       "profile, without starting an engine")
    _add_job_args(plan)
    plan.add_argument("--sample", type=int, metavar="N", help="read only the first N rows and scale up")
    plan.add_argument("--deadline", metavar="HH:MM|DURATION",
                      help="finish by this time of day (UTC, e.g. 06:00) or within this long (90m, 2h, 600s): how "
                           "many replicas each profile needs, and whether its cluster can hold them")
    plan.add_argument("--start", metavar="HH:MM", help="when the run starts, for a --deadline time of day "
                                                       "(default: now, UTC)")
    plan.add_argument("--json", type=Path, help="also write the plan to this file")

    submit = sub.add_parser("submit", help="submit a job for one night to a Ray cluster (Jobs API), exactly once, "
                                           "and wait for it")
    submit.add_argument("job", type=Path, help="job spec, e.g. conf/jobs/ticket_triage.yaml")
    submit.add_argument("--date", required=True, metavar="YYYY-MM-DD", help="the night (partition) to run")
    submit.add_argument("--address", help="the cluster's Jobs API (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    submit.add_argument("--runtime-env", type=Path, default=Path("conf/runtime_env.yaml"),
                        help="Ray runtime_env YAML (working_dir, excludes, non-secret env_vars)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="passed on to the job as --set")
    submit.add_argument("--no-wait", action="store_true", help="submit (or find) and return without waiting")
    submit.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    submit.add_argument("--poll", type=positive_seconds, default=5.0, metavar="SECONDS",
                        help="seconds between looks at the job's state while waiting (default 5)")

    report = sub.add_parser("report", help="rebuild a run's summary.json and report.html from its committed results")
    report.add_argument("run_path", help="the run's folder: <output.path>/<run id>, local or object storage")
    report.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")

    rejects = sub.add_parser("rejects", help="what a run rejected")
    rsub = rejects.add_subparsers(dest="rejects_command", required=True)
    rp = rsub.add_parser("replay", help="a new run over exactly the records a run rejected (engine, image, "
                                        "prompt_too_long), once their cause is gone")
    rp.add_argument("run_path", help="the run's folder: <output.path>/<run id>, local or object storage")
    rp.add_argument("--reasons", type=lambda v: [r.strip() for r in v.split(",") if r.strip()],
                    help="comma-separated reasons to replay (default: every replayable one the run has)")
    rp.add_argument("--run-id", help="the new run's id (default: <run id>-replay-<hash of the reasons>)")
    rp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="change the original spec for the replay (repeatable), e.g. --set engine=cpu-smollm2")
    rp.add_argument("--engine-set", dest="engine_overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a field of the engine profile (repeatable)")
    rp.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")
    rp.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")

    sub.add_parser("reference", help="print the configuration reference (markdown) from the config models")
    return parser


def cost_line(s: dict[str, Any]) -> str:
    c = s.get("cost") or {"mode": "per_token", "total_usd": s["cost_usd"], "per_1k_records_usd": None}
    per_1k = f", ${c['per_1k_records_usd']:.6f} per 1k records" if c.get("per_1k_records_usd") is not None else ""
    line = f"${c['total_usd']:.6f} ({c['mode'].replace('_', ' ')}{per_1k})"
    if c["mode"] == "accelerator_time":
        line += (f": {c['replica_hours'] * 3600:.1f} replica-s at ${c['rates']['usd_per_hour']}/h; busy "
                 f"${c['compute_usd']:.6f}, start-up ${c['startup_usd']:.6f}, idle ${c['idle_usd']:.6f}")
    return line


def format_summary(summary: RunSummary) -> str:
    s = summary.to_json()
    def num(v: Any, fmt: str = ",") -> str:
        return "-" if v is None else format(v, fmt)

    rows = [
        ("run", s["run_id"]),
        ("job / engine", f"{s['job']} / {s['engine']} ({s['model']}"
                         + (f", {s['engine_dtype']})" if s.get("engine_dtype") else ")")),
        ("records in / ok / failed", f"{num(s['records_in'])} / {num(s['records_ok'])} / {num(s['records_failed'])}"
                                     f" ({num(s['records_rejected'])} rejected before or by the engine)"),
        ("tokens prompt / cached / output",
         f"{num(s['prompt_tokens'])} / {num(s['cached_prompt_tokens'])} / {num(s['completion_tokens'])}"),
        ("cost", cost_line(s)),
        *[(f"  at {h['description']}", f"${h['cost_usd']:.6f}" + (
            f" ({h['times_run_cost']:.1f}x this run)" if h.get("times_run_cost") else ""))
          for h in s.get("hosted_comparison", {}).values()],
        ("wall time", f"{s['wall_s']:.1f} s (engine start {num(s['engine_start_s'], '.1f')} s)"),
        ("throughput", f"{num(s['records_per_s'], '.2f')} records/s, {num(s['output_tokens_per_s'], '.1f')} "
                       f"output tokens/s ({num(s['steady_output_tokens_per_s'], '.1f')} at steady state)"),
        ("results", s["output"]["path"]),
        ("report", f"{s['output']['path']}/report.html"),
    ]
    if s.get("errors_by_kind"):
        rows.insert(3, ("errors", ", ".join(f"{k}: {v}" for k, v in s["errors_by_kind"].items())))
    if s["input"].get("quarantined"):
        rows.insert(3, ("quarantined shards", "; ".join(f"{q['path']}: {q['reason']}: {(q['message'] or '')[:120]}"
                                                         for q in s["input"]["quarantined"])))
    if s.get("resumed"):
        rows.insert(1, ("resumed", f"yes: {s['shards_redone']} shard(s) run in this attempt"))
    a = s.get("attempt") or {}
    if a.get("took_over_from") or a.get("shards_lost"):
        rows.insert(1, ("attempt", f"lease token {a['lease_token']}"
                        + (f", took over from {a['took_over_from']}" if a.get("took_over_from") else "")
                        + (f"; {a['shards_lost']} committed shard(s) had lost files and were run again"
                           if a.get("shards_lost") else "")))
    q = s.get("quality")
    if q and "accuracy" in q:
        rows.append(("accuracy", f"{num(q['accuracy'], '.3f')} on {q['records_with_truth']:,} records "
                                 f"with {q['truth_column']}"))
    elif q and "fields" in q:
        rates = ", ".join(f"{k} {num(v['exact_match_rate'], '.3f')}" for k, v in q["fields"].items())
        rows.append(("exact match", rates))
    if s["output"]["output_file"] is not None:
        rows.append(("OpenAI batch files", f"{s['output']['output_lines']:,} in {s['output']['output_file']}, "
                                           f"{s['output']['error_lines']:,} in {s['output']['error_file']}"))
    if summary.plan_check:
        rows.append(("plan error", ", ".join(f"{k} {v['error_pct']:+.0f}%" for k, v in summary.plan_check.items()
                                             if v["error_pct"] is not None) or "-"))
        if summary.plan_warning:
            rows.append(("", f"(the plan's wall time and cost: {summary.plan_warning})"))
    if summary.budget is not None:
        b = summary.budget
        rows.append(("budget", f"spent ${b.spent_usd:.6f} and {b.spent_output_tokens:,} output tokens of "
                               f"{'$' + format(b.max_usd, 'g') if b.max_usd is not None else '-'} / "
                               f"{num(b.max_output_tokens)}; {b.batches_refused} batches refused, overshoot "
                               f"${b.overshoot_usd:.6f}" + (" (stopped)" if summary.stopped else "")))
    if summary.replay_of is not None:
        r = summary.replay_of
        rows.insert(1, ("replay of", f"{r.run} ({r.records:,} records rejected for {', '.join(r.reasons)})"))
    drift = summary.drift
    if drift is not None and summary.replay_of is None:
        if drift.previous_run is None:
            rows.append(("drift", "not compared: no earlier successful run of this job under this output path"))
        else:
            rows.append(("drift", f"{drift.status} against {drift.previous_run}"
                         + ("" if drift.gated else " (too few records to gate)")))
            for c in drift.breaches:
                rows.append((f"  {c.metric}", f"{num(c.previous, '.4g')} -> {num(c.current, '.4g')}, change "
                                             f"{num(c.change, '.4g')} past the gate's {c.limit:g} ({c.watch})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.config import load_job
    from pipelines.run.runner import run_job

    overrides = [*args.overrides, *([f"lease.wait_s={args.wait}"] if args.wait else [])]
    job = load_job(args.job, overrides=overrides, conf_dir=args.conf_dir, partition=args.date,
                   engine_overrides=args.engine_overrides)
    return _finished_run(run_job(job, run_id=args.run_id, progress=not args.no_progress, resume=args.resume),
                         as_json=args.json)


def _finished_run(summary: RunSummary, *, as_json: bool) -> int:
    """Print a run's summary; its exit code (a breached drift gate raises GateFailed)."""
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print("\ntokenmill run summary\n" + format_summary(summary))
    if summary.drift is not None and summary.drift.status == "gate_failed":
        raise GateFailed(f"run {summary.run_id}: drift gate(s) breached against {summary.drift.previous_run}: "
                         + ", ".join(c.metric for c in summary.drift.breaches)
                         + "; the results are committed and kept, and _SUCCESS says gate_failed")
    return 0 if summary.records_out + summary.records_rejected == summary.records_in else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from pipelines.config import load_job
    from pipelines.run.runner import preflight

    job = load_job(args.job, overrides=args.overrides, conf_dir=args.conf_dir, partition=args.date,
                   engine_overrides=args.engine_overrides)
    _, _, plan = preflight(job)
    found = (f"{len(plan)} OpenAI batch request file(s)" if isinstance(plan, list)
             else f"{plan.num_rows:,} records in {len(plan.shards)} shard(s)")
    print(f"ok: {job.spec.name}: {found} at {job.spec.input.path}; "
          f"engine {job.engine.name} ({job.engine.display_model})")
    for q in getattr(plan, "quarantined", []):
        print(f"quarantined (a run goes on without it): {q.uri}: {q.reason}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from pipelines.models.embedded import EMBEDDED, is_prepared, model_dir, prepare

    if args.models_command == "prepare":
        print(prepare(args.name, force=args.force))
    else:
        for name, m in EMBEDDED.items():
            where = model_dir(name)
            print(f"{name}\t{m.upstream}\t{'prepared at ' + str(where) if is_prepared(where) else 'not prepared'}")
    return 0


def _cmd_samples(args: argparse.Namespace) -> int:
    from pipelines.samples import generators, write_shards

    make, rows = generators()[args.samples_command]
    for path in write_shards(make(args.rows or rows, seed=args.seed), args.out, shards=args.shards):
        print(path)
    return 0


BENCH_KINDS = [
    ("throughput", "the same prompts through raw vLLM, the pipeline (own cluster and joined cluster), "
                   "ray.data.llm and transformers: tokens/s, memory, ratios", "conf/jobs/ticket_triage.yaml"),
    ("decoding", "constrained against unconstrained decoding on a classify or extract job's prompts",
     "conf/jobs/review_sentiment.yaml"),
    ("cache", "two runs with a response cache, the second repeating half of the first's prompts",
     "conf/jobs/ticket_triage.yaml"),
    ("resume", "a run, then the same run again: what resuming a finished run costs", "conf/jobs/ticket_triage.yaml"),
    ("calibrate", "measure the engine profile's cost: figures (decode and cached-token weights, work rate, "
                  "start-up) on this machine", "conf/jobs/ticket_triage.yaml"),
]
BENCH_ROWS = {"throughput": 512, "cache": 512, "resume": 128, "calibrate": 256}


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipelines.bench import cache, calibrate, decoding, resume, throughput

    kind = args.bench_kind
    job = args.job or Path(next(default for k, _, default in BENCH_KINDS if k == kind))
    common = {"overrides": args.overrides, "engine_overrides": args.engine_overrides, "conf_dir": args.conf_dir}
    if kind == "throughput":
        result = throughput.run_throughput(job, **common, rows=args.rows, max_tokens=args.max_tokens, runs=args.runs,
                                           sides=[s.strip() for s in args.sides.split(",") if s.strip()],
                                           transformers_rows=args.transformers_rows)
        print(throughput.format_throughput(result))
    elif kind == "decoding":
        result = decoding.run_decoding(job, **common, rows=args.rows, repeats=args.repeats)
        print(decoding.format_decoding(result))
    elif kind == "cache":
        result = cache.run_cache(job, **common, rows=args.rows, max_tokens=args.max_tokens)
        print(cache.format_cache(result))
    elif kind == "resume":
        result = resume.run_resume(job, **common, rows=args.rows)
        print(resume.format_resume(result))
    else:
        result = calibrate.run_calibration(job, **common, rows=args.rows)
        print(calibrate.format_calibration(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from pipelines.config.reference import render

    print(render())
    return 0


def _clock(text: str, flag: str) -> dt.time:
    try:
        return dt.time.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected a time of day as HH:MM") from None


def deadline_seconds(deadline: str, start: str | None, now: dt.datetime | None = None) -> float:
    """Seconds from `start` (HH:MM, default now) to `deadline`: a time of day (HH:MM, the next one after the
    start: 06:00 from 22:00 is 8 hours) or a duration (`parse_duration`)."""
    if ":" not in deadline:
        if start is not None:
            raise ConfigError("--start goes with a --deadline time of day (HH:MM), not a duration")
        return parse_duration(deadline)
    now = now or dt.datetime.now(dt.timezone.utc)
    begin = _clock(start, "--start") if start else now.time().replace(tzinfo=None)
    end = _clock(deadline, "--deadline")
    day = dt.date(2000, 1, 1)
    seconds = (dt.datetime.combine(day, end) - dt.datetime.combine(day, begin)).total_seconds()
    return seconds if seconds > 0 else seconds + 86400


def parse_duration(text: str) -> float:
    """`90m`, `2h`, `600s` or `600` as seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ConfigError(f"--deadline {text!r}: expected a duration such as 600s, 90m or 2h") from None


def _cmd_plan(args: argparse.Namespace) -> int:
    from pipelines.config import load_job
    from pipelines.run.plan import format_plan, plan_job

    job = load_job(args.job, overrides=args.overrides, conf_dir=args.conf_dir, partition=args.date,
                   engine_overrides=args.engine_overrides)
    if args.start and not args.deadline:
        raise ConfigError("--start goes with --deadline")
    result = plan_job(job, sample=args.sample,
                      deadline_s=deadline_seconds(args.deadline, args.start) if args.deadline else None)
    print(format_plan(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.config import load_job
    from pipelines.run.submit import SubmitError, default_address, submit

    load_job(args.job, overrides=args.overrides, partition=args.date)  # checks the spec before submitting
    runtime_env = yaml.safe_load(args.runtime_env.read_text()) if args.runtime_env.is_file() else {}
    extra = [a for kv in args.overrides for a in ("--set", kv)]
    try:
        done = submit(address=args.address or default_address(), spec_text=args.job.read_text(),
                      partition=args.date, args=extra,
                      runtime_env=runtime_env, wait=not args.no_wait, timeout_s=args.timeout,
                      poll_s=args.poll)
    except SubmitError as exc:
        raise ConfigError(str(exc)) from None
    if args.no_wait:
        print(f"tokenmill submit: {done.submission_id}: {done.status}")
    failed = done.status in ("FAILED", "STOPPED") or (not args.no_wait and done.status != "SUCCEEDED")
    return 1 if failed else 0


def _cmd_rejects(args: argparse.Namespace) -> int:
    from pipelines.run.replay import replay

    return _finished_run(replay(args.run_path, reasons=args.reasons, run_id=args.run_id, overrides=args.overrides,
                                engine_overrides=args.engine_overrides, progress=not args.no_progress),
                         as_json=args.json)


def _cmd_report(args: argparse.Namespace) -> int:
    from pipelines.run.report import rebuild

    summary = rebuild(args.run_path)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print("\ntokenmill run summary (rebuilt from the committed results)\n" + format_summary(summary))
    return 0


COMMANDS = {"reference": _cmd_reference, "run": _cmd_run, "check": _cmd_check, "models": _cmd_models,
            "samples": _cmd_samples, "bench": _cmd_bench, "plan": _cmd_plan, "report": _cmd_report,
            "submit": _cmd_submit, "rejects": _cmd_rejects}


def refuse_secret_sets(args: argparse.Namespace) -> None:
    """Refuse a credential given with `--set` or `--engine-set`: a driver's command line is kept by the Ray cluster
    it joins (the Jobs API lists it), by `ps` and by shell history. The value is never repeated."""
    from pipelines.run.submit import secret_key

    for flag, items in (("--set", getattr(args, "overrides", [])), ("--engine-set", getattr(args, "engine_overrides", []))):
        for item in items or []:
            key = item.partition("=")[0].strip()
            if secret_key(key):
                raise ConfigError(f"{flag} {key}: looks like a credential, and a command line is kept by the Ray "
                                  "cluster it joins (the Jobs API lists it), by ps and by shell history; give it "
                                  "through the environment (AWS_* variables) or the spec's storage block")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command != "submit":  # submit refuses them itself, saying where a job's arguments are shown
            refuse_secret_sets(args)
        return COMMANDS[args.command](args)
    except TokenmillError as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
