"""Generate: one Ray actor per engine replica; the stage around its engine (`pipelines.stages.engine`).

The stage decides what the engine is asked (rows without an error, not answered
by the response cache, in a prefix-friendly order) and turns its answers into
columns, one row out per row in; the engine client does the asking.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Protocol

import pyarrow as pa

from pipelines.config.engine import EngineProfile
from pipelines.config.job import SamplingSpec
from pipelines.config.prices import ModelPrice
from pipelines.config.storage import StorageOptions
from pipelines.io.response_cache import ResponseCache, identity_digest, request_key
from pipelines.models import resolve_engine_paths
from pipelines.models.adapters import Adapter, local_adapter
from pipelines.schema import Reason
from pipelines.stages.account import tokens_cost
from pipelines.stages.engine import (
    EngineClient,
    EngineFactory,
    apply_profile_env,
    engine_dtype,
    lora_request_for,
    peak_memory_mb,
    request_sampling_params,
)

log = logging.getLogger(__name__)


class Ledger(Protocol):
    """Where a replica keeps its time (`pipelines.run.ledger.ReplicaLedger`): the run's bill is made from it."""

    def ready(self, engine_start_s: float, *, dtype: str | None = None) -> None: ...

    def batch(self, start: float, end: float, rows: int, output_tokens: int, **profile: float | None) -> None: ...


class LedgerFactory(Protocol):
    """Makes each replica's ledger entry, in the replica, from its profile's name: the run hands one in."""

    def __call__(self, *, profile: str) -> Ledger: ...


