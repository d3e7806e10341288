"""OpenAI Batch API files at both ends of the pipeline.

In (`input.format: openai_batch`): request files (`.jsonl`, one
`{custom_id, method, url, body}` a line) are checked line by line and staged as
Parquet in the run's folder, one row per line, so the rest of the pipeline is
the same as for Parquet input. A line that cannot be served (not JSON, an
unknown `url`, a repeated `custom_id`, an unsupported parameter) keeps its row
with a `reject` reason and its line number; nothing is dropped.

Out (`output.format: openai_batch`): the Parquet results become `output.jsonl`
(successes, in the chat-completion shape with `usage`) and `errors.jsonl`
(everything else, with the reason and line); each record is in exactly one.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import re
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from pipelines.config.job import JobSpec, SamplingSpec
from pipelines.config.storage import StorageOptions
from pipelines.errors import ConfigError
from pipelines.io.storage import input_files, join
from pipelines.schema import STAGED_SCHEMA, Reason

log = logging.getLogger(__name__)

CHAT_URL = "/v1/chat/completions"

# body keys mapped onto the job's sampling; the rest of a request's body is either
# harmless to ignore (the hosted model's name, bookkeeping) or refused.
SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty"}
IGNORED_KEYS = {"model", "user", "metadata", "store", "service_tier", "stream", "parallel_tool_calls"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# A request line's bytes at most (a chat request of a few hundred thousand tokens is under 2 MB), and a request
# file's, as OpenAI's Batch API limits its input files: a longer line is rejected, a larger file refused.
MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_FILE_BYTES = 200 * 1024 * 1024
_CUSTOM_ID = re.compile(r'"custom_id"\s*:\s*"((?:[^"\\]|\\.)*)"')


class Reject(Exception):
    """A request line that cannot be served: `code` is OpenAI-style, the message says why."""

    def __init__(self, code: Reason, message: str):
        super().__init__(message)
        self.code = code


def request_files(uri: str, storage: StorageOptions) -> tuple[Any, list[str]]:
    """The `.jsonl` request files at `uri` (a file or a folder), as the filesystem names them."""
    fs, _, files = input_files(uri, storage, ".jsonl", ".jsonl request files")
    for path in files:
        size = fs.size(path)
        if size is not None and size > MAX_FILE_BYTES:
            raise ConfigError(f"input.path: {path} is {size:,} bytes, more than a request file may hold "
                              f"({MAX_FILE_BYTES:,}); split it into several files")
    return fs, files


def _raw_lines(f, limit: int) -> Iterator[tuple[bytes, bool]]:
    """Each line's bytes without its newline, and whether it was longer than `limit`: of a longer line only the
    first `limit` bytes are kept, so one huge line costs no more memory than a long one."""
    buf, over = b"", False
    while chunk := f.read(1 << 20):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if not over:
                buf += chunk[start:] if end < 0 else chunk[start:end]
                if len(buf) > limit:
                    buf, over = buf[:limit], True
            if end < 0:
                break
            yield buf, over
            buf, over, start = b"", False, end + 1
    if buf or over:
        yield buf, over


def _lines(fs, path: str) -> Iterator[tuple[int, str, Reason | None]]:
    """(line number, text, what is wrong with the line's bytes or None); an invalid byte becomes U+FFFD in the
    text, and a line over `MAX_LINE_BYTES` is cut there (its custom_id is looked for in what is left)."""
    with fs.open(path, "rb") as f:
        for number, (raw, over) in enumerate(_raw_lines(f, MAX_LINE_BYTES), start=1):
            try:
                text, problem = raw.decode("utf-8"), None
            except UnicodeDecodeError:
                text, problem = raw.decode("utf-8", errors="replace"), Reason.INVALID_ENCODING
            yield number, text.rstrip("\r"), Reason.LINE_TOO_LONG if over else problem


def _loads(text: str) -> Any:
    """`json.loads`, with nesting too deep for the parser (a RecursionError) refused as not valid JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _text(value: str) -> str:
    """`value` where it is text; a lone surrogate (`"\\ud800"` in JSON is one) written as its escape, since no
    file can hold it."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _custom_id_of(text: str) -> str | None:
    """The custom_id of a line, even a line that is not valid JSON (best effort)."""
    try:
        value = _loads(text)
    except ValueError:
        found = _CUSTOM_ID.search(text)
        if not found:
            return None
        try:
            return _text(json.loads(f'"{found.group(1)}"')) or None
        except ValueError:  # a bad escape: the id as written
            return found.group(1)
    cid = value.get("custom_id") if isinstance(value, dict) else None
    return _text(cid) if isinstance(cid, str) and cid else None


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Reject(Reason.INVALID_REQUEST, f"{where}: content part of type {kind!r} is not supported (text only)")
            parts.append(part["text"])
        return "".join(parts)
    raise Reject(Reason.INVALID_REQUEST, f"{where}: content must be a string or a list of text parts")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Reject(Reason.INVALID_REQUEST, "body.messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise Reject(Reason.INVALID_REQUEST, f"{where}: role {role!r} is not one of {sorted(ROLES)}")
        out.append({"role": ROLES[m["role"]], "content": _text_content(m.get("content"), where)})
    return out


def _structured(response_format: Any) -> dict[str, Any] | None:
    """`response_format` as vLLM's structured-output constraint (`StructuredOutputsParams` keywords)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise Reject(Reason.INVALID_REQUEST, "body.response_format.json_schema.schema must be an object")
        from jsonschema import Draft202012Validator, SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise Reject(Reason.INVALID_REQUEST, f"body.response_format: not a valid JSON Schema: {exc.message}") from None
        return {"json": schema}
    raise Reject(Reason.INVALID_REQUEST, f"body.response_format.type {kind!r} is not one of text, json_object, json_schema")


def parse_request(text: str, sampling: SamplingSpec) -> dict[str, Any]:
    """One request line as a staged row (without source, line and reject). Raises `Reject`."""
    try:
        request = _loads(text)
    except ValueError as exc:
        raise Reject(Reason.INVALID_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise Reject(Reason.INVALID_JSON, f"expected a JSON object, found {type(request).__name__}")
    try:
        json.dumps(request, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end].encode("utf-8", "backslashreplace").decode("utf-8")
        raise Reject(Reason.INVALID_ENCODING, f"a string holds {bad}, a lone surrogate, which is not text") from None
    cid = request.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise Reject(Reason.INVALID_REQUEST, "custom_id is missing or not a non-empty string")
    if request.get("method", "POST") != "POST":
        raise Reject(Reason.INVALID_REQUEST, f"method {request.get('method')!r} is not POST")
    if request.get("url") != CHAT_URL:
        raise Reject(Reason.INVALID_URL, f"url {request.get('url')!r} is not served (tokenmill serves {CHAT_URL})")
    body = request.get("body")
    if not isinstance(body, dict):
        raise Reject(Reason.INVALID_REQUEST, "body must be an object")
    unknown = sorted(set(body) - SAMPLING_KEYS - IGNORED_KEYS - {"messages", "response_format", "n",
                                                                  "max_completion_tokens", "logprobs"})
    if unknown:
        raise Reject(Reason.INVALID_REQUEST, f"body parameters {unknown} are not supported")
    if body.get("n", 1) != 1:
        raise Reject(Reason.INVALID_REQUEST, f"body.n {body['n']!r}: only one choice per request is supported")
    if body.get("logprobs"):
        raise Reject(Reason.INVALID_REQUEST, "body.logprobs is not supported")
    params = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
    if body.get("max_completion_tokens") is not None:
        params["max_tokens"] = body["max_completion_tokens"]
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    try:
        merged = SamplingSpec.model_validate({**sampling.model_dump(), **params})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise Reject(Reason.INVALID_REQUEST, f"body.{key}: {err['msg']}") from None
    structured = _structured(body.get("response_format"))
    return {
        "custom_id": cid,
        "messages": json.dumps(_messages(body), ensure_ascii=False),
        "request_params": json.dumps({**params, **({"structured": structured} if structured else {})}),
        "max_tokens": merged.max_tokens,
    }


def stage_requests(spec: JobSpec, storage: StorageOptions, out_fs, staged_root: str) -> list[str]:
    """Check every request line of the input and write them as Parquet under `staged_root`.

    Two passes: the first counts custom_ids, so that every line of a repeated
    custom_id is rejected (which of them was meant is unknowable), the second
    writes. Returns the staged files, as `out_fs` names them.
    """
    fs, files = request_files(spec.input.path, storage)
    seen: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for path in files:
        for number, text, _ in _lines(fs, path):
            if text.strip():
                cid = _custom_id_of(text)
                if cid is not None:
                    seen[cid].append((path.rsplit("/", 1)[-1], number))
    repeated = {cid: where for cid, where in seen.items() if len(where) > 1}

    out_fs.makedirs(staged_root, exist_ok=True)
    staged = []
    for k, path in enumerate(files):
        name = path.rsplit("/", 1)[-1]
        rows = []
        for number, text, problem in _lines(fs, path):
            if not text.strip():
                continue  # a blank line (often the last) is no request
            row = {"custom_id": _custom_id_of(text), "source": name, "line": number, "messages": None,
                   "request_params": None, "max_tokens": None, "reject_code": None, "reject": None}
            try:
                if problem is Reason.LINE_TOO_LONG:
                    raise Reject(problem, f"the line is longer than {MAX_LINE_BYTES:,} bytes")
                if problem is Reason.INVALID_ENCODING:
                    raise Reject(problem, "the line is not valid UTF-8")
                if row["custom_id"] in repeated:
                    lines = ", ".join(f"{s}:{n}" for s, n in repeated[row["custom_id"]])
                    raise Reject(Reason.DUPLICATE_CUSTOM_ID, f"custom_id {row['custom_id']!r} appears on lines {lines}")
                row.update(parse_request(text, spec.sampling))
            except Reject as exc:
                row["reject_code"], row["reject"] = exc.code, f"line {number} of {name}: {exc}"
            rows.append(row)
        target = join(staged_root, f"part-{k:05d}.parquet")
        with out_fs.open(target, "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=STAGED_SCHEMA), f)
        staged.append(target)
        rejected = sum(r["reject_code"] is not None for r in rows)
        log.info("staged %s: %d requests, %d rejected", path, len(rows), rejected)
    return staged


def _request_id(run_id: str, custom_id: Any, source: Any, line: Any) -> str:
    return hashlib.sha1(f"{run_id}\0{custom_id}\0{source}\0{line}".encode()).hexdigest()[:24]


def batch_output_line(row: dict[str, Any], *, id_column: str, run_id: str, created: int) -> tuple[bool, dict]:
    """One result row as an OpenAI batch output line; `(True, line)` for a success, `(False, line)` for an error."""
    custom_id = row[id_column] if row[id_column] is None else str(row[id_column])
    rid = _request_id(run_id, custom_id, row.get("source"), row.get("line"))
    if row["error_code"] is not None:
        error = {"code": row["error_code"], "message": row["error"] or row["error_code"]}
        if row.get("line") is not None:
            error["line"] = row["line"]
        return False, {"id": f"batch_req_{rid}", "custom_id": custom_id, "response": None, "error": error}
    prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
    body = {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": created,
        "model": row["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": row["output_text"], "refusal": None},
            "logprobs": None,
            "finish_reason": row["finish_reason"],
        }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": row["cached_prompt_tokens"] or 0},
        },
    }
    return True, {"id": f"batch_req_{rid}", "custom_id": custom_id,
                  "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


def write_batch_files(result_files: list[str], reject_files: list[str], fs, run_root: str, *, id_column: str,
                      run_id: str, created: int) -> dict[str, Any]:
    """Turn the run's Parquet results and rejects into `output.jsonl` and `errors.jsonl`, batch by batch."""
    counts = {"output": 0, "errors": 0}
    output_path, errors_path = join(run_root, "output.jsonl"), join(run_root, "errors.jsonl")
    with fs.open(output_path, "w") as ok_file, fs.open(errors_path, "w") as err_file:
        for path in [*result_files, *reject_files]:
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                    for row in batch.to_pylist():
                        if "reason" in row:  # a reject: never generated
                            row = {**row, "error_code": row["reason"], "error": row["message"]}
                        ok, line = batch_output_line(row, id_column=id_column, run_id=run_id, created=created)
                        (ok_file if ok else err_file).write(json.dumps(line, ensure_ascii=False) + "\n")
                        counts["output" if ok else "errors"] += 1
    return {"output_file": output_path, "error_file": errors_path, "output_lines": counts["output"],
            "error_lines": counts["errors"]}
