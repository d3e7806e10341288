"""Prompt: render each record's chat messages with the model's chat template and tokenize them.

Tokenizing here, once, means the engine receives token ids and never tokenizes
on its own critical path, and `prompt_tokens` is exactly what the engine reads.
Records that cannot become a prompt keep their row and get an `error`.
"""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa

from pipelines.config.job import template_fields


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """One tokenizer per worker process and model, loaded on first use."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def build_messages(row: dict[str, Any], system: str | None, user: str) -> list[dict[str, str]]:
    messages = []
    if system:
        messages.append({"role": "system", "content": system.format(**row)})
    messages.append({"role": "user", "content": user.format(**row)})
    return messages


def render_batch(
    batch: pa.Table,
    *,
    tokenizer_path: str,
    system: str | None,
    user: str,
    id_column: str,
    max_prompt_tokens: int,
) -> pa.Table:
    """Add `prompt_token_ids`, `prompt_tokens` and `error` to a batch; one row out per row in.

    Args:
        tokenizer_path: Tokenizer folder or id (the engine's).
        system, user: The spec's `prompt.system` and `prompt.user` templates.
        id_column: The spec's `input.id_column`; a null id is an error.
        max_prompt_tokens: `max_model_len - max_tokens`: a longer prompt cannot
            be generated in full, so it is an error rather than an engine failure.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    placeholders = template_fields(system or "") + template_fields(user)
    rows = batch.select(list(dict.fromkeys([id_column, *placeholders]))).to_pylist()

    errors: list[str | None] = [None] * len(rows)
    conversations, positions = [], []
    for i, row in enumerate(rows):
        if row[id_column] is None:
            errors[i] = f"input: {id_column} (the id column) is null"
            continue
        blank = [c for c in placeholders if _is_blank(row[c])]
        if blank:
            errors[i] = f"input: {', '.join(blank)} is null or empty"
            continue
        conversations.append(build_messages(row, system, user))
        positions.append(i)

    token_ids: list[list[int] | None] = [None] * len(rows)
    if conversations:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        # The rendered text already holds the template's special tokens.
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, ids in zip(positions, encoded):
            if len(ids) > max_prompt_tokens:
                errors[i] = (
                    f"prompt_too_long: {len(ids)} tokens; max_model_len minus max_tokens leaves {max_prompt_tokens}"
                )
            token_ids[i] = ids

    out = batch
    out = out.append_column("prompt_token_ids", pa.array(token_ids, type=pa.list_(pa.int32())))
    out = out.append_column("prompt_tokens", pa.array([None if t is None else len(t) for t in token_ids], pa.int64()))
    out = out.append_column("error", pa.array(errors, pa.string()))
    assert out.num_rows == batch.num_rows, "render_batch must map each row to exactly one row"
    return out
