"""Generate: one Ray actor per engine replica, each holding one `vllm.LLM`.

This is the only module that imports vLLM.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NoReturn, Protocol

import pyarrow as pa

from pipelines import compat
from pipelines.config.engine import EngineProfile
from pipelines.config.job import SamplingSpec
from pipelines.config.storage import StorageOptions
from pipelines.errors import ConfigError
from pipelines.io.response_cache import ResponseCache, identity_digest, request_key
from pipelines.models import resolve_engine_paths
from pipelines.models.adapters import Adapter, local_adapter
from pipelines.paths import tokenmill_home
from pipelines.schema import Reason

log = logging.getLogger(__name__)


def vllm_engine_args(profile: EngineProfile, source: str):
    """The profile's engine arguments as vLLM's own `EngineArgs`, checked by vLLM's CLI parser.

    Going through the parser (rather than building the dataclass) checks each
    name, type and choice (quantization, KV-cache dtype, executor backend, ...)
    against the installed vLLM without starting an engine.
    """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Refusing(FlexibleArgumentParser):
        def error(self, message: str) -> NoReturn:  # argparse would print and exit
            raise ConfigError(f"{source}: engine_args: vLLM refuses them: {message}")

    parser = EngineArgs.add_cli_args(Refusing(prog="vllm"))
    fail = parser.error
    flags = compat.parser_flags(parser)
    argv = ["--model", profile.model]
    for key, value in profile.engine_args.to_vllm_kwargs().items():
        flag = "--" + key.replace("_", "-")
        if flag not in flags:
            fail(f"unknown vLLM engine argument {key!r}")
        if isinstance(value, bool):
            negative = "--no-" + key.replace("_", "-")
            if value:
                argv.append(flag)
            elif negative in flags:
                argv.append(negative)
        elif isinstance(value, (dict, list)):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return EngineArgs.from_cli_args(parser.parse_args(argv))


def actor_env(profile: EngineProfile) -> dict[str, str]:
    """Environment variables the engine actors start with.

    On CPU: a KV-cache size vLLM accepts on small machines, the Intel OpenMP
    runtime preloaded (with it the engine uses every core; without, one idles),
    and vLLM's compile cache inside tokenmill's cache folder.
    """
    env = {"VLLM_CACHE_ROOT": str(tokenmill_home() / "vllm"), "TOKENIZERS_PARALLELISM": "false"}
    if profile.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = "2"
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.is_file():
            env["LD_PRELOAD"] = str(iomp)
    env.update(profile.env)
    return env


def bind_cpu_threads(env) -> None:
    """Give a CPU engine every core this process may run on, one thread bound to each, in `env` (a dict or
    `os.environ`); a thread binding already there stays. Ray caps OMP_NUM_THREADS at an actor's num_cpus."""
    cores = sorted(os.sched_getaffinity(0))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
    env["OMP_NUM_THREADS"] = str(len(cores))


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags as Linux lists them (`flags` on x86, `Features` on Arm); empty where unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


# Flags that mean the CPU computes in bf16 itself; without them bf16 is emulated, several times slower than
# float32 (59 against 213 output tokens/s for SmolLM2 on a 2-core AVX-512 machine without avx512_bf16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def engine_dtype(profile: EngineProfile, flags: set[str] | None = None) -> str:
    """The dtype the engine runs in: the profile's, except `auto` on CPU, which is bfloat16 where this CPU
    has native bf16 and float32 elsewhere. Decided where the engine starts, since a cluster's nodes differ."""
    dtype = profile.engine_args.dtype
    if profile.device != "cpu" or dtype != "auto":
        return dtype
    return "bfloat16" if NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags) else "float32"


def make_llm(profile: EngineProfile, model_path: str, tokenizer_path: str, **extra: Any):
    """A `vllm.LLM` for the profile (in the calling process); `extra` adds engine arguments (LoRA's)."""
    if profile.device == "cpu":
        bind_cpu_threads(os.environ)
    from vllm import LLM

    kwargs = {**profile.engine_args.to_vllm_kwargs(), "dtype": engine_dtype(profile), **extra}
    return LLM(model=model_path, tokenizer=tokenizer_path, **kwargs)


def structured_outputs(spec) -> dict[str, Any] | None:
    """The job's decoding constraint as `StructuredOutputsParams` keywords: the labels, or the JSON Schema."""
    if spec.task == "classify":
        return {"choice": spec.classify.names}
    if spec.task == "extract":
        return {"json": spec.extract.schema_dict}
    return None


