"""End to end on the real stack: SeaweedFS S3 -> Ray Data -> vLLM (SmolLM2 on CPU) -> S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import QUICK_START_ARGS, S3_SECRET

from pipelines.cli import main
from pipelines.config import load_job
from pipelines.stages import generate
from pipelines.stages.prompt import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/ticket_triage.yaml"
SAMPLES = REPO / "data/samples/tickets"
BUCKET = "tokenmill-e2e"


def put_table(client, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())


def upload_input(client) -> pa.Table:
    """The first 10 rows of each sample shard plus one shard of bad rows, all under s3://BUCKET/tickets/."""
    client.create_bucket(Bucket=BUCKET)
    tables = []
    for path in sorted(SAMPLES.glob("*.parquet")):
        tables.append(pq.read_table(path).slice(0, 10))
        put_table(client, f"tickets/{path.name}", tables[-1])
    good = tables[0]
    bad = pa.Table.from_pylist([
        {**good.slice(0, 1).to_pylist()[0], "ticket_id": "BAD-NULL-BODY", "body": None},
        {**good.slice(1, 1).to_pylist()[0], "ticket_id": "BAD-BLANK-SUBJECT", "subject": "   "},
    ], schema=good.schema)
    put_table(client, "tickets/part-99999.parquet", bad)
    return pa.concat_tables([*tables, bad])