class GenerateStage:
    """The generate stage, a Ray Data callable class: one engine replica.

    Rows that already carry an `error_code` are not sent to the engine. Adds
    `output_text`, `finish_reason`, `completion_tokens`, `cached_prompt_tokens`,
    `output_token_ids`, `generated_at`, `cached`, `cache_key` and, with
    `logprobs`, `output_logprob` (the sum of the sampled tokens' logprobs); one
    row out per row in. A `request_params` column (JSON, per row) overrides the
    sampling for its row.

    With a response cache, a request answered before (in an earlier run, or
    earlier in this one) is not generated again: its answer is copied and
    `cached` is true. Identical requests within a run are generated once. The
    write stage stores new answers (`pipelines.io.response_cache.store_batch`).
    """

    def __init__(self, *, profile: dict[str, Any], sampling: dict[str, Any], ledger: LedgerFactory | None = None,
                 adapter: Adapter | None = None, storage: StorageOptions | None = None,
                 structured: dict[str, Any] | None = None, logprobs: bool = False,
                 cache: dict[str, Any] | None = None, engine: EngineFactory = EngineClient,
                 budget: dict[str, Any] | None = None):
        """`engine` makes the replica's engine client (`pipelines.stages.engine.EngineClient`, or a stand-in
        with the same methods); `budget`, where the job has one, is the run's keeper (`pipelines.run.budget`) and
        the price its worst cases are reckoned at; the other arguments are the job's, as
        `pipelines.stages.processor` passes them."""
        self.profile = EngineProfile.model_validate(profile)
        apply_profile_env(self.profile)
        self.budget = budget["keeper"] if budget else None
        self.price = ModelPrice.model_validate(budget["price"]) if budget else None
        self.replica = uuid.uuid4().hex[:12]
        if self.budget is not None:  # billed from its creation, as the ledger bills it
            self.budget.replica_started.remote(self.replica, time.time())
        self.dtype = engine_dtype(self.profile)
        # The response cache (`pipelines.io.response_cache`): its folder, and the digest of what decides an answer. Where
        # this node chose the dtype (`auto` on CPU), the choice is part of it: answers differ between dtypes.
        self.cache = ResponseCache(cache["fs"], cache["root"]) if cache else None
        self.identity = cache["identity"] if cache else None
        if self.identity is not None and self.dtype != self.profile.engine_args.dtype:
            self.identity = identity_digest({"job": self.identity, "dtype": self.dtype})
        self.cache_read = bool(cache and cache.get("read", True))
        self._cache_lock = threading.Lock()
        self._memo: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._inflight: dict[str, Future] = {}
        # Before anything slow: the replica is billed from its creation.
        self.ledger = ledger(profile=self.profile.name) if ledger else None
        model_path, tokenizer_path = resolve_engine_paths(self.profile.model, self.profile.tokenizer)
        lora_request = None
        extra: dict[str, Any] = {}
        if adapter is not None:
            lora_request = lora_request_for(adapter.name, local_adapter(adapter, storage or StorageOptions()))
            extra = adapter.engine_kwargs()
        ready = self.ledger.ready if self.ledger is not None else None
        self.engine = engine(self.profile, model_path=model_path, tokenizer_path=tokenizer_path, extra=extra,
                             lora_request=lora_request, on_ready=ready)
        self.sampling = SamplingSpec.model_validate(sampling)
        self.params = self.engine.sampling_params(self.sampling, structured=structured, logprobs=logprobs)
        self.logprobs = logprobs
        if self.cache is None:
            self.engine.start()
        # With a cache the engine starts with the first request the cache cannot answer: a run the cache
        # answers whole never loads the model.

    def __del__(self) -> None:
        # Ray Data drops the UDF when the pool shuts down gracefully; stopping the
        # engine core here spares its "exited unexpectedly" clean-up and leaked
        # shared-memory warnings when the actor process exits.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def _cache_plan(self, cache: ResponseCache, keys: list[str]) -> tuple[list[int], dict[int, int], dict[int, Future], dict[int, dict]]:
        """Which of a batch's requests (by position) to generate; which copy an earlier one of the batch; which
        wait for another batch that is generating the same request; and the answers already known (this
        replica's recent answers, then the cache's store)."""
        found: dict[int, dict] = {}
        copies: dict[int, int] = {}
        waits: dict[int, Future] = {}
        first: dict[str, int] = {}
        lookup: list[int] = []
        with self._cache_lock:
            for k, key in enumerate(keys):
                if key in first:
                    copies[k] = first[key]
                    continue
                first[key] = k
                if key in self._memo:
                    found[k] = self._memo[key]
                elif key in self._inflight:
                    waits[k] = self._inflight[key]
                else:
                    lookup.append(k)
        stored = cache.get_many([keys[k] for k in lookup])
        send: list[int] = []
        with self._cache_lock:
            for k in lookup:
                if keys[k] in stored:
                    found[k] = stored[keys[k]]
                elif keys[k] in self._inflight:
                    waits[k] = self._inflight[keys[k]]
                else:
                    self._inflight[keys[k]] = Future()
                    send.append(k)
        return send, copies, waits, found

    def _cache_done(self, key: str, entry: dict | None, error: str | None) -> None:
        """A request generated (or failed): remembered for the rest of the run, and any batch waiting for it
        told."""
        with self._cache_lock:
            if entry is not None:
                self._memo[key] = entry
                while len(self._memo) > MEMO_ENTRIES:
                    self._memo.popitem(last=False)
            future = self._inflight.pop(key, None)
        if future is not None:
            future.set_result((entry, error))

    def __call__(self, batch: pa.Table) -> pa.Table:
        codes = batch.column("error_code").to_pylist()
        errors = batch.column("error").to_pylist()
        todo = [i for i, c in enumerate(codes) if c is None]
        n = batch.num_rows
        prompt_tokens = batch.column("prompt_tokens").to_pylist()
        rows: list[dict | None] = [None] * n  # each answered row's entry (`pipelines.io.response_cache.ENTRY_FIELDS`)
        from_cache = [False] * n
        keys: list[str | None] = [None] * n
        has_images = "image" in batch.column_names
        cache = getattr(self, "cache", None)

        started = time.time()
        sent = generated_tokens = 0
        if todo:
            prompts = batch.column("prompt_token_ids").take(todo).to_pylist()
            images = batch.column("image").take(todo).to_pylist() if has_images else None
            raw_params = (batch.column("request_params").take(todo).to_pylist()
                          if "request_params" in batch.column_names else None)
            params = [self.params] * len(todo)
            if raw_params is not None:
                params = request_sampling_params(self.sampling, raw_params, self.params,
                                                 make=self.engine.sampling_params)
            send: list[int] = list(range(len(todo)))
            copies: dict[int, int] = {}
            waits: dict[int, Future] = {}
            found: dict[int, dict] = {}
            todo_keys: list[str] = []
            if cache is not None and self.identity is not None:
                todo_keys = [request_key(self.identity, prompts[k], image=images[k] if images else None,
                                         request_params=raw_params[k] if raw_params else None)
                             for k in range(len(todo))]
                for k, i in enumerate(todo):
                    keys[i] = todo_keys[k]
                if self.cache_read:
                    send, copies, waits, found = self._cache_plan(cache, todo_keys)
            reservation = None
            if send and self.budget is not None:
                reservation = self._reserve([prompts[k] for k in send], [params[k] for k in send])
                if reservation is None:  # the budget is spent: these rows are left for a resume
                    for k in send:
                        codes[todo[k]], errors[todo[k]] = Reason.BUDGET, NOT_SENT
                        if todo_keys and self.cache_read:
                            self._cache_done(todo_keys[k], None, NOT_SENT)
                    send = []
            if send and self.engine.start():
                started = time.time()  # the engine's start-up is its own line, not this batch's work
            if self.profile.engine_args.enable_prefix_caching:
                send = [send[j] for j in prefix_order([prompts[k] for k in send], self.profile.kv_block_size)]
            done, failed = (self.engine.generate([prompts[k] for k in send], [params[k] for k in send],
                                                 [images[k] for k in send] if images else None)
                            if send else ({}, {}))
            at = int(time.time() * 1e6)
            sent = len(send)
            for j, k in enumerate(send):
                i = todo[k]
                entry = _entry(done[j], at, self.logprobs) if j in done else None
                rows[i] = entry
                errors[i] = failed.get(j) if entry is None else None
                codes[i] = Reason.ENGINE if errors[i] is not None else None
                generated_tokens += entry["completion_tokens"] if entry else 0
                if todo_keys and self.cache_read:
                    self._cache_done(todo_keys[k], entry, errors[i])
            for k, entry in found.items():
                rows[todo[k]], from_cache[todo[k]] = entry, True
            if reservation is not None:
                self._settle(reservation, [done[j] for j in sorted(done)], generated_tokens, time.time() - started,
                             len(send))
            for k, future in waits.items():
                entry, error = future.result()
                rows[todo[k]], errors[todo[k]], from_cache[todo[k]] = entry, error, entry is not None
                codes[todo[k]] = None if error is None else Reason.BUDGET if error == NOT_SENT else Reason.ENGINE
            for k, source in copies.items():
                i, src = todo[k], todo[source]
                rows[i], errors[i], from_cache[i] = rows[src], errors[src], rows[src] is not None
                codes[i] = codes[src]
        ended = time.time()
        if self.ledger is not None and sent:
            self.ledger.batch(started, ended, sent, generated_tokens,
                              engine_idle_s=round(self.engine.idle_s, 3),
                              **peak_memory_mb())

        def col(name):
            return [r[name] if r is not None else None for r in rows]

        # The engine's count where it answered: with an image it includes the image's tokens.
        tokens = [r["prompt_tokens"] if r is not None else p for r, p in zip(rows, prompt_tokens)]
        drop = ["error_code", "error", "prompt_tokens", *(["image"] if has_images else [])]
        result = batch.drop_columns(drop)
        result = result.append_column("prompt_tokens", pa.array(tokens, pa.int64()))
        result = result.append_column("output_text", pa.array(col("output_text"), pa.string()))
        result = result.append_column("finish_reason", pa.array(col("finish_reason"), pa.string()))
        result = result.append_column("completion_tokens", pa.array(col("completion_tokens"), pa.int64()))
        result = result.append_column("cached_prompt_tokens", pa.array(col("cached_prompt_tokens"), pa.int64()))
        result = result.append_column("output_token_ids", pa.array(col("output_token_ids"), pa.list_(pa.int32())))
        if self.logprobs:
            result = result.append_column("output_logprob", pa.array(col("output_logprob"), pa.float64()))
        result = result.append_column("error_code", pa.array(codes, pa.string()))
        result = result.append_column("error", pa.array(errors, pa.string()))
        result = result.append_column("generated_at", pa.array(col("generated_at"), pa.timestamp("us", tz="UTC")))
        result = result.append_column("cached", pa.array(from_cache, pa.bool_()))
        result = result.append_column("cache_key", pa.array(keys, pa.string()))
        assert result.num_rows == n, "GenerateStage must map each row to exactly one row"
        return result


    def _reserve(self, prompts: list[list[int]], params: list) -> str | None:
        """Ask the run's budget for a batch at its worst case: every prompt token uncached, every row at its
        max_tokens. The reservation's key, or None when the budget is spent."""
        import ray

        assert self.budget is not None and self.price is not None
        tokens = sum(int(getattr(p, "max_tokens", None) or self.sampling.max_tokens) for p in params)
        usd = tokens_cost(sum(len(p) for p in prompts), 0, tokens, self.price)
        key = uuid.uuid4().hex
        return key if ray.get(self.budget.reserve.remote(key, usd, tokens)) else None

    def _settle(self, key: str, answers: list, tokens: int, seconds: float, rows: int) -> None:
        assert self.budget is not None and self.price is not None
        usd = sum(tokens_cost(len(a.prompt_token_ids), a.num_cached_tokens or 0, len(a.outputs[0].token_ids),
                              self.price) for a in answers)
        self.budget.settle.remote(key, usd, tokens, seconds, rows)


