"""The Llama 4 path on CPU: the tiny random Llama 4 MoE checkpoint through the same pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import QUICK_START_ARGS

from pipelines.cli import main
from pipelines.config import load_job
from pipelines.models.embedded import prepare

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/ticket_triage.yaml"
MAX_TOKENS = 24


@pytest.mark.engine
def test_ticket_job_on_tiny_llama4_matches_transformers(ray_cluster, tmp_path):
    out = tmp_path / "out"
    code = main(["run", str(JOB), "--run-id", "llama4", "--no-progress", "--set", "engine=cpu-tiny-llama4",
                 *QUICK_START_ARGS,
                 "--set", f"output.path={out}", "--set", "output.include_token_ids=true",
                 "--set", f"sampling.max_tokens={MAX_TOKENS}"])
    assert code == 0
    summary = json.loads((out / "llama4/summary.json").read_text())
    results = pl.read_parquet(summary["output"]["results"])

    # Every record generated and accounted.
    assert summary["records_in"] == summary["records_ok"] == results.height == 300
    assert summary["model"] == "tiny-llama4" and summary["engine"] == "cpu-tiny-llama4"
    assert results["prompt_tokens"].to_list() == results["prompt_token_ids"].list.len().to_list()
    assert results["completion_tokens"].to_list() == results["output_token_ids"].list.len().to_list()
    assert summary["prompt_tokens"] == results["prompt_tokens"].sum()
    assert summary["completion_tokens"] == results["completion_tokens"].sum() > 0
    price = load_job(JOB, overrides=["engine=cpu-tiny-llama4"]).price
    assert summary["cost_usd"] == pytest.approx(
        (summary["prompt_tokens"] * price.input_per_1m + summary["completion_tokens"] * price.output_per_1m) / 1e6)

    # Llama 4's chat format: <|begin_of_text|> then header tokens around each role.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare("tiny-llama4")
    tok = AutoTokenizer.from_pretrained(path)
    first = tok.decode(results["prompt_token_ids"][0].to_list())
    assert first.startswith("<|begin_of_text|><|header_start|>system<|header_end|>")
    assert first.endswith("<|eot|><|header_start|>assistant<|header_end|>\n\n")

    # Greedy tokens equal transformers' own generate on the same weights: the
    # experts were loaded and routed, not merely run. The longest prompts cross
    # the 128-token attention chunk.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    picks = pl.concat([results.head(3), results.sort("prompt_tokens", descending=True).head(2)])
    assert picks["prompt_tokens"].max() + MAX_TOKENS > 128
    for prompt, generated in zip(picks["prompt_token_ids"].to_list(), picks["output_token_ids"].to_list()):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert generated == expected[0, len(prompt):].tolist()
