"""The generator's failure handling, on a stand-in engine (pure logic; the real engine's refusals and deaths
are exercised in test_openai_batch.py and test_faults.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest

import pipelines.stages.generate as generate
from pipelines import compat
from pipelines.config.job import SamplingSpec
from pipelines.stages.generate import VLLMGenerator

# vLLM's own: the generator recognises a dead engine by its type (through `pipelines.compat`).
EngineDeadError = compat.engine_dead_error()


class StandInEngine:
    """Answers each prompt with its first token; dies on a poison prompt, refuses an invalid one."""

    starts = 0

    def __init__(self):
        StandInEngine.starts += 1
        self.dead = False

        self.llm_engine = self  # the engine loop steps `llm.llm_engine`
        self.pending: dict[str, list[int]] = {}
        self.counter = 0

    @staticmethod
    def _answer(i, request_id="0"):
        return SimpleNamespace(request_id=request_id, finished=True, prompt_token_ids=i, num_cached_tokens=0,
                               outputs=[SimpleNamespace(text=f"t{i[0]}", finish_reason="stop", token_ids=[i[0]],
                                                        cumulative_logprob=None)])

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        ids = [p["prompt_token_ids"] for p in prompts]
        if self.dead or [666] in ids:
            self.dead = True
            raise EngineDeadError("EngineCore encountered an issue")
        if [13] in ids:
            raise ValueError("grammar error")
        return [self._answer(i) for i in ids]

    # The engine loop's interface: LLM.enqueue, then LLMEngine.step until nothing is unfinished.
    def enqueue(self, prompts, params, lora_request=None, use_tqdm=False):
        ids = [p["prompt_token_ids"] for p in prompts]
        if [13] in ids:
            raise ValueError("grammar error")
        rids = []
        for i in ids:
            self.counter += 1
            self.pending[str(self.counter)] = i
            rids.append(f"{self.counter}-a1b2c3d4")  # as vLLM: internal ids; outputs carry the first part
        return rids

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        if self.dead or [666] in self.pending.values():
            self.dead = True
            raise EngineDeadError("EngineCore encountered an issue")
        # One request finishes per step, the newest first: outputs come back out of order.
        rid, i = self.pending.popitem()
        return [self._answer(i, rid)]

    def abort_request(self, request_ids, internal=False):
        for rid in request_ids:
            self.pending.pop(compat.output_request_id(rid), None)


@pytest.fixture
def generator(monkeypatch):
    StandInEngine.starts = 0
    monkeypatch.setattr(generate, "make_llm", lambda *a, **k: StandInEngine())
    monkeypatch.setattr(generate, "tokens_prompt", lambda ids, image=None: {"prompt_token_ids": ids})
    g = VLLMGenerator.__new__(VLLMGenerator)  # no real engine: only __call__'s logic is under test
    g.profile = SimpleNamespace(name="stand-in", engine_args=SimpleNamespace(enable_prefix_caching=True), kv_block_size=2)
    g._engine_args = (None, None, None, {})
    g.llm = StandInEngine()
    g.lora_request, g.logprobs, g.ledger = None, False, None
    g.sampling = SamplingSpec()
    g.params = object()
    g.loop = generate.EngineLoop(g)
    return g


def batch(ids: list[list[int]]) -> pa.Table:
    return pa.table({"prompt_token_ids": pa.array(ids, pa.list_(pa.int32())),
                     "prompt_tokens": pa.array([len(i) for i in ids], pa.int64()),
                     "error_code": pa.array([None] * len(ids), pa.string()),
                     "error": pa.array([None] * len(ids), pa.string())})


def test_a_refused_request_is_isolated_and_the_rest_keep_their_outputs(generator):
    out = generator(batch([[1], [2], [13], [4], [5]]))
    assert out.column("output_text").to_pylist() == ["t1", "t2", None, "t4", "t5"]
    errors = out.column("error").to_pylist()
    assert errors[2] == "ValueError: grammar error" and errors.count(None) == 4
    assert out.column("error_code").to_pylist() == [None, None, "engine", None, None]
    assert StandInEngine.starts == 1  # a refusal is not a death: no restart


def test_a_poison_request_that_kills_the_engine_is_isolated(generator):
    ids = [[k] for k in range(20, 36)]
    ids[9] = [666]
    out = generator(batch(ids))
    errors = out.column("error").to_pylist()
    assert errors[9].startswith("EngineDeadError") and errors.count(None) == 15
    assert out.column("error_code").to_pylist() == [None] * 9 + ["engine"] + [None] * 6
    assert [t for t in out.column("output_text").to_pylist() if t] == [f"t{k}" for k in range(20, 36) if k != 29]
    # One restart for the retry of the whole batch, then one per halving that still holds the poison.
    assert 2 <= StandInEngine.starts - 1 <= 2 * (16).bit_length() + 2


def test_an_engine_that_keeps_dying_gives_up(generator, monkeypatch):
    class AlwaysDead(StandInEngine):
        def generate(self, *a, **k):
            raise EngineDeadError("dead again")

        def step(self):
            raise EngineDeadError("dead again")

    monkeypatch.setattr(generate, "make_llm", lambda *a, **k: AlwaysDead())
    generator.llm = AlwaysDead()
    with pytest.raises(RuntimeError, match="the engine died too often"):
        generator(batch([[k] for k in range(1, 9)]))


def test_the_engine_loop_serves_batches_that_overlap_in_order(generator):
    from concurrent.futures import ThreadPoolExecutor

    batches = [[[k] for k in range(b * 100 + 1, b * 100 + 9)] for b in range(1, 5)]
    with ThreadPoolExecutor(2) as pool:  # as the actor runs two calls at once
        outs = list(pool.map(lambda ids: generator(batch(ids)), batches))
    for ids, out in zip(batches, outs):
        assert out.column("output_text").to_pylist() == [f"t{i[0]}" for i in ids]
        assert out.column("error").null_count == len(ids)
    assert StandInEngine.starts == 1 and generator.loop._jobs == {}


def test_prefix_order_puts_one_of_each_shared_prefix_first_and_its_followers_after():
    a, b = [1, 2, 3, 4], [7, 7, 7, 7]
    prompts = [a + [9], [5, 6], b + [1], a + [8], b + [2], a + [7], [5, 0]]
    order = generate.prefix_order(prompts, block=4)
    assert sorted(order) == list(range(len(prompts)))
    firsts = order[:4]  # one per group of shared whole blocks, and each prompt that shares none
    assert {tuple(prompts[i][:4]) for i in firsts if len(prompts[i]) > 4} == {tuple(a), tuple(b)}
    assert {1, 6} <= set(firsts)
    # The followers come after every leader, grouped by prefix.
    assert [prompts[i][:4] for i in order[4:]] == [a, a, b]
    assert generate.prefix_order([[1]], block=4) == [0]


def _profile(device: str, dtype: str):
    from pipelines.config.engine import EngineProfile

    return EngineProfile.model_validate({
        "name": "p", "model": "m", "device": device, "engine_args": {"dtype": dtype, "max_model_len": 64},
        **({"resources": {"num_gpus": 1}} if device == "gpu" else {})})


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx512f", "avx512_bf16"}, "bfloat16"),  # Cooper Lake and later
    ({"avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),  # Sapphire Rapids
    ({"fp", "asimd", "bf16"}, "bfloat16"),  # Arm v8.6
    ({"avx512f", "avx512bw", "avx512_vnni"}, "float32"),  # AVX-512 without bf16: emulated, 3.6x slower
    ({"avx2", "fma"}, "float32"),
    (set(), "float32"),
])
def test_auto_dtype_on_cpu_follows_native_bf16(flags, expected):
    assert generate.engine_dtype(_profile("cpu", "auto"), flags) == expected


def test_an_explicit_dtype_and_gpu_auto_are_left_to_the_profile_and_vllm():
    assert generate.engine_dtype(_profile("cpu", "bfloat16"), {"avx2"}) == "bfloat16"
    assert generate.engine_dtype(_profile("cpu", "float32"), {"avx512_bf16"}) == "float32"
    assert generate.engine_dtype(_profile("gpu", "auto"), set()) == "auto"


def test_cpu_flags_are_read_from_cpuinfo_on_x86_and_arm():
    x86 = "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n"
    assert generate.cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    assert "bf16" in generate.cpu_flags(arm)
    assert generate.cpu_flags("model name: something\n") == set()
