"""Generate: one Ray actor per engine replica, each holding one `vllm.LLM`.

This is the only module that imports vLLM.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.adapters import Adapter, local_adapter
from pipelines.config.engine import EngineProfile
from pipelines.config.job import SamplingSpec
from pipelines.errors import ConfigError
from pipelines.models import resolve_engine_paths
from pipelines.observe import ReplicaLedger
from pipelines.paths import tokenmill_home
from pipelines.storage import StorageOptions

log = logging.getLogger(__name__)


def vllm_engine_args(profile: EngineProfile, source: str):
    """The profile's engine arguments as vLLM's own `EngineArgs`, checked by vLLM's CLI parser.

    Going through the parser (rather than building the dataclass) checks each
    name, type and choice (quantization, KV-cache dtype, executor backend, ...)
    against the installed vLLM without starting an engine.
    """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm"))

    def fail(message: str):
        raise ConfigError(f"{source}: engine_args: vLLM refuses them: {message}")

    parser.error = fail  # argparse would print and exit
    argv = ["--model", profile.model]
    for key, value in profile.engine_args.to_vllm_kwargs().items():
        flag = "--" + key.replace("_", "-")
        if flag not in parser._option_string_actions:
            fail(f"unknown vLLM engine argument {key!r}")
        if isinstance(value, bool):
            negative = "--no-" + key.replace("_", "-")
            if value:
                argv.append(flag)
            elif negative in parser._option_string_actions:
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


def _bind_cpu_threads() -> None:
    # Ray caps OMP_NUM_THREADS at the actor's num_cpus; the engine should use
    # every core this process may run on, bound one thread to each.
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
    os.environ["OMP_NUM_THREADS"] = str(len(cores))


def make_llm(profile: EngineProfile, model_path: str, tokenizer_path: str, **extra: Any):
    """A `vllm.LLM` for the profile (in the calling process); `extra` adds engine arguments (LoRA's)."""
    if profile.device == "cpu":
        _bind_cpu_threads()
    from vllm import LLM

    return LLM(model=model_path, tokenizer=tokenizer_path, **{**profile.engine_args.to_vllm_kwargs(), **extra})


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


class VLLMGenerator:
    """A Ray Data callable class: one engine replica.

    Rows that already carry an `error` are not sent to the engine. Adds
    `output_text`, `finish_reason`, `completion_tokens`, `cached_prompt_tokens`,
    `output_token_ids` and, with `logprobs`, `output_logprob` (the sum of the
    sampled tokens' logprobs); one row out per row in. A `request_params`
    column (JSON, per row) overrides the sampling for its row.
    """

    def __init__(self, *, profile: dict[str, Any], sampling: dict[str, Any], ledger: dict[str, Any] | None = None,
                 adapter: Adapter | None = None, storage: StorageOptions | None = None,
                 structured: dict[str, Any] | None = None, logprobs: bool = False):
        self.profile = EngineProfile.model_validate(profile)
        # Before anything slow: the replica is billed from its creation.
        self.ledger = ReplicaLedger(profile=self.profile.name, **ledger) if ledger else None
        model_path, tokenizer_path = resolve_engine_paths(self.profile.model, self.profile.tokenizer)
        self.lora_request = None
        extra: dict[str, Any] = {}
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            local = local_adapter(adapter, storage or StorageOptions())
            self.lora_request = LoRARequest(adapter.name, 1, str(local))
            extra = adapter.engine_kwargs()
        self._engine_args = (self.profile, model_path, tokenizer_path, extra)
        started = time.perf_counter()
        self.llm = make_llm(*self._engine_args[:3], **extra)
        self.engine_start_s = time.perf_counter() - started
        self.sampling = SamplingSpec.model_validate(sampling)
        self.params = sampling_params(self.sampling, structured=structured, logprobs=logprobs)
        self.logprobs = logprobs
        if self.ledger is not None:
            self.ledger.ready(self.engine_start_s)
        log.info("engine %s ready in %.1f s", self.profile.name, self.engine_start_s)

    def __del__(self) -> None:
        # Ray Data drops the UDF when the pool shuts down gracefully; stopping the
        # engine core here spares its "exited unexpectedly" clean-up and leaked
        # shared-memory warnings when the actor process exits.
        core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def _restart_engine(self, budget: list[int]) -> None:
        """A fresh engine after the old one died (its core process crashed or was killed)."""
        if budget[0] <= 0:
            raise RuntimeError("the engine died too often on one batch; giving up on this replica")
        budget[0] -= 1
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
            if type(exc).__name__ == "EngineDeadError":
                self._restart_engine(budget)
                if retry_whole:
                    return self._generate(idx, prompts, params, images, budget, retry_whole=False)
            if len(idx) == 1:
                log.warning("engine refused one request: %s: %s", type(exc).__name__, exc)
                return {}, {idx[0]: f"engine: {type(exc).__name__}: {exc}"}
            half = len(idx) // 2
            done, failed = self._generate(idx[:half], prompts, params, images, budget)
            more_done, more_failed = self._generate(idx[half:], prompts, params, images, budget)
            return {**done, **more_done}, {**failed, **more_failed}

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column("error").to_pylist()
        todo = [i for i, e in enumerate(errors) if e is None]
        n = batch.num_rows
        text: list[str | None] = [None] * n
        finish: list[str | None] = [None] * n
        completion: list[int | None] = [None] * n
        cached: list[int | None] = [None] * n
        out_ids: list[list[int] | None] = [None] * n
        logprob: list[float | None] = [None] * n
        prompt_tokens = batch.column("prompt_tokens").to_pylist()
        has_images = "image" in batch.column_names

        started = time.time()
        if todo:
            prompts = batch.column("prompt_token_ids").take(todo).to_pylist()
            images = batch.column("image").take(todo).to_pylist() if has_images else None
            params = [self.params] * len(todo)
            if "request_params" in batch.column_names:
                params = request_sampling_params(
                    self.sampling, batch.column("request_params").take(todo).to_pylist(), self.params)
            # Enough engine restarts to isolate one poison request by halving, and a few more.
            budget = [2 * max(1, len(todo)).bit_length() + 2]
            done, failed = self._generate(list(range(len(todo))), prompts, params, images, budget)
            for k, message in failed.items():
                errors[todo[k]] = message
            for k, out in sorted(done.items()):
                i = todo[k]
                # The engine's count: with an image it includes the image's tokens.
                prompt_tokens[i] = len(out.prompt_token_ids)
                completion_output = out.outputs[0]
                text[i] = completion_output.text
                finish[i] = completion_output.finish_reason
                out_ids[i] = list(completion_output.token_ids)
                completion[i] = len(completion_output.token_ids)
                cached[i] = out.num_cached_tokens
                if self.logprobs and completion_output.cumulative_logprob is not None:
                    logprob[i] = completion_output.cumulative_logprob
        ended = time.time()
        if self.ledger is not None and todo:
            self.ledger.batch(started, ended, len(todo), sum(c or 0 for c in completion))

        drop = ["error", "prompt_tokens", *(["image"] if has_images else [])]
        result = batch.drop_columns(drop)
        result = result.append_column("prompt_tokens", pa.array(prompt_tokens, pa.int64()))
        result = result.append_column("output_text", pa.array(text, pa.string()))
        result = result.append_column("finish_reason", pa.array(finish, pa.string()))
        result = result.append_column("completion_tokens", pa.array(completion, pa.int64()))
        result = result.append_column("cached_prompt_tokens", pa.array(cached, pa.int64()))
        result = result.append_column("output_token_ids", pa.array(out_ids, pa.list_(pa.int32())))
        if self.logprobs:
            result = result.append_column("output_logprob", pa.array(logprob, pa.float64()))
        result = result.append_column("error", pa.array(errors, pa.string()))
        at = pa.scalar(int(ended * 1e6), pa.timestamp("us", tz="UTC"))
        result = result.append_column("generated_at", pc.if_else(
            pc.is_valid(result.column("completion_tokens")), at, pa.scalar(None, at.type)))
        assert result.num_rows == n, "VLLMGenerator must map each row to exactly one row"
        return result
