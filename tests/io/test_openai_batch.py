"""OpenAI Batch API files in and out: every request line ends in exactly one of the two output files."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import jsonschema
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import QUICK_START_ARGS

from pipelines.cli import main
from pipelines.config import load_job
from pipelines.config.storage import StorageOptions
from pipelines.io.openai_batch import stage_requests
from pipelines.samples.tickets import make_tickets

REPO = Path(__file__).resolve().parents[2]
BUCKET = "tokenmill-openai"
ROUTE = {"type": "object", "properties": {"team": {"type": "string", "enum": ["billing", "technical", "other"]}},
         "required": ["team"], "additionalProperties": False}


def request_lines(n: int = 24) -> list[str]:
    """`n` chat-completion requests as a hosted API would take them, then the bad ones swapped in."""
    lines = []
    for i, t in enumerate(make_tickets(n).to_pylist()):
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "developer", "content": "Route the ticket to a team."},
                         {"role": "user", "content": [{"type": "text", "text": f"{t['subject']}\n{t['body']}"}]}],
            "max_tokens": 12 + i,
            "temperature": 0,
        }
        if i % 4 == 1:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "route", "strict": True, "schema": ROUTE}}
        lines.append(json.dumps({"custom_id": f"req-{i:03d}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}))
    lines[3] = '{"custom_id": "req-003", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [ oops'
    lines[5] = lines[5].replace("/v1/chat/completions", "/v1/embeddings")
    lines[7] = lines[7].replace('"req-007"', '"req-006"')  # a duplicate: lines 7 and 8 both say req-006
    lines[9] = lines[9].replace('"temperature": 0', '"temperature": 0, "n": 3')
    lines[11] = lines[11].replace('{"type": "text", "text"', '{"type": "image_url", "text"')
    return lines[:12] + [""] + lines[12:]  # a blank line is no request


def jsonl(client, bucket: str, key: str) -> list[dict]:
    """An output file of a run on S3, one JSON object a line."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(x) for x in body.splitlines()]


def spec_file(tmp_path: Path, input_path: str, output_path: str) -> Path:
    spec = {"name": "batch_file", "engine": "cpu-smollm2",
            "input": {"path": input_path, "format": "openai_batch"},
            "output": {"path": output_path, "format": "openai_batch"},
            "sampling": {"max_tokens": 32}}
    path = tmp_path / "batch_file.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_staging_keeps_every_line_and_says_why_bad_ones_cannot_be_served(tmp_path):
    lines = request_lines()
    lines[14] = lines[14].replace("Route the ticket", "Route th\udcff ticket")  # a lone invalid byte
    (tmp_path / "requests.jsonl").write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    job = load_job(spec_file(tmp_path, str(tmp_path / "requests.jsonl"), str(tmp_path / "out")),
                   conf_dir=REPO / "conf")
    fs = fsspec.filesystem("file")
    [staged] = stage_requests(job.spec, StorageOptions(), fs, str(tmp_path / "staged"))
    rows = pq.read_table(staged).to_pylist()
    assert len(rows) == 24 and [r["line"] for r in rows] == [*range(1, 13), *range(14, 26)]
    codes = {(r["custom_id"], r["line"]): r["reject_code"] for r in rows if r["reject_code"]}
    rejects = {(r["custom_id"], r["line"]): r["reject"] for r in rows if r["reject_code"]}
    assert set(rejects) == set(codes) and all(rejects.values())
    assert codes[("req-003", 4)] == "invalid_json"
    assert rejects[("req-003", 4)].startswith("line 4 of requests.jsonl: not valid JSON")
    assert codes[("req-005", 6)] == "invalid_url" and codes[("req-006", 7)] == "duplicate_custom_id"
    assert codes[("req-009", 10)] == codes[("req-011", 12)] == "invalid_request"
    assert "url '/v1/embeddings' is not served" in rejects[("req-005", 6)]
    for line in (7, 8):  # both lines of the repeated id: which one was meant is unknowable
        assert "appears on lines requests.jsonl:7, requests.jsonl:8" in rejects[("req-006", line)]
    assert "body.n 3" in rejects[("req-009", 10)]
    assert "content part of type 'image_url'" in rejects[("req-011", 12)]
    assert codes[("req-013", 15)] == "invalid_encoding"
    assert rejects[("req-013", 15)] == "line 15 of requests.jsonl: the line is not valid UTF-8"
    ok = [r for r in rows if not r["reject_code"]]
    assert len(ok) == 17
    first = ok[0]
    assert json.loads(first["messages"])[0] == {"role": "system", "content": "Route the ticket to a team."}
    assert first["max_tokens"] == 12 and json.loads(first["request_params"]) == {"max_tokens": 12, "temperature": 0}
    assert json.loads(ok[1]["request_params"])["structured"] == {"json": ROUTE}


