"""Prompt: render each record's chat messages with the model's chat template and tokenize them.

Tokenizing here, once, means the engine receives token ids and never tokenizes
on its own critical path, and `prompt_tokens` is exactly what the engine reads.
Records that cannot become a prompt keep their row and get an `error`.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import pyarrow as pa

from pipelines.config.job import template_fields
from pipelines.storage import StorageOptions, read_bytes


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """One tokenizer per worker process and model, loaded on first use."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def build_messages(row: dict[str, Any], system: str | None, user: str, *, image: bool = False) -> list[dict]:
    """The chat messages for one record; with `image`, the user message is an image part then a text part."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system.format(**row)})
    text = user.format(**row)
    content: Any = [{"type": "image"}, {"type": "text", "text": text}] if image else text
    messages.append({"role": "user", "content": content})
    return messages


def load_image(value: Any, storage: StorageOptions) -> bytes:
    """An image cell's bytes: the bytes themselves, or the object a path or URI names.

    Raises ValueError with the reason (`image: ...`) when there is no usable image.
    """
    from PIL import Image

    if _is_blank(value) or (isinstance(value, bytes) and not value):
        raise ValueError("image: the image column is null or empty")
    where = "inline bytes"
    if isinstance(value, str):
        where = value
        try:
            value = read_bytes(value, storage)
        except FileNotFoundError:
            raise ValueError(f"image: {where}: not found") from None
        except Exception as exc:  # noqa: BLE001 - any store error is the row's reason
            raise ValueError(f"image: {where}: cannot read: {exc}") from None
    try:
        Image.open(io.BytesIO(value)).verify()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"image: {where}: not a decodable image: {exc}") from None
    return value


def render_batch(
    batch: pa.Table,
    *,
    tokenizer_path: str,
    system: str | None,
    user: str,
    id_column: str,
    max_prompt_tokens: int,
    image_column: str | None = None,
    storage: StorageOptions | None = None,
) -> pa.Table:
    """Add `prompt_token_ids`, `prompt_tokens` and `error` to a batch; one row out per row in.

    Args:
        tokenizer_path: Tokenizer folder or id (the engine's).
        system, user: The spec's `prompt.system` and `prompt.user` templates.
        id_column: The spec's `input.id_column`; a null id is an error.
        max_prompt_tokens: `max_model_len - max_tokens`: a longer prompt cannot
            be generated in full, so it is an error rather than an engine failure.
        image_column: The spec's `prompt.image_column`: its image is loaded,
            checked and carried to the engine in an `image` column.
        storage: Object-store access for image URIs.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    placeholders = template_fields(system or "") + template_fields(user)
    wanted = [id_column, *placeholders, *([image_column] if image_column else [])]
    rows = batch.select(list(dict.fromkeys(wanted))).to_pylist()

    errors: list[str | None] = [None] * len(rows)
    images: list[bytes | None] = [None] * len(rows)
    conversations, positions = [], []
    for i, row in enumerate(rows):
        if row[id_column] is None:
            errors[i] = f"input: {id_column} (the id column) is null"
            continue
        blank = [c for c in placeholders if _is_blank(row[c])]
        if blank:
            errors[i] = f"input: {', '.join(blank)} is null or empty"
            continue
        if image_column:
            try:
                images[i] = load_image(row[image_column], storage or StorageOptions())
            except ValueError as exc:
                errors[i] = str(exc)
                continue
        conversations.append(build_messages(row, system, user, image=image_column is not None))
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
    if image_column:
        out = out.append_column("image", pa.array(images, pa.binary()))
    out = out.append_column("error", pa.array(errors, pa.string()))
    assert out.num_rows == batch.num_rows, "render_batch must map each row to exactly one row"
    return out
