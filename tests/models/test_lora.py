"""LoRA per job: an adapter in object storage changes what the engine generates."""

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


def run(tmp_path: Path, run_id: str, *overrides: str) -> pl.DataFrame:
    args = ["run", str(JOB), "--run-id", run_id, "--no-progress", "--set", f"input.path={tmp_path / 'input'}",
            "--set", f"output.path={tmp_path / 'out'}", "--set", "sampling.max_tokens=16"]
    assert main([*args, *QUICK_START_ARGS, *[a for o in overrides for a in ("--set", o)]]) == 0
    summary = json.loads((tmp_path / "out" / run_id / "summary.json").read_text())
    return pl.read_parquet(summary["output"]["results"]).sort("ticket_id")


@pytest.mark.engine
def test_adapter_from_s3_changes_the_output(ray_cluster, s3_env, model_path, tmp_path):
    build_adapter(model_path, tmp_path / "adapter")
    client = s3_env.client()
    client.create_bucket(Bucket=BUCKET)
    for f in (tmp_path / "adapter").iterdir():
        client.upload_file(str(f), BUCKET, f"adapters/ticket-tone/{f.name}")
    (tmp_path / "input").mkdir()
    first = sorted((REPO / "data/samples/tickets").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).slice(0, 16), tmp_path / "input" / "part-0.parquet")

    base = run(tmp_path, "base")
    tuned = run(tmp_path, "tuned", f"lora.path=s3://{BUCKET}/adapters/ticket-tone")

    assert base["error"].null_count() == tuned["error"].null_count() == 16
    assert base["ticket_id"].to_list() == tuned["ticket_id"].to_list()
    differing = sum(a != b for a, b in zip(base["output_text"], tuned["output_text"]))
    assert differing >= 12, f"only {differing} of 16 outputs changed with the adapter"
    summary = json.loads((tmp_path / "out/tuned/summary.json").read_text())
    assert summary["lora"] == {"uri": f"s3://{BUCKET}/adapters/ticket-tone", "name": "ticket-tone", "rank": 4}


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