@pytest.mark.engine
def test_batch_file_round_trip_through_s3(ray_cluster, s3_env, model_path, tmp_path, capsys):
    client = s3_env.client()
    client.create_bucket(Bucket=BUCKET)
    lines = request_lines()
    # A schema JSON Schema allows but the engine's grammar compiler refuses (a look-behind): the engine
    # fails that one request, the others in its batch keep their outputs.
    refused = json.loads(lines[0])
    refused["custom_id"] = "req-refused"
    refused["body"]["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}, "required": ["a"]}}}
    lines.append(json.dumps(refused))
    client.put_object(Bucket=BUCKET, Key="requests/batch-1.jsonl", Body=("\n".join(lines) + "\n").encode())
    spec = spec_file(tmp_path, f"s3://{BUCKET}/requests/", f"s3://{BUCKET}/out/")
    code = main(["run", str(spec), "--conf-dir", str(REPO / "conf"), "--run-id", "rt", "--no-progress",
                 *QUICK_START_ARGS])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]

    output, errors = jsonl(client, BUCKET, "out/rt/output.jsonl"), jsonl(client, BUCKET, "out/rt/errors.jsonl")
    sent = [json.loads(x)["custom_id"] for x in lines if x and x != lines[3]] + ["req-003"]
    assert len(output) + len(errors) == len(sent) == 25
    ok_ids, err_ids = {o["custom_id"] for o in output}, {e["custom_id"] for e in errors}
    assert not ok_ids & err_ids, "a custom_id is in both files"
    assert ok_ids | err_ids == set(sent), "a custom_id is in neither file"
    assert len(ok_ids) == len(output)

    got = {(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errors}
    assert got == {("req-003", "invalid_json", 4), ("req-005", "invalid_url", 6), ("req-006", "duplicate_custom_id", 7),
                   ("req-006", "duplicate_custom_id", 8), ("req-009", "invalid_request", 10),
                   ("req-011", "invalid_request", 12), ("req-refused", "engine", 26)}
    refusal = next(e for e in errors if e["custom_id"] == "req-refused")["error"]["message"]
    assert refusal.startswith("VLLMValidationError") and "rammar" in refusal
    assert all(e["response"] is None and e["id"].startswith("batch_req_") for e in errors)

    requested = {json.loads(x)["custom_id"]: json.loads(x)["body"] for i, x in enumerate(lines) if x and i != 3}
    for o in output:
        assert o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "SmolLM2-135M-Instruct"
        usage, choice = body["usage"], body["choices"][0]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > usage["prompt_tokens"] > 0
        assert usage["completion_tokens"] <= requested[o["custom_id"]]["max_tokens"]  # per-request max_tokens
        if "response_format" in requested[o["custom_id"]] and choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), ROUTE)  # constrained per request

    summary = json.loads(client.get_object(Bucket=BUCKET, Key="out/rt/summary.json")["Body"].read())
    assert summary["records_in"] == 25 and summary["records_out"] == len(output) == 18
    assert summary["records_failed"] == summary["records_rejected"] == len(errors) == 7
    assert summary["output"]["output_lines"] == len(output)
    assert summary["completion_tokens"] == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in output)
    assert "OpenAI batch files" in printed.out


