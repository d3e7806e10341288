"""The generate stage's failure handling, on a stand-in engine (pure logic; the real engine's refusals and deaths
are exercised in tests/io/test_openai_batch.py and tests/run/test_faults.py)."""

from __future__ import annotations

import pytest
from conftest import StandInLLM, stand_in_generator, token_batch

import pipelines.stages.engine as engine
import pipelines.stages.generate as generate
from pipelines import compat

# vLLM's own: the generator recognises a dead engine by its type (through `pipelines.compat`).
EngineDeadError = compat.engine_dead_error()


@pytest.fixture
def generator():
    StandInLLM.starts = 0
    return stand_in_generator()


def test_a_refused_request_is_isolated_and_the_rest_keep_their_outputs(generator):
    out = generator(token_batch([[1], [2], [13], [4], [5]]))
    assert out.column("output_text").to_pylist() == ["t1", "t2", None, "t4", "t5"]
    errors = out.column("error").to_pylist()
    assert errors[2] == "ValueError: grammar error" and errors.count(None) == 4
    assert out.column("error_code").to_pylist() == [None, None, "engine", None, None]
    assert StandInLLM.starts == 1  # a refusal is not a death: no restart


def test_a_poison_request_that_kills_the_engine_is_isolated(generator):
    ids = [[k] for k in range(20, 36)]
    ids[9] = [666]
    out = generator(token_batch(ids))
    errors = out.column("error").to_pylist()
    assert errors[9].startswith("EngineDeadError") and errors.count(None) == 15
    assert out.column("error_code").to_pylist() == [None] * 9 + ["engine"] + [None] * 6
    assert [t for t in out.column("output_text").to_pylist() if t] == [f"t{k}" for k in range(20, 36) if k != 29]
    # One restart for the retry of the whole batch, then one per halving that still holds the poison.
    assert 2 <= StandInLLM.starts - 1 <= 2 * (16).bit_length() + 2


def test_an_engine_that_keeps_dying_gives_up():
    class AlwaysDead(StandInLLM):
        def generate(self, *a, **k):
            raise EngineDeadError("dead again")

        def step(self):
            raise EngineDeadError("dead again")

    with pytest.raises(RuntimeError, match="the engine died too often"):
        stand_in_generator(AlwaysDead)(token_batch([[k] for k in range(1, 9)]))


def test_the_engine_loop_serves_batches_that_overlap_in_order(generator):
    from concurrent.futures import ThreadPoolExecutor

    batches = [[[k] for k in range(b * 100 + 1, b * 100 + 9)] for b in range(1, 5)]
    with ThreadPoolExecutor(2) as pool:  # as the actor runs two calls at once
        outs = list(pool.map(lambda ids: generator(token_batch(ids)), batches))
    for ids, out in zip(batches, outs):
        assert out.column("output_text").to_pylist() == [f"t{i[0]}" for i in ids]
        assert out.column("error").null_count == len(ids)
    assert StandInLLM.starts == 1 and generator.engine.loop._jobs == {}


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
    assert engine.engine_dtype(_profile("cpu", "auto"), flags) == expected


def test_an_explicit_dtype_and_gpu_auto_are_left_to_the_profile_and_vllm():
    assert engine.engine_dtype(_profile("cpu", "bfloat16"), {"avx2"}) == "bfloat16"
    assert engine.engine_dtype(_profile("cpu", "float32"), {"avx512_bf16"}) == "float32"
    assert engine.engine_dtype(_profile("gpu", "auto"), set()) == "auto"


def test_cpu_flags_are_read_from_cpuinfo_on_x86_and_arm():
    x86 = "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n"
    assert engine.cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    assert "bf16" in engine.cpu_flags(arm)
    assert engine.cpu_flags("model name: something\n") == set()


def test_the_engine_process_is_vllms_multiprocessing_switch_and_not_part_of_the_runs_identity():
    from pipelines.config.load import load_job
    from pipelines.errors import ConfigError
    from pipelines.run.runner import spec_fingerprint

    job = load_job("conf/jobs/ticket_triage.yaml")
    assert job.engine.engine_process == "own"  # vLLM's default: the engine's steps overlap the actor's work
    assert engine.actor_env(job.engine)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    quick = load_job("conf/jobs/ticket_triage.yaml", engine_overrides=["engine_process=actor"])
    assert engine.actor_env(quick.engine)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # Where the engine core runs changes no answer: a run resumes across the switch.
    assert spec_fingerprint(quick) == spec_fingerprint(job)
    with pytest.raises(ConfigError, match="VLLM_ENABLE_V1_MULTIPROCESSING is `engine_process`"):
        load_job("conf/jobs/ticket_triage.yaml", engine_overrides=["env.VLLM_ENABLE_V1_MULTIPROCESSING='1'"])
