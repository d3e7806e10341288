"""Prompt: render each record's chat messages with the model's chat template and tokenize them.

Tokenizing here, once, means the engine receives token ids and never tokenizes
on its own critical path, and `prompt_tokens` is exactly what the engine reads.
Records that cannot become a prompt keep their row and get an `error`.
"""

from __future__ import annotations

import functools
import io
import json
from typing import Any

import pyarrow as pa

from pipelines.config.job import template_fields
from pipelines.config.storage import StorageOptions
from pipelines.io.fetch import FetchPolicy, FetchRefused, fetch, shown
from pipelines.schema import Reason


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """One tokenizer per worker process and model, loaded on first use."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def load_image(value: Any, storage: StorageOptions, policy: FetchPolicy) -> bytes:
    """An image cell's bytes: the bytes themselves, or the object a path or URI names, inside `policy`'s fence.

    Raises ValueError saying why (the record's `image` error) when there is no usable image.
    """
    from PIL import Image

    if _is_blank(value) or (isinstance(value, bytes) and not value):
        raise ValueError("the image column is null or empty")
    where = "inline bytes"
    if isinstance(value, str):
        where = shown(value)
        try:
            value = fetch(value, storage, policy)
        except FetchRefused as exc:
            raise ValueError(f"{where}: refused: {exc}") from None
        except FileNotFoundError:
            raise ValueError(f"{where}: not found") from None
        except Exception as exc:  # noqa: BLE001 - any store error is the row's reason
            raise ValueError(f"{where}: cannot read: {exc}") from None
    elif len(value) > policy.max_bytes:
        raise ValueError(f"inline bytes: refused: larger than {policy.max_bytes} bytes (prompt.images.max_bytes)")
    try:
        Image.open(io.BytesIO(value)).verify()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{where}: not a decodable image: {exc}") from None
    return value


def task_instructions(spec) -> str | None:
    """What a classify or extract job tells the model about its answer (the spec's labels or JSON Schema).

    Decoding is constrained either way; saying what is allowed up front keeps
    the model from being forced off the answer it would have given.
    """
    if spec.prompt is None or not spec.prompt.task_instructions:
        return None
    if spec.task == "classify":
        lines = [f"- {label.name}" + (f": {label.description}" if label.description else "")
                 for label in spec.classify.labels]
        return "Answer with exactly one of these labels and nothing else:\n" + "\n".join(lines)
    if spec.task == "extract":
        schema = json.dumps(spec.extract.schema_dict, separators=(",", ":"))
        return f"Answer with one JSON object that follows this JSON Schema:\n{schema}"
    return None


def prompt_fields(system: str | None, user: str) -> list[str]:
    """The input columns the prompt templates name, system's first, each once."""
    return list(dict.fromkeys(template_fields(system or "") + template_fields(user)))


def build_messages(row: dict[str, Any], system: str | None, user: str, *, image: bool = False,
                   instructions: str | None = None) -> list[dict]:
    """The chat messages for one record; with `image`, the user message is an image part then a text part."""
    messages: list[dict] = []
    system_text = system.format(**row) if system else None
    if instructions:
        system_text = f"{system_text}\n\n{instructions}" if system_text else instructions
    if system_text:
        messages.append({"role": "system", "content": system_text})
    text = user.format(**row)
    content: Any = [{"type": "image"}, {"type": "text", "text": text}] if image else text
    messages.append({"role": "user", "content": content})
    return messages


def render_batch(
    batch: pa.Table,
    *,
    tokenizer_path: str,
    id_column: str,
    max_model_len: int,
    max_tokens: int,
    system: str | None = None,
    user: str | None = None,
    instructions: str | None = None,
    image_column: str | None = None,
    storage: StorageOptions | None = None,
    images: FetchPolicy | None = None,
    messages_column: str | None = None,
) -> pa.Table:
    """Add `prompt_token_ids`, `prompt_tokens`, `error_code` and `error` to a batch; one row out per row in.

    Args:
        tokenizer_path: Tokenizer folder or id (the engine's).
        id_column: The spec's `input.id_column`; a null id is an error.
        max_model_len, max_tokens: A prompt longer than `max_model_len - max_tokens`
            cannot be generated in full, so it is an error rather than an engine
            failure. A `max_tokens` column, where present, sets it per row.
        system, user: The spec's `prompt.system` and `prompt.user` templates.
        instructions: The task's instructions (`task_instructions`), appended to the system message.
        image_column: The spec's `prompt.image_column`: its image is loaded,
            checked and carried to the engine in an `image` column.
        storage: Object-store access for image URIs.
        images: Where image URIs may point and the size cap (`FetchPolicy.for_input`); required with `image_column`.
        messages_column: A column of ready chat messages (JSON) used instead of
            the templates, as OpenAI batch requests bring them.

    `reject_code` and `reject`, where present, hold reasons found while reading
    (`pipelines.stages.read`); such rows keep them as their error.
    """
    if messages_column is None and user is None:
        raise ValueError("render_batch needs the user template (prompt.user) or a messages column")
    if image_column and images is None:
        raise ValueError("render_batch needs the image fetch policy (images) with an image column")
    user_template = user or ""  # unused with a messages column
    tokenizer = load_tokenizer(tokenizer_path)
    if messages_column:
        placeholders: list[str] = []
        wanted = [id_column, messages_column]
    else:
        placeholders = prompt_fields(system, user_template)
        wanted = [id_column, *placeholders, *([image_column] if image_column else [])]
    wanted += [c for c in ("reject_code", "reject", "max_tokens") if c in batch.column_names]
    rows = batch.select(list(dict.fromkeys(wanted))).to_pylist()

    codes: list[str | None] = [None] * len(rows)
    errors: list[str | None] = [None] * len(rows)
    image_bytes: list[bytes | None] = [None] * len(rows)
    conversations, positions = [], []
    for i, row in enumerate(rows):
        if row.get("reject_code") is not None:
            codes[i], errors[i] = row["reject_code"], row["reject"]
            continue
        if row[id_column] is None:
            codes[i], errors[i] = Reason.NULL_ID, f"{id_column} (the id column) is null"
            continue
        if messages_column:
            conversations.append(json.loads(row[messages_column]))
            positions.append(i)
            continue
        blank = [c for c in placeholders if _is_blank(row[c])]
        if blank:
            codes[i], errors[i] = Reason.EMPTY_INPUT, f"{', '.join(blank)} is null, empty or blank"
            continue
        if image_column:
            assert images is not None  # checked above
            try:
                image_bytes[i] = load_image(row[image_column], storage or StorageOptions(), images)
            except ValueError as exc:
                codes[i], errors[i] = Reason.IMAGE, str(exc)
                continue
        conversations.append(build_messages(row, system, user_template, image=image_column is not None,
                                            instructions=instructions))
        positions.append(i)

    token_ids: list[list[int] | None] = [None] * len(rows)
    if conversations:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        # The rendered text already holds the template's special tokens.
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, ids in zip(positions, encoded):
            limit = max_model_len - (rows[i].get("max_tokens") or max_tokens)
            if len(ids) > limit:
                codes[i] = Reason.PROMPT_TOO_LONG
                errors[i] = f"{len(ids)} tokens; max_model_len minus max_tokens leaves {limit}"
            token_ids[i] = ids

    out = batch
    out = out.append_column("prompt_token_ids", pa.array(token_ids, type=pa.list_(pa.int32())))
    out = out.append_column("prompt_tokens", pa.array([None if t is None else len(t) for t in token_ids], pa.int64()))
    if image_column:
        out = out.append_column("image", pa.array(image_bytes, pa.binary()))
    out = out.append_column("error_code", pa.array(codes, pa.string()))
    out = out.append_column("error", pa.array(errors, pa.string()))
    assert out.num_rows == batch.num_rows, "render_batch must map each row to exactly one row"
    return out
