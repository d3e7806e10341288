"""The engine: one `vllm.LLM` per replica, reached through `EngineClient`. This is the only module that imports
vLLM; its private names go through `pipelines.compat`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import queue
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, NoReturn, Protocol

from pipelines import compat
from pipelines.config.engine import EngineProfile
from pipelines.config.job import SamplingSpec
from pipelines.errors import ConfigError
from pipelines.paths import tokenmill_home
from pipelines.stages import watchdog

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


def check_engine_args(profile: EngineProfile, source: str) -> None:
    """`vllm_engine_args`, remembered: arguments this vLLM accepted once are not parsed again on this machine.

    Parsing needs vLLM imported (about 4 s, torch with it), which a driver
    otherwise does without until its replicas start: a scheduler's retry that
    finds the run busy is refused in a second rather than after the import. The
    key is the installed vLLM's version file and the arguments; only a pass is
    remembered, so a refusal is always vLLM's own, at once.
    """
    import importlib.util

    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    version = Path(spec.submodule_search_locations[0]) / "_version.py" if spec and spec.submodule_search_locations \
        else None
    if version is None or not version.is_file():
        vllm_engine_args(profile, source)
        return
    key = hashlib.sha256(json.dumps({"vllm": version.read_text(), "model": profile.model,
                                     "args": profile.engine_args.to_vllm_kwargs()}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:32]
    mark = tokenmill_home() / "checked" / f"vllm-engine-args-{key}"
    if mark.exists():
        return
    vllm_engine_args(profile, source)
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
    except OSError:  # a read-only home: parse again next time
        pass


def actor_env(profile: EngineProfile, *, with_profile_env: bool = True) -> dict[str, str]:
    """Environment variables the engine actors start with.

    On CPU: a KV-cache size vLLM accepts on small machines, the Intel OpenMP
    runtime preloaded (with it the engine uses every core; without, one idles),
    and vLLM's compile cache inside tokenmill's cache folder. Then the profile's
    `env`, unless `with_profile_env` is false: Ray writes an actor's runtime_env,
    values included, to each node's runtime_env_agent.log, so the pipeline's
    replicas get the profile's `env` in the process instead (`apply_profile_env`).
    """
    env = {"VLLM_CACHE_ROOT": str(tokenmill_home() / "vllm"), "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if profile.engine_process == "actor" else "1"}
    if profile.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = "2"
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.is_file():
            env["LD_PRELOAD"] = str(iomp)
    if with_profile_env:
        env.update(profile.env)
    return env


def apply_profile_env(profile: EngineProfile) -> None:
    """The profile's `env` in this process, before vLLM is imported (it reads some variables at import) and
    before the engine's own processes inherit it."""
    os.environ.update(profile.env)


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