def sampling_params(spec: SamplingSpec, *, structured: dict[str, Any] | None = None, logprobs: bool = False):
    """vLLM `SamplingParams` for the spec; `structured` constrains decoding, `logprobs` returns the sampled
    tokens' logprobs (taken after the constraint's mask, so they are the constrained distribution's)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        **spec.model_dump(exclude_none=True),
        detokenize=True,
        structured_outputs=StructuredOutputsParams(**structured) if structured else None,
        logprobs=0 if logprobs else None,
    )


def request_sampling_params(base: SamplingSpec, request_params: list[str | None], default):
    """Per-row `SamplingParams`: a row's JSON overrides (OpenAI batch requests) over the job's sampling."""
    out = []
    for raw in request_params:
        if raw is None:
            out.append(default)
            continue
        params = json.loads(raw)
        structured = params.pop("structured", None)
        out.append(sampling_params(SamplingSpec.model_validate({**base.model_dump(), **params}), structured=structured))
    return out


def tokens_prompt(ids: list[int], image: bytes | None = None):
    """A vLLM prompt of token ids, with its image (which the engine expands into image tokens)."""
    from vllm.inputs import TokensPrompt

    if image is None:
        return TokensPrompt(prompt_token_ids=ids)
    from PIL import Image

    return TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": Image.open(io.BytesIO(image)).convert("RGB")})


def generate_ids(llm, prompt_token_ids: list[list[int]], params, *, images: list[bytes | None] | None = None,
                 lora_request=None) -> list[Any]:
    """Run the engine on token-id prompts; one `RequestOutput` per prompt, in order."""
    images = images or [None] * len(prompt_token_ids)
    prompts = [tokens_prompt(ids, image) for ids, image in zip(prompt_token_ids, images)]
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
    if len(outputs) != len(prompt_token_ids):
        raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(prompt_token_ids)} prompts")
    return outputs


def vm_hwm_mb(pid: int | str) -> float:
    """A process's peak resident memory (Linux `VmHWM`), MiB; 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (the engine actor) and of its children (vLLM's engine core and
    workers), and the actor's CPU seconds, for the ledger: the bench checks that neither memory grows with
    the number of rows, and profiles where the time goes."""
    import psutil

    me = psutil.Process()
    cpu = me.cpu_times()
    return {"actor_peak_rss_mb": round(vm_hwm_mb("self"), 1),
            "engine_peak_rss_mb": round(sum(vm_hwm_mb(c.pid) for c in me.children(recursive=True)), 1),
            # The actor's own CPU (batches in and out, the engine loop, detokenizing), not the engine's.
            "actor_cpu_s": round(cpu.user + cpu.system, 2)}


class EngineLoop:
    """Keeps one engine busy across batches: requests of the next batch join while the last ones finish.

    `LLM.generate` adds a batch, then steps the engine until the batch is done, so
    the engine runs ever fewer sequences at the end of each batch and nothing
    between batches (about 7% of throughput on CPU with batches of 256). Here a
    thread owns the engine: it adds each submitted batch as soon as it arrives
    (`LLM.enqueue`) and steps while any request is unfinished. Callers wait on
    a future with their batch's outputs in order. The actor runs two calls at
    once (`max_concurrent_calls_per_actor=2`), so one batch waits while another
    runs. `lock` is held for every touch of the engine, so the generator's
    fallback path (splitting a failed batch, restarting a dead engine) can take
    the engine over.
    """

    def __init__(self, owner: "VLLMGenerator") -> None:
        self.owner = owner  # the engine is `owner.llm`: a restart replaces it
        self.lock = threading.Lock()
        self.inbox: queue.Queue = queue.Queue()
        # Seconds the engine waited for work after its first batch: the gaps between batches.
        self.idle_s = 0.0
        self._jobs: dict[str, tuple[Future, list, int, str]] = {}
        self._waiting: dict[int, int] = {}
        self._thread: threading.Thread | None = None

    def submit(self, prompts: list, params: list, lora_request=None) -> Future:
        future: Future = Future()
        self.inbox.put((prompts, params, lora_request, future))
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="tokenmill-engine-loop", daemon=True)
            self._thread.start()
        return future

    def fail_all(self, exc: BaseException) -> None:
        """Hand every batch under way back to its caller (call with `lock` held): the engine failed or was
        replaced, so their requests will not finish."""
        try:
            self.owner.llm.llm_engine.abort_request([job[3] for job in self._jobs.values()], internal=True)
        except Exception:  # noqa: BLE001 - a dead or replaced engine aborts nothing
            pass
        for future in {id(job[0]): job[0] for job in self._jobs.values()}.values():
            if not future.done():
                future.set_exception(exc)
        self._jobs.clear()
        self._waiting.clear()

    def _run(self) -> None:
        # _jobs: request id -> (its batch's future, its outputs, index, internal id); _waiting: id(future) ->
        # its requests unfinished.
        while True:
            with self.lock:
                busy = bool(self._jobs) and self.owner.llm.llm_engine.has_unfinished_requests()
                if self._jobs and not busy:
                    # Never wait for answers the engine no longer owes: hand the batches back instead.
                    self.fail_all(RuntimeError(f"the engine dropped {len(self._jobs)} requests"))
            items = []
            if not busy:
                idle_from = time.perf_counter()
                items.append(self.inbox.get())
                self.idle_s += time.perf_counter() - idle_from
            while True:
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            with self.lock:
                llm = self.owner.llm
                for prompts, params, lora_request, future in items:
                    try:
                        ids = llm.enqueue(prompts, params, lora_request=lora_request, use_tqdm=False)
                    except Exception as exc:  # noqa: BLE001 - a refused batch goes back to its caller
                        future.set_exception(exc)
                        continue
                    if not ids:
                        future.set_result([])
                        continue
                    outputs: list = [None] * len(ids)
                    for k, rid in enumerate(ids):
                        self._jobs[compat.output_request_id(rid)] = (future, outputs, k, rid)
                    self._waiting[id(future)] = len(ids)
                if not self._jobs:
                    continue
                try:
                    finished = [o for o in llm.llm_engine.step() if o.finished]
                except Exception as exc:  # noqa: BLE001 - the callers isolate the request at fault
                    self.fail_all(exc)
                    continue
                for out in finished:
                    if out.request_id not in self._jobs:
                        continue  # aborted
                    future, outputs, k, _ = self._jobs.pop(out.request_id)
                    outputs[k] = out
                    self._waiting[id(future)] -= 1
                    if self._waiting[id(future)] == 0:
                        del self._waiting[id(future)]
                        future.set_result(outputs)


class Ledger(Protocol):
    """Where a replica keeps its time (`pipelines.run.ledger.ReplicaLedger`): the run's bill is made from it."""

    def ready(self, engine_start_s: float, *, dtype: str | None = None) -> None: ...

    def batch(self, start: float, end: float, rows: int, output_tokens: int, **profile: float) -> None: ...


