"""`tokenmill bench cache`: two runs with a response cache, the second repeating half of the first's prompts.
Its throughput against the first run's, and whether the repeated records' results are the first run's."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from pipelines.bench.common import distinct_input, fixed_sampling, write_shards
from pipelines.config.load import load_job

# Result columns that differ between a generated answer and the same answer from the cache.
CACHE_DIFFERS = {"cached", "cost_usd", "compute_usd", "overhead_usd", "work_units", "run_id"}


def run_cache(job_path: Path, *, overrides: Sequence[str] = (), engine_overrides: Sequence[str] = (),
              conf_dir: Path | None = None, rows: int = 512, max_tokens: int = 32) -> dict[str, Any]:
    """Two runs with a response cache: `rows` distinct prompts, then `rows` of which half repeat the first
    run's. Compares their throughput and checks the repeated records' results are the first run's."""
    import polars as pl

    from pipelines.run.runner import run_job

    fixed = fixed_sampling(max_tokens)
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        workdir = Path(tmp)
        job = load_job(job_path, overrides=[*overrides, *fixed], conf_dir=conf_dir, engine_overrides=engine_overrides)
        first_in = distinct_input(job, rows, workdir / "in1", tag="a")
        second_in = pa.concat_tables([first_in.slice(0, rows // 2),
                                      distinct_input(job, rows - rows // 2, workdir / "new", tag="b")])
        write_shards(second_in, workdir / "in2", 4)
        runs: dict[str, dict[str, Any]] = {}
        for name, folder in (("first", "in1"), ("second", "in2")):
            job = load_job(job_path, conf_dir=conf_dir, engine_overrides=engine_overrides, overrides=[
                *overrides, *fixed, f"input.path={workdir / folder}", f"output.path={workdir / 'out'}",
                f"cache.path={workdir / 'cache'}"])
            summary = run_job(job, run_id=f"bench-cache-{name}", progress=False)
            results = pl.concat([pl.read_parquet(f) for f in summary.output.results])
            runs[name] = {"summary": summary, "results": results}
    id_col = job.spec.id_column
    first, second = runs["first"]["results"], runs["second"]["results"]
    repeated = second.filter(pl.col(id_col).str.starts_with("a"))
    same_cols = [c for c in first.columns if c not in CACHE_DIFFERS]
    joined = repeated.select(same_cols).sort(id_col).equals(
        first.filter(pl.col(id_col).is_in(repeated[id_col].implode())).select(same_cols).sort(id_col))
    out: dict[str, Any] = {"job": job.spec.name, "engine": job.engine.name, "rows": rows, "max_tokens": max_tokens}
    for name, run in runs.items():
        s = run["summary"]
        busy = s.wall_s - (s.engine_start_s or 0)
        out[name] = {"wall_s": s.wall_s, "engine_start_s": s.engine_start_s, "records": s.records_out,
                     "records_cached": (s.cache or {}).get("records", 0),
                     "saved_usd": (s.cache or {}).get("saved_usd"), "cost_usd": s.cost["total_usd"],
                     "records_per_s": s.records_out / busy, "records_per_s_with_startup": s.records_out / s.wall_s}
    out["repeated_records"] = repeated.height
    out["repeated_cached"] = int(repeated["cached"].sum())
    out["repeated_identical_except_cached"] = bool(joined)
    out["ratio_records_per_s"] = out["second"]["records_per_s"] / out["first"]["records_per_s"]
    out["ratio_with_startup"] = out["second"]["records_per_s_with_startup"] / out["first"]["records_per_s_with_startup"]
    return out


def format_cache(r: dict[str, Any]) -> str:
    lines = [f"tokenmill bench cache: {r['job']} on {r['engine']}, {r['rows']} records per run, "
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
