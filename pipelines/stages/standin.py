"""A deterministic engine without a model, for proving everything around the engine quickly.

An engine profile with `backend: stand-in` runs it in place of vLLM: the job is
read, prompted (with the profile's real tokenizer), answered, parsed, accounted,
written and committed as with vLLM, but each answer is a pure function of its
prompt's token ids, so a test knows it in advance and no model is loaded. A
classify job gets one of its labels; an extract job an object whose fields hold
their type's simplest value; a free-text job a short text. The stand-in fails on
purpose where a prompt asks it to (`STAND_IN_REFUSE` in the text, as a grammar
vLLM cannot compile would), so the stage's isolation is exercised too.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from pipelines.config.engine import EngineProfile
from pipelines.config.job import SamplingSpec

REFUSE = "STAND_IN_REFUSE"  # in a prompt's text: the stand-in refuses that request, as vLLM refuses a bad one


def _digest(ids: list[int]) -> int:
    return int.from_bytes(hashlib.sha1(json.dumps(ids).encode()).digest()[:4], "big")


def _value(node: dict[str, Any]) -> Any:
    kind = node.get("type")
    kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
    if "enum" in node:
        return node["enum"][0]
    if kind == "object":
        return {name: _value(sub) for name, sub in node.get("properties", {}).items()}
    if kind == "array":
        return []
    if node.get("format") == "date":
        return "2026-01-01"
    return {"integer": 1, "number": 1.5, "boolean": True}.get(str(kind), "x")


@dataclass(frozen=True)
class StandInStructured:
    """What the stand-in reads of a constraint (vLLM's `StructuredOutputsParams` names)."""

    choice: list[str] | None = None
    json: dict[str, Any] | str | None = None


@dataclass(frozen=True)
class StandInParams:
    """The stand-in's sampling parameters: what it reads of vLLM's `SamplingParams`, without importing vLLM."""

    max_tokens: int | None
    structured_outputs: StandInStructured | None = None


class StandInEngine:
    """The `Engine` interface of `pipelines.stages.engine.EngineClient`, with answers computed, not generated.

    It starts in well under a second: a replica is billed from its creation, so a slow start would be billed
    work that the driver logic under test never does. It reads the tokenizer with `tokenizers` (the fast
    tokenizer transformers wraps, the same ids) and does not import vLLM or torch.
    """

    dtype = "stand-in"
    idle_s = 0.0

    def __init__(self, profile: EngineProfile, *, model_path: str, tokenizer_path: str, extra: dict[str, Any],
                 lora_request: Any, on_ready: Callable[..., None] | None) -> None:
        self.profile = profile
        self._tokenizer = _load_tokenizer(tokenizer_path)
        self._on_ready = on_ready
        self._started = False

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def sampling_params(self, spec: SamplingSpec, *, structured: dict[str, Any] | None = None,
                        logprobs: bool = False) -> StandInParams:
        constraint = None
        if structured:
            constraint = StandInStructured(choice=structured.get("choice"), json=structured.get("json"))
        return StandInParams(max_tokens=spec.max_tokens, structured_outputs=constraint)

    def start(self) -> bool:
        if self._started:
            return False
        self._started = True
        if self._on_ready is not None:
            self._on_ready(0.0, dtype=self.dtype)
        return True

    def shutdown(self) -> None:
        pass

    def generate(self, prompts: list[list[int]], params: list, images: list | None = None
                 ) -> tuple[dict[int, Any], dict[int, str]]:
        self.start()
        time.sleep(self.profile.stand_in_s_per_request * len(prompts))
        done: dict[int, Any] = {}
        failed: dict[int, str] = {}
        for i, (ids, p) in enumerate(zip(prompts, params)):
            if REFUSE in self._tokenizer.decode(ids, skip_special_tokens=False):
                failed[i] = f"ValueError: the stand-in engine refuses prompts that hold {REFUSE}"
                continue
            done[i] = self._answer(ids, p)
        return done, failed

    def _answer(self, ids: list[int], params: Any) -> Any:
        structured = getattr(params, "structured_outputs", None)
        if structured is not None and structured.choice:
            text = structured.choice[_digest(ids) % len(structured.choice)]
        elif structured is not None and structured.json is not None:
            schema = structured.json if isinstance(structured.json, dict) else json.loads(structured.json)
            text = json.dumps(_value(schema))
        else:
            text = f"stand-in answer {_digest(ids) % 1000}"
        tokens = self.encode(text)
        limit = getattr(params, "max_tokens", None) or len(tokens)
        finish = "length" if len(tokens) > limit else "stop"
        tokens = tokens[:limit]
        text = self._tokenizer.decode(tokens, skip_special_tokens=False) if finish == "length" else text
        return SimpleNamespace(
            prompt_token_ids=ids, num_cached_tokens=0,
            outputs=[SimpleNamespace(text=text, finish_reason=finish, token_ids=tokens,
                                     cumulative_logprob=-0.1 * len(tokens))])


def _load_tokenizer(path: str) -> Any:
    """The prepared model's `tokenizer.json`, through `tokenizers`: transformers' fast tokenizers are this file."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"the stand-in engine reads {file}, which is not there")
    return Tokenizer.from_file(str(file))