class LedgerFactory(Protocol):
    """Makes each replica's ledger entry, in the replica, from its profile's name: the run hands one in."""

    def __call__(self, *, profile: str) -> Ledger: ...


class VLLMGenerator:
    """A Ray Data callable class: one engine replica.

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
                 cache: dict[str, Any] | None = None):
        self.profile = EngineProfile.model_validate(profile)
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
        self.lora_request = None
        extra: dict[str, Any] = {}
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            local = local_adapter(adapter, storage or StorageOptions())
            self.lora_request = LoRARequest(adapter.name, 1, str(local))
            extra = adapter.engine_kwargs()
        self._engine_args = (self.profile, model_path, tokenizer_path, extra)
        self.llm: Any = None  # a `vllm.LLM` once started
        self._engine_lock = threading.Lock()
        self.sampling = SamplingSpec.model_validate(sampling)
        self.params = sampling_params(self.sampling, structured=structured, logprobs=logprobs)
        self.logprobs = logprobs
        self.loop = EngineLoop(self)
        if self.cache is None:
            self._start_engine()
        # With a cache the engine starts with the first request the cache cannot answer: a run the cache
        # answers whole never loads the model.

    def _start_engine(self) -> bool:
        """Start the engine unless it runs; whether this call started it."""
        with self._engine_lock:
            if self.llm is not None:
                return False
            started = time.perf_counter()
            self.llm = make_llm(*self._engine_args[:3], **self._engine_args[3])
            self.engine_start_s = time.perf_counter() - started
            if self.ledger is not None:
                self.ledger.ready(self.engine_start_s, dtype=self.dtype)
            log.info("engine %s ready in %.1f s (%s)", self.profile.name, self.engine_start_s, self.dtype)
            return True

    def __del__(self) -> None:
        # Ray Data drops the UDF when the pool shuts down gracefully; stopping the
        # engine core here spares its "exited unexpectedly" clean-up and leaked
        # shared-memory warnings when the actor process exits.
        compat.shutdown_engine(getattr(self, "llm", None))

    def _restart_engine(self, budget: list[int]) -> None:
        """A fresh engine after the old one died (its core process crashed or was killed)."""
        if budget[0] <= 0:
            raise RuntimeError("the engine died too often on one batch; giving up on this replica")
        budget[0] -= 1
        if getattr(self, "loop", None) is not None:
            self.loop.fail_all(RuntimeError("engine replaced after a failure"))
        self.__del__()
        log.warning("engine %s died; starting a new one", self.profile.name)
        self.llm = make_llm(*self._engine_args[:3], **self._engine_args[3])

    def _generate(self, idx: list[int], prompts: list, params: list, images: list | None,
                  budget: list[int], retry_whole: bool = True) -> tuple[dict[int, Any], dict[int, str]]:
        """Outputs by index, and errors by index for the requests that cannot be served.

        The engine fails a whole call for one bad request (a grammar it cannot
        compile, a prompt it refuses) and dies with the call that kills it, so a
        failed call is split in halves until each failing request stands alone:
        that request gets the error, the others their outputs. A dead engine is
        replaced, and the same requests tried once more whole before splitting:
        an engine can die of something else (an OOM, a killed process).
        """
        try:
            outputs = generate_ids(self.llm, [prompts[i] for i in idx], [params[i] for i in idx],
                                   images=[images[i] for i in idx] if images else None,
                                   lora_request=self.lora_request)
            return dict(zip(idx, outputs)), {}
        except Exception as exc:  # noqa: BLE001 - isolate the request(s) at fault; none is lost
            if isinstance(exc, compat.engine_dead_error()):
                self._restart_engine(budget)
                if retry_whole:
                    return self._generate(idx, prompts, params, images, budget, retry_whole=False)
            if len(idx) == 1:
                log.warning("engine refused one request: %s: %s", type(exc).__name__, exc)
                return {}, {idx[0]: f"{type(exc).__name__}: {exc}"}
            half = len(idx) // 2
            done, failed = self._generate(idx[:half], prompts, params, images, budget)
            more_done, more_failed = self._generate(idx[half:], prompts, params, images, budget)
            return {**done, **more_done}, {**failed, **more_failed}

    def _generate_batch(self, prompts: list, params: list, images: list | None,
                        budget: list[int]) -> tuple[dict[int, Any], dict[int, str]]:
        """The batch through the engine loop; if any request fails, the whole batch again on the careful path
        (`_generate`), with the engine to itself."""
        idx = list(range(len(prompts)))
        loop = getattr(self, "loop", None)
        if loop is not None:
            engine_prompts = [tokens_prompt(p, images[i] if images else None) for i, p in enumerate(prompts)]
            engine = self.llm
            try:
                return dict(enumerate(loop.submit(engine_prompts, params, self.lora_request).result())), {}
            except Exception as exc:  # noqa: BLE001 - isolated below
                failure = exc
                log.info("a batch failed in the engine loop (%s: %s); isolating its requests",
                         type(exc).__name__, exc)
            with loop.lock:
                # Restart a dead engine unless another batch's caller already has.
                if isinstance(failure, compat.engine_dead_error()) and self.llm is engine:
                    self._restart_engine(budget)
                return self._generate(idx, prompts, params, images, budget)
        return self._generate(idx, prompts, params, images, budget)

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
                params = request_sampling_params(self.sampling, raw_params, self.params)
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
            if send and getattr(self, "llm", None) is None and self._start_engine():
                started = time.time()  # the engine's start-up is its own line, not this batch's work
            # Enough engine restarts to isolate one poison request by halving, and a few more.
            budget = [2 * max(1, len(send)).bit_length() + 2]
            if self.profile is not None and self.profile.engine_args.enable_prefix_caching:
                send = [send[j] for j in prefix_order([prompts[k] for k in send], self.profile.kv_block_size)]
            done, failed = (self._generate_batch([prompts[k] for k in send], [params[k] for k in send],
                                                 [images[k] for k in send] if images else None, budget)
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
            for k, future in waits.items():
                entry, error = future.result()
                rows[todo[k]], errors[todo[k]], from_cache[todo[k]] = entry, error, entry is not None
                codes[todo[k]] = Reason.ENGINE if error is not None else None
            for k, source in copies.items():
                i, src = todo[k], todo[source]
                rows[i], errors[i], from_cache[i] = rows[src], errors[src], rows[src] is not None
                codes[i] = codes[src]
        ended = time.time()
        if self.ledger is not None and sent:
            self.ledger.batch(started, ended, sent, generated_tokens,
                              engine_idle_s=round(self.loop.idle_s, 3) if getattr(self, "loop", None) else 0.0,
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
        assert result.num_rows == n, "VLLMGenerator must map each row to exactly one row"
        return result


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