def prefix_order(prompts: list[list[int]], block: int) -> list[int]:
    """An order for a batch's requests in which vLLM's prefix cache hits: positions into `prompts`.

    The engine only reuses whole KV blocks of a prefix it has finished
    computing, and requests admitted in the same step cannot share. So requests
    sharing at least one block with another are grouped (by sorting the token
    ids), one of each group goes first, and the rest follow after all the
    groups' first members, by when the shared blocks are in the cache.
    """
    if len(prompts) < 2:
        return list(range(len(prompts)))
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    leaders, followers = [order[0]], list[int]()
    for prev, cur in zip(order, order[1:]):
        a, b = prompts[prev], prompts[cur]
        n = min(len(a), len(b), block)
        shares = n == block and a[:block] == b[:block]
        (followers if shares else leaders).append(cur)
    return leaders + followers


# Answers a replica remembers for requests repeated later in the same run, before the cache's store has them.
MEMO_ENTRIES = 4096
NOT_SENT = "not sent: the run's budget is spent (budget: in the spec); a run with a higher cap resumes it"


def _entry(out, generated_at_us: int, logprobs: bool) -> dict[str, Any]:
    """One engine answer as the generator's columns (and a cache entry)."""
    c = out.outputs[0]
    return {
        "output_text": c.text,
        "finish_reason": c.finish_reason,
        "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(c.token_ids),
        "cached_prompt_tokens": out.num_cached_tokens,
        "output_token_ids": list(c.token_ids),
        "output_logprob": c.cumulative_logprob if logprobs else None,
        "generated_at": generated_at_us,
    }