def hostile_lines() -> dict[str, tuple[str, str]]:
    """Lines crafted to break a parser, by name: (the line, the code it must be rejected with)."""
    ok = json.loads(request_lines()[0])

    def line(custom_id: str, **body) -> str:
        return json.dumps({**ok, "custom_id": custom_id, "body": {**ok["body"], **body}})

    deep = "[" * 200_000 + "]" * 200_000
    return {
        "deep": ('{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": ' + deep + "}",
                 "invalid_json"),
        "deep-bare": (deep, "invalid_json"),
        "surrogate-text": (line("surrogate-text", messages=[{"role": "user", "content": "hi \ud800 there"}]),
                           "invalid_encoding"),
        "surrogate-id": (line("sur\udc00rogate"), "invalid_encoding"),
        "bad-escape": ('{"custom_id": "bad-escape", "url": "/v1/chat/completions", "body": "\\x41"}', "invalid_json"),
        "bad-escape-in-id": ('{"custom_id": "esc\\q", "body": {}', "invalid_json"),
        "array": ("[1, 2, 3]", "invalid_json"),
        "string": ('"a request"', "invalid_json"),
        "null": ("null", "invalid_json"),
        "number": ("1e999999", "invalid_json"),
        "huge": (line("huge", messages=[{"role": "user", "content": "x" * 5_000_000}]), "line_too_long"),
        "control-bytes": (line("control") + "\x00\x1b[2J", "invalid_json"),
    }


@pytest.mark.cluster
def test_hostile_lines_are_rejected_one_by_one_and_the_run_goes_on(ray_cluster, s3_env, model_path, tmp_path, capsys):
    """Each crafted line becomes an errors.jsonl entry with its code and line number; the good lines around them
    are answered (on the stand-in engine: what is tested is the reading, staging and writing, on S3)."""
    client = s3_env.client()
    client.create_bucket(Bucket=f"{BUCKET}-hostile")
    good = request_lines()
    hostile = hostile_lines()
    lines = [good[0], *(text for text, _ in hostile.values()), good[1]]
    body = "\n".join(lines).encode("utf-8", "surrogatepass") + b"\n"
    client.put_object(Bucket=f"{BUCKET}-hostile", Key="requests/batch.jsonl", Body=body)
    spec = spec_file(tmp_path, f"s3://{BUCKET}-hostile/requests/", f"s3://{BUCKET}-hostile/out/")
    assert main(["run", str(spec), "--conf-dir", str(REPO / "conf"), "--run-id", "hostile", "--no-progress",
                 "--set", "engine=stand-in", "--set", "sampling.max_tokens=4"]) == 0, capsys.readouterr().err[-3000:]

    output = jsonl(client, f"{BUCKET}-hostile", "out/hostile/output.jsonl")
    errors = jsonl(client, f"{BUCKET}-hostile", "out/hostile/errors.jsonl")
    assert sorted(o["custom_id"] for o in output) == ["req-000", "req-001"]
    by_line = {e["error"]["line"]: e for e in errors}
    assert sorted(by_line) == list(range(2, 2 + len(hostile)))  # each hostile line, once, by its number
    for line_no, (name, (_, code)) in enumerate(hostile.items(), start=2):
        error = by_line[line_no]["error"]
        assert error["code"] == code, (name, error)
        assert error["message"].startswith(f"line {line_no} of batch.jsonl: "), (name, error)
    ids = {e["error"]["line"]: e["custom_id"] for e in errors}
    assert ids[2] == "deep" and ids[6] == "bad-escape" and ids[12] == "huge"  # found even where the JSON is not
    assert ids[5] == "sur\\udc00rogate" and ids[7] == "esc\\q"  # written as escapes, not lost
    assert "nested too deeply" in by_line[2]["error"]["message"]
    assert "longer than 4,194,304 bytes" in by_line[12]["error"]["message"]
    with capsys.disabled():
        print(f"\nhostile OpenAI batch lines: {len(hostile)} tried, {len(errors)} rejected, "
              f"{len(output)} good lines answered")


def test_a_request_file_larger_than_the_limit_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import pipelines.io.openai_batch as batch

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.jsonl").write_text("\n".join(request_lines()[:2]) + "\n")
    monkeypatch.setattr(batch, "MAX_FILE_BYTES", 100)
    spec = spec_file(tmp_path, str(tmp_path / "in"), str(tmp_path / "out"))
    assert main(["check", str(spec), "--conf-dir", str(REPO / "conf")]) == 2
    assert "big.jsonl is " in capsys.readouterr().err and not (tmp_path / "out").exists()
