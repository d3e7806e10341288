"""The prompt stage with the real tokenizer: exact token counts, errors kept per row."""

from __future__ import annotations

import pyarrow as pa

from pipelines.stages.prompt import load_tokenizer, render_batch

SYSTEM = "You route tickets for {channel}."
USER = "Subject: {subject}\n\n{body}"


def render(table, model_path, max_prompt_tokens=2000):
    return render_batch(table, tokenizer_path=str(model_path), system=SYSTEM, user=USER, id_column="id",
                        max_model_len=max_prompt_tokens + 48, max_tokens=48)


def test_token_counts_match_the_chat_template(model_path):
    table = pa.table({"id": [1, 2], "channel": ["email", "chat"], "subject": ["Refund", "Crash"],
                      "body": ["I was charged twice.", "The app {crashes} on start."]})
    out = render(table, model_path)
    tok = load_tokenizer(str(model_path))
    for row, ids, n in zip(table.to_pylist(), out.column("prompt_token_ids").to_pylist(),
                           out.column("prompt_tokens").to_pylist()):
        messages = [{"role": "system", "content": SYSTEM.format(**row)},
                    {"role": "user", "content": USER.format(**row)}]
        expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ids == list(expected) and n == len(expected)
    assert out.column("error").null_count == out.column("error_code").null_count == 2
    # A value holding braces is data, not a placeholder.
    assert "{crashes}" in tok.decode(out.column("prompt_token_ids")[1].as_py())


def test_bad_rows_keep_their_place_with_an_error(model_path):
    table = pa.table({"id": [1, None, 3, 4], "channel": ["email"] * 4, "subject": ["a", "b", "  ", "d"],
                      "body": ["x", "y", "z", None]})
    out = render(table, model_path)
    assert out.num_rows == 4
    assert out.column("id").to_pylist() == [1, None, 3, 4]
    codes, errors = out.column("error_code").to_pylist(), out.column("error").to_pylist()
    assert codes == [None, "null_id", "empty_input", "empty_input"]
    assert errors[0] is None
    assert errors[1] == "id (the id column) is null"
    assert errors[2] == "subject is null, empty or blank"
    assert errors[3] == "body is null, empty or blank"


def test_too_long_prompt_is_an_error_not_an_engine_failure(model_path):
    table = pa.table({"id": [1], "channel": ["email"], "subject": ["long"], "body": ["word " * 500]})
    out = render(table, model_path, max_prompt_tokens=100)
    error = out.column("error")[0].as_py()
    assert out.column("error_code")[0].as_py() == "prompt_too_long" and "leaves 100" in error