def this_machine(cpuinfo: str | None = None) -> str:
    """What decides a CPU engine's speed here, as one line: the CPU model, its cores, its widest vector unit
    and whether it has native bf16 (`tokenmill bench calibrate` records it; `tokenmill plan` compares)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    model = next((line.partition(":")[2].strip() for line in cpuinfo.splitlines()
                  if line.partition(":")[0].strip() in ("model name", "Model")), platform.machine())
    flags = cpu_flags(cpuinfo)
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON" if "asimd" in flags else "-"
    bf16 = "native bf16" if NATIVE_BF16_FLAGS & flags else "no native bf16"
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {vector}, {bf16}"


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
    # vLLM reads it when the engine starts: the engine follows the profile even in a process that was not started
    # with `actor_env` (the actors and the bench's engine children are).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = actor_env(profile)["VLLM_ENABLE_V1_MULTIPROCESSING"]
    # Before the engine spawns its processes: they carry this process's mark, and die with it (`watchdog`).
    watchdog.start()
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


def request_sampling_params(base: SamplingSpec, request_params: list[str | None], default,
                            make: Callable[..., Any] = sampling_params):
    """Per-row `SamplingParams` (or what `make`, the engine's `sampling_params`, builds): a row's JSON overrides
    (OpenAI batch requests) over the job's sampling."""
    out = []
    for raw in request_params:
        if raw is None:
            out.append(default)
            continue
        params = json.loads(raw)
        structured = params.pop("structured", None)
        out.append(make(SamplingSpec.model_validate({**base.model_dump(), **params}), structured=structured))
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


def peak_memory_mb() -> dict[str, float | None]:
    """Peak resident memory of this process (the engine actor) and of its children (vLLM's engine core and
    workers; None for an engine inside the actor, whose memory is the actor's), and the actor's CPU seconds,
    for the ledger: the bench checks that neither memory grows with the number of rows, and profiles where
    the time goes."""
    import psutil

    me = psutil.Process()
    cpu = me.cpu_times()
    children = [c for c in me.children(recursive=True) if c.pid != watchdog.watchdog_pid()]
    return {"actor_peak_rss_mb": round(vm_hwm_mb("self"), 1),
            "engine_peak_rss_mb": round(sum(vm_hwm_mb(c.pid) for c in children), 1) if children else None,
            # The actor's own CPU (batches in and out, the engine loop, detokenizing), and the engine's when
            # the engine runs inside the actor.
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
    runs. `lock` is held for every touch of the engine, so the client's
    fallback path (splitting a failed batch, restarting a dead engine) can take
    the engine over.
    """

    def __init__(self, owner: "EngineClient") -> None:
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


def lora_request_for(name: str, local_path: Path) -> Any:
    """vLLM's request for a LoRA adapter in a local folder."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, 1, str(local_path))


class Engine(Protocol):
    """What the generate stage needs of an engine: `EngineClient`, or a stand-in."""

    dtype: str

    @property
    def idle_s(self) -> float: ...

    def start(self) -> bool: ...

    def shutdown(self) -> None: ...

    def sampling_params(self, spec: SamplingSpec, *, structured: dict[str, Any] | None = None,
                        logprobs: bool = False) -> Any: ...

    def generate(self, prompts: list[list[int]], params: list, images: list | None = None
                 ) -> tuple[dict[int, Any], dict[int, str]]: ...


class EngineFactory(Protocol):
    def __call__(self, profile: EngineProfile, *, model_path: str, tokenizer_path: str, extra: dict[str, Any],
                 lora_request: Any, on_ready: Callable[..., None] | None) -> Engine: ...


class EngineClient:
    """One vLLM engine in this process, through vLLM's public `LLM` API: the one thing the generate stage talks to.

    It starts the engine (lazily where asked), keeps it fed across batches
    (`EngineLoop`), isolates the request at fault when the engine fails a call,
    replaces an engine that died, and shuts it down. It alone knows how vLLM
    names its requests (through `pipelines.compat`). `make` builds the `vllm.LLM`;
    tests hand in a stand-in.
    """

    def __init__(self, profile: EngineProfile, *, model_path: str, tokenizer_path: str,
                 extra: dict[str, Any] | None = None, lora_request: Any = None,
                 on_ready: Callable[..., None] | None = None, make: Callable[..., Any] = make_llm) -> None:
        self.profile = profile
        self.dtype = engine_dtype(profile)
        self._make = lambda: make(profile, model_path, tokenizer_path, **(extra or {}))
        self.lora_request = lora_request
        self._on_ready = on_ready
        self.llm: Any = None  # a `vllm.LLM` once started
        self.engine_start_s: float | None = None
        self._engine_lock = threading.Lock()
        self.loop = EngineLoop(self)

    @property
    def idle_s(self) -> float:
        """Seconds the engine waited for work between batches."""
        return self.loop.idle_s

    def sampling_params(self, spec: SamplingSpec, *, structured: dict[str, Any] | None = None,
                        logprobs: bool = False) -> Any:
        """vLLM `SamplingParams` for the spec (`sampling_params`)."""
        return sampling_params(spec, structured=structured, logprobs=logprobs)

    def start(self) -> bool:
        """Start the engine unless it runs; whether this call started it."""
        with self._engine_lock:
            if self.llm is not None:
                return False
            started = time.perf_counter()
            self.llm = self._new_engine()
            self.engine_start_s = time.perf_counter() - started
            if self._on_ready is not None:
                self._on_ready(self.engine_start_s, dtype=self.dtype)
            log.info("engine %s ready in %.1f s (%s)", self.profile.name, self.engine_start_s, self.dtype)
            return True

    def shutdown(self) -> None:
        """Stop the engine core now, not when the object is collected (a replica's engine must not outlive it)."""
        compat.shutdown_engine(self.llm)

    def generate(self, prompts: list[list[int]], params: list, images: list | None = None
                 ) -> tuple[dict[int, Any], dict[int, str]]:
        """Outputs (`RequestOutput`) by position, and errors by position for the requests that cannot be served.

        The batch goes through the engine loop; if any request fails there, the
        whole batch again on the careful path (`_isolate`), with the engine to itself.
        """
        self.start()
        # Enough engine restarts to isolate one poison request by halving, and a few more.
        budget = [2 * max(1, len(prompts)).bit_length() + 2]
        idx = list(range(len(prompts)))
        engine_prompts = [tokens_prompt(p, images[i] if images else None) for i, p in enumerate(prompts)]
        engine = self.llm
        try:
            return dict(enumerate(self.loop.submit(engine_prompts, params, self.lora_request).result())), {}
        except Exception as exc:  # noqa: BLE001 - isolated below
            failure = exc
            log.info("a batch failed in the engine loop (%s: %s); isolating its requests", type(exc).__name__, exc)
        with self.loop.lock:
            # Restart a dead engine unless another batch's caller already has.
            if isinstance(failure, compat.engine_dead_error()) and self.llm is engine:
                self._restart(budget)
            return self._isolate(idx, prompts, params, images, budget)

    def _restart(self, budget: list[int]) -> None:
        """A fresh engine after the old one died (its core process crashed or was killed)."""
        if budget[0] <= 0:
            raise RuntimeError("the engine died too often on one batch; giving up on this replica")
        budget[0] -= 1
        self.loop.fail_all(RuntimeError("engine replaced after a failure"))
        self.shutdown()
        log.warning("engine %s died; starting a new one", self.profile.name)
        self.llm = self._new_engine()

    def _new_engine(self) -> Any:
        llm = self._make()
        # Without it, vLLM 0.32's client waits forever on an engine core that was killed (an OOM, a node's kill).
        compat.wake_on_engine_death(llm)
        return llm

    def _isolate(self, idx: list[int], prompts: list, params: list, images: list | None,
                 budget: list[int], retry_whole: bool = True) -> tuple[dict[int, Any], dict[int, str]]:
        """The careful path. The engine fails a whole call for one bad request (a grammar it cannot compile,
        a prompt it refuses) and dies with the call that kills it, so a failed call is split in halves until
        each failing request stands alone: that request gets the error, the others their outputs. A dead
        engine is replaced, and the same requests tried once more whole before splitting: an engine can die
        of something else (an OOM, a killed process)."""
        try:
            outputs = generate_ids(self.llm, [prompts[i] for i in idx], [params[i] for i in idx],
                                   images=[images[i] for i in idx] if images else None,
                                   lora_request=self.lora_request)
            return dict(zip(idx, outputs)), {}
        except Exception as exc:  # noqa: BLE001 - isolate the request(s) at fault; none is lost
            if isinstance(exc, compat.engine_dead_error()):
                self._restart(budget)
                if retry_whole:
                    return self._isolate(idx, prompts, params, images, budget, retry_whole=False)
            if len(idx) == 1:
                log.warning("engine refused one request: %s: %s", type(exc).__name__, exc)
                return {}, {idx[0]: f"{type(exc).__name__}: {exc}"}
            half = len(idx) // 2
            done, failed = self._isolate(idx[:half], prompts, params, images, budget)
            more_done, more_failed = self._isolate(idx[half:], prompts, params, images, budget)
            return {**done, **more_done}, {**failed, **more_failed}
