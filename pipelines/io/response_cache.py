"""The response cache: a request answered before is not sent to the engine again.

A request's key is a SHA-256 over everything that decides its answer and
nothing else: the model and its revision (`pipelines.models.model_revision`),
the engine settings that change its numbers, the sampling parameters, the
decoding constraint, the LoRA adapter, and the rendered prompt as token ids
(with its image's bytes). Settings that only
change speed (batch sizes, prefix caching, eager mode, memory shares, replicas)
are left out, so retuning an engine keeps its cache.

Entries are small JSON objects, one per key, under the folder named by the
job's `cache.path` (a local folder, `s3://` or `gs://`), at
`<path>/v1/<key[:2]>/<key>.json`. One object per key needs no index and no
locking: writers of one key write the same answer, and a reader sees a whole
object or none. A batch's lookups and writes go out together
(`fsspec`'s bulk `cat` and `pipe`, concurrent on object stores).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from pipelines.io.storage import join

log = logging.getLogger(__name__)

VERSION = "v1"

# EngineArgs fields that change what a model answers (weights, numerics, sampling seed), by name; every other
# field changes only speed or memory. `extra_args` may hold anything, so it counts too.
ENGINE_FIELDS = ("dtype", "quantization", "kv_cache_dtype", "seed", "trust_remote_code", "extra_args")

# What a cached answer carries: the generator's outputs for one request.
ENTRY_FIELDS = ("output_text", "finish_reason", "prompt_tokens", "completion_tokens", "cached_prompt_tokens",
                "output_token_ids", "output_logprob", "generated_at")


class CacheEntry(BaseModel):
    """The shape an entry must have to be used; anything else found under the folder (edited by hand, written by
    another tool, cut short) is a miss. Token ids and the logprob are there only where the job asked for them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    output_text: str
    finish_reason: str | None
    prompt_tokens: StrictInt
    completion_tokens: StrictInt
    cached_prompt_tokens: StrictInt
    output_token_ids: list[StrictInt] | None = None
    output_logprob: float | int | None = None
    generated_at: StrictInt | None = None


def generation_identity(*, engine: dict[str, Any], sampling: dict[str, Any], structured: dict[str, Any] | None,
                        logprobs: bool, adapter: dict[str, Any] | None,
                        model_revision: str | None = None) -> dict[str, Any]:
    """Everything besides the prompt that decides a request's answer, as plain JSON.

    Args:
        engine: The engine profile (`EngineProfile.model_dump(mode="json")`).
        sampling: The job's sampling (`SamplingSpec.model_dump(mode="json")`).
        structured: The decoding constraint (`pipelines.stages.generate.structured_outputs`).
        logprobs: Whether the answer carries its logprob.
        adapter: The LoRA adapter's identity (name, where it is, its content digest), if any.
        model_revision: What tells these weights from others of the same name
            (`pipelines.models.model_revision`), where it can be known.
    """
    args = engine["engine_args"]
    return {
        "version": VERSION,
        "model": engine["model"],
        "model_revision": model_revision,
        "tokenizer": engine.get("tokenizer"),
        "engine": {k: args.get(k) for k in ENGINE_FIELDS},
        "sampling": sampling,
        "structured": structured,
        "logprobs": logprobs,
        "adapter": adapter,
    }


def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def request_key(identity: str, prompt_token_ids: list[int], *, image: bytes | None = None,
                request_params: str | None = None) -> str:
    """The cache key of one request: the identity's digest, its token ids, its image and its own sampling
    overrides (OpenAI batch requests bring theirs)."""
    h = hashlib.sha256(identity.encode())
    h.update(b"\0ids:" + ",".join(map(str, prompt_token_ids)).encode())
    if image is not None:
        h.update(b"\0image:" + hashlib.sha256(image).digest())
    if request_params is not None:
        h.update(b"\0params:" + request_params.encode())
    return h.hexdigest()


class ResponseCache:
    """The entries under one folder; `fs` is its fsspec filesystem."""

    def __init__(self, fs, root: str) -> None:
        self.fs = fs
        self.root = join(root, VERSION)

    def path(self, key: str) -> str:
        return join(self.root, key[:2], f"{key}.json")

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """The entries found, by key; a missing or unreadable entry is a miss, never an error."""
        if not keys:
            return {}
        try:
            found = self.fs.cat([self.path(k) for k in keys], on_error="omit")
        except (OSError, ValueError) as exc:
            log.warning("response cache %s unreadable, treating as empty: %s", self.root, exc)
            return {}
        wanted = set(keys)
        out = {}
        for path, data in found.items():
            key = path.rsplit("/", 1)[-1].removesuffix(".json")  # stores answer without the protocol
            if key not in wanted:
                continue
            try:
                entry = json.loads(data)
                CacheEntry.model_validate(entry)
            except ValidationError as exc:
                log.warning("response cache entry %s is not an answer (%s); generating again", path,
                            exc.errors()[0]["msg"] if exc.errors() else exc)
                continue
            except (ValueError, RecursionError):
                log.warning("response cache entry %s is not JSON; generating again", path)
                continue
            out[key] = entry
        return out

    def put_many(self, entries: dict[str, dict[str, Any]]) -> None:
        """Store entries; a failure is logged and costs only a later cache miss."""
        if not entries:
            return
        data = {self.path(k): json.dumps(v, separators=(",", ":"), default=str).encode() for k, v in entries.items()}
        try:
            if _is_local(self.fs):
                for parent in {p.rsplit("/", 1)[0] for p in data}:
                    self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe(data)
        except OSError as exc:
            log.warning("response cache %s: %d entries not written: %s", self.root, len(entries), exc)


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def store_batch(batch, cache: ResponseCache) -> int:
    """Store the answers the engine gave in a generated batch (not those it copied); how many."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "cache_key" not in batch.column_names:
        return 0
    new = pc.and_(pc.and_(pc.invert(pc.fill_null(batch.column("cached"), False)), pc.is_valid(batch.column("cache_key"))),
                  pc.and_(pc.is_valid(batch.column("completion_tokens")), pc.is_null(batch.column("error_code"))))
    answered = batch.filter(new)
    if not answered.num_rows:
        return 0
    fields = [f for f in ENTRY_FIELDS if f in answered.column_names]
    answered = answered.set_column(answered.schema.get_field_index("generated_at"), "generated_at",
                                   pc.cast(answered.column("generated_at"), pa.int64()))
    keys = answered.column("cache_key").to_pylist()
    entries = dict(zip(keys, answered.select(fields).to_pylist()))
    cache.put_many(entries)
    return len(entries)