@pytest.mark.engine
def test_ticket_triage_s3_to_s3(ray_cluster, s3_env, model_path, capsys):
    client = s3_env.client()
    source = upload_input(client)
    overrides = [f"input.path=s3://{BUCKET}/tickets/", f"output.path=s3://{BUCKET}/out/",
                 "output.include_token_ids=true", "batch_size=8",
                 "sampling.max_tokens=16"]
    code = main(["run", str(JOB), "--run-id", "e2e", "--no-progress", *QUICK_START_ARGS,
                 *[a for o in overrides for a in ("--set", o)]])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "records in / ok / failed" in printed.out and "42 / 40 / 2" in printed.out

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="out/e2e/")["Contents"]]
    assert {"out/e2e/summary.json", "out/e2e/_SUCCESS", "out/e2e/_run.json"} <= set(keys)
    assert sum(k.startswith("out/e2e/_manifests/") for k in keys) == 5  # one per shard
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="out/e2e/summary.json")["Body"].read())

    def frame(prefix: str) -> pl.DataFrame:
        return pl.concat([pl.read_parquet(io.BytesIO(client.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
                          for k in keys if k.startswith(prefix) and k.endswith(".parquet")])

    results, rejects = frame("out/e2e/results/"), frame("out/e2e/rejects/")
    assert sorted(f"s3://{BUCKET}/{k}" for k in keys if k.startswith("out/e2e/results/")) == \
        summary["output"]["results"]

    # Every input id exactly once, in the results or the rejects.
    assert sorted(results["ticket_id"].to_list() + rejects["ticket_id"].to_list()) == \
        sorted(source.column("ticket_id").to_pylist())
    assert results.height == 40 and rejects.height == 2

    # Bad rows go to the rejects with where they came from and why, and never reach the engine.
    bad = rejects.sort("ticket_id")
    assert bad["ticket_id"].to_list() == ["BAD-BLANK-SUBJECT", "BAD-NULL-BODY"]
    assert bad["reason"].to_list() == ["empty_input", "empty_input"]
    assert bad["message"].to_list() == ["subject is null, empty or blank", "body is null, empty or blank"]
    assert bad["shard"].to_list() == [f"s3://{BUCKET}/tickets/part-99999.parquet"] * 2
    assert bad["row"].to_list() == [1, 0]

    ok = results.filter(pl.col("error").is_null())
    assert ok.height == 40
    assert ok["output_text"].str.len_chars().min() > 0
    assert set(ok["finish_reason"].unique()) <= {"stop", "length"}

    # prompt_tokens is the tokenizer's count of the rendered chat prompt.
    job = load_job(JOB)
    tok = load_tokenizer(str(model_path))
    by_id = {r["ticket_id"]: r for r in source.to_pylist()}
    for row in ok.select("ticket_id", "prompt_tokens", "prompt_token_ids").iter_rows(named=True):
        record = by_id[row["ticket_id"]]
        messages = [{"role": "system", "content": job.spec.prompt.system.format(**record)},
                    {"role": "user", "content": job.spec.prompt.user.format(**record)}]
        expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert row["prompt_tokens"] == len(expected)
        assert row["prompt_token_ids"] == list(expected)

    # completion_tokens is the length of the engine's output token ids, within max_tokens.
    lengths = ok["output_token_ids"].list.len().to_list()
    assert ok["completion_tokens"].to_list() == lengths
    assert max(lengths) <= 16
    assert tok.decode(ok["output_token_ids"][0].to_list(), skip_special_tokens=True).strip() == (
        ok["output_text"][0].strip())

    # Cost per record from the price book, and the summary adds up to the rows.
    price = job.price
    expected_cost = ((ok["prompt_tokens"] - ok["cached_prompt_tokens"]) * price.input_per_1m
                     + ok["cached_prompt_tokens"] * price.cached_rate
                     + ok["completion_tokens"] * price.output_per_1m) / 1e6
    assert (ok["cost_usd"] - expected_cost).abs().max() < 1e-15
    assert summary["cost_usd"] == pytest.approx(results["cost_usd"].sum(), rel=1e-12)
    assert summary["records_in"] == 42 and summary["records_out"] == results.height == 40
    assert summary["records_ok"] == 40 and summary["records_failed"] == summary["records_rejected"] == 2
    assert summary["prompt_tokens"] == results["prompt_tokens"].sum()
    assert summary["completion_tokens"] == results["completion_tokens"].sum()
    assert summary["cached_prompt_tokens"] == results["cached_prompt_tokens"].sum()
    assert summary["errors_by_kind"] == {"empty_input": 2}
    # A first night under this output path: the plan its start made took the job spec's measured output figure
    # (held to this run's max_tokens), not the bound, and was within 20% of what the engine wrote.
    check = summary["plan_check"]["output_tokens"]
    assert check["actual"] == summary["completion_tokens"] and abs(check["error_pct"]) <= 20, check
    # What the same tokens would have cost at each dated hosted price in the book.
    mini = summary["hosted_comparison"]["openai-batch-gpt-4o-mini"]
    assert mini["cost_usd"] == pytest.approx((summary["prompt_tokens"] * 0.075 + summary["completion_tokens"] * 0.30)
                                             / 1e6)
    assert mini["times_run_cost"] == pytest.approx(mini["cost_usd"] / summary["cost_usd"])
    assert set(summary["hosted_comparison"]) == set(job.hosted)
    assert set(results["model"].unique()) == {"SmolLM2-135M-Instruct"}
    assert set(results["run_id"].unique()) == {"e2e"}
    assert summary["engine_start_s"] > 0 and summary["output_tokens_per_s"] > 0
    # The profile says `auto`: the engine's node chose from its CPU flags, and the summary says which.
    assert job.engine.engine_args.dtype == "auto"
    assert summary["engine_dtype"] == generate.engine_dtype(job.engine) in ("bfloat16", "float32")
    assert f"{summary['engine_dtype']})" in printed.out
    assert results.columns[:4] == ["ticket_id", "channel", "customer_tier", "true_category"]

    # Credentials came from the environment and are printed nowhere.
    summary_text = json.dumps(summary)
    assert S3_SECRET not in printed.out + printed.err + summary_text

    # The same run again resumes the finished run: nothing is redone or written twice.
    assert main(["run", str(JOB), "--run-id", "e2e", "--no-progress", *QUICK_START_ARGS,
                 *[a for o in overrides for a in ("--set", o)]]) == 0
    assert "resumed" in capsys.readouterr().out
    assert [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="out/e2e/")["Contents"]] == keys
    # With --no-resume it is refused; with another spec it is refused rather than mixed.
    assert main(["run", str(JOB), "--run-id", "e2e", "--no-resume", *[a for o in overrides for a in ("--set", o)]]) == 2
    assert "run 'e2e' already exists" in capsys.readouterr().err
    assert main(["run", str(JOB), "--run-id", "e2e", *[a for o in overrides for a in ("--set", o)],
                 "--set", "sampling.max_tokens=5"]) == 2
    assert "was started from another spec" in capsys.readouterr().err
