"""LoRA per job: an adapter in object storage changes what the engine generates, as PEFT would."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import QUICK_START_ARGS

from pipelines.cli import main
from pipelines.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/ticket_triage.yaml"
BUCKET = "tokenmill-lora"
TOKENS = 16


def build_adapter(model_path: Path, out: Path) -> None:
    """A rank-4 PEFT adapter for SmolLM2 with random (not zero) B matrices, so it has an effect."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)


def greedy(model, prompts: list[list[int]], max_tokens: int, eos: int) -> list[list[int]]:
    """transformers' own greedy tokens for each prompt, all in one batch padded on the left, each cut at its end of
    sequence (which it keeps, as vLLM does)."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        done = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)
    out = []
    for row in done[:, width:].tolist():
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


@pytest.mark.engine
def test_adapter_from_s3_changes_the_output_as_peft_does(ray_cluster, s3_env, model_path, tmp_path):
    """One vLLM run with the adapter, checked token for token against transformers with and without it (both in
    float32, as the run): the adapter was loaded and applied as PEFT applies it, and it changed the answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_adapter(model_path, tmp_path / "adapter")
    client = s3_env.client()
    client.create_bucket(Bucket=BUCKET)
    for f in (tmp_path / "adapter").iterdir():
        client.upload_file(str(f), BUCKET, f"adapters/ticket-tone/{f.name}")
    (tmp_path / "input").mkdir()
    first = sorted((REPO / "data/samples/tickets").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).slice(0, 16), tmp_path / "input" / "part-0.parquet")

    sets = [f"input.path={tmp_path / 'input'}", f"output.path={tmp_path / 'out'}", f"sampling.max_tokens={TOKENS}",
            f"lora.path=s3://{BUCKET}/adapters/ticket-tone", "output.include_token_ids=true"]
    assert main(["run", str(JOB), "--run-id", "tuned", "--no-progress", *QUICK_START_ARGS,
                 "--engine-set", "engine_args.dtype=float32", *[a for s in sets for a in ("--set", s)]]) == 0
    summary = json.loads((tmp_path / "out/tuned/summary.json").read_text())
    tuned = pl.read_parquet(summary["output"]["results"]).sort("ticket_id")
    assert tuned.height == 16 and tuned["error"].null_count() == 16
    assert summary["lora"] == {"uri": f"s3://{BUCKET}/adapters/ticket-tone", "name": "ticket-tone", "rank": 4}

    prompts, got = tuned["prompt_token_ids"].to_list(), tuned["output_token_ids"].to_list()
    eos = AutoTokenizer.from_pretrained(model_path).eos_token_id
    base_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    base = greedy(base_model, prompts, TOKENS, eos)
    adapted = greedy(PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval(), prompts, TOKENS, eos)
    # Two engines' float32 sums may part ways on a near tie, so a row may differ late; most must be exact (all 16
    # were on a 2-core AVX2 machine).
    as_peft = sum(g == p for g, p in zip(got, adapted))
    as_base = sum(g == b for g, b in zip(got, base))
    assert as_peft >= 12, f"only {as_peft} of 16 outputs are PEFT's with the adapter"
    assert as_base <= 4, f"{as_base} of 16 outputs are the base model's: the adapter changed nothing there"


def test_missing_adapter_is_refused_before_work(tmp_path, capsys):
    code = main(["check", str(JOB), "--set", f"lora.path={tmp_path / 'no-adapter'}"])
    assert code == 2
    assert f"lora.path: {tmp_path / 'no-adapter'}/adapter_config.json not found" in capsys.readouterr().err


def test_adapter_rank_maps_to_a_rank_vllm_accepts(tmp_path):
    from pipelines.config.job import LoraSpec
    from pipelines.config.storage import StorageOptions
    from pipelines.models.adapters import check_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12}))
    adapter = check_adapter(LoraSpec(path=str(tmp_path), name="x"), StorageOptions())
    assert adapter.max_lora_rank == 16
    assert adapter.engine_kwargs() == {"enable_lora": True, "max_loras": 1, "max_lora_rank": 16}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 0}))
    with pytest.raises(ConfigError, match="no positive integer rank"):
        check_adapter(LoraSpec(path=str(tmp_path)), StorageOptions())
