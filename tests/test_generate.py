"""The generator's failure handling, on a stand-in engine (pure logic; the real engine's refusals and deaths
are exercised in test_openai_batch.py and test_faults.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest

import pipelines.generate as generate
from pipelines.config.job import SamplingSpec
from pipelines.generate import VLLMGenerator


class EngineDeadError(Exception):
    """Named like vLLM's: the generator recognises a dead engine by this name."""


class StandInEngine:
    """Answers each prompt with its first token; dies on a poison prompt, refuses an invalid one."""

    starts = 0

    def __init__(self):
        StandInEngine.starts += 1
        self.dead = False

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        ids = [p["prompt_token_ids"] for p in prompts]
        if self.dead or [666] in ids:
            self.dead = True
            raise EngineDeadError("EngineCore encountered an issue")
        if [13] in ids:
            raise ValueError("grammar error")
        return [SimpleNamespace(prompt_token_ids=i, num_cached_tokens=0, outputs=[SimpleNamespace(
            text=f"t{i[0]}", finish_reason="stop", token_ids=[i[0]], cumulative_logprob=None)]) for i in ids]


@pytest.fixture
def generator(monkeypatch):
    StandInEngine.starts = 0
    monkeypatch.setattr(generate, "make_llm", lambda *a, **k: StandInEngine())
    monkeypatch.setattr(generate, "tokens_prompt", lambda ids, image=None: {"prompt_token_ids": ids})
    g = VLLMGenerator.__new__(VLLMGenerator)  # no real engine: only __call__'s logic is under test
    g.profile = SimpleNamespace(name="stand-in")
    g._engine_args = (None, None, None, {})
    g.llm = StandInEngine()
    g.lora_request, g.logprobs, g.ledger = None, False, None
    g.sampling = SamplingSpec()
    g.params = object()
    return g


def batch(ids: list[list[int]]) -> pa.Table:
    return pa.table({"prompt_token_ids": pa.array(ids, pa.list_(pa.int32())),
                     "prompt_tokens": pa.array([len(i) for i in ids], pa.int64()),
                     "error": pa.array([None] * len(ids), pa.string())})


def test_a_refused_request_is_isolated_and_the_rest_keep_their_outputs(generator):
    out = generator(batch([[1], [2], [13], [4], [5]]))
    assert out.column("output_text").to_pylist() == ["t1", "t2", None, "t4", "t5"]
    errors = out.column("error").to_pylist()
    assert errors[2] == "engine: ValueError: grammar error" and errors.count(None) == 4
    assert StandInEngine.starts == 1  # a refusal is not a death: no restart


def test_a_poison_request_that_kills_the_engine_is_isolated(generator):
    ids = [[k] for k in range(20, 36)]
    ids[9] = [666]
    out = generator(batch(ids))
    errors = out.column("error").to_pylist()
    assert errors[9].startswith("engine: EngineDeadError") and errors.count(None) == 15
    assert [t for t in out.column("output_text").to_pylist() if t] == [f"t{k}" for k in range(20, 36) if k != 29]
    # One restart for the retry of the whole batch, then one per halving that still holds the poison.
    assert 2 <= StandInEngine.starts - 1 <= 2 * (16).bit_length() + 2


def test_an_engine_that_keeps_dying_gives_up(generator, monkeypatch):
    class AlwaysDead(StandInEngine):
        def generate(self, *a, **k):
            raise EngineDeadError("dead again")

    monkeypatch.setattr(generate, "make_llm", lambda *a, **k: AlwaysDead())
    generator.llm = AlwaysDead()
    with pytest.raises(RuntimeError, match="the engine died too often"):
        generator(batch([[k] for k in range(1, 9)]))
