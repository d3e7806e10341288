"""Commit primitives: exclusive manifest writes (local disk and a real S3 server), and removal of unlisted files."""

from __future__ import annotations

import json

import fsspec

from pipelines.io.storage import read_json, write_json_atomic
from pipelines.run.commit import read_manifests, remove_uncommitted


def test_exclusive_write_on_a_local_disk(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "run/_manifests/a.json")
    assert write_json_atomic(fs, path, {"shard": "a", "n": 1}, exclusive=True)
    assert not write_json_atomic(fs, path, {"shard": "a", "n": 2}, exclusive=True)  # the first commit stands
    assert read_json(fs, path) == {"shard": "a", "n": 1}
    assert sorted(p.name for p in (tmp_path / "run/_manifests").iterdir()) == ["a.json"]  # no temporary left
    write_json_atomic(fs, path, {"shard": "a", "n": 3})
    assert json.loads((tmp_path / "run/_manifests/a.json").read_text())["n"] == 3


def test_exclusive_write_on_s3_uses_a_conditional_put(s3_env):
    s3_env.client().create_bucket(Bucket="tokenmill-commit")
    fs = fsspec.filesystem("s3")
    assert write_json_atomic(fs, "tokenmill-commit/run/_run.json", {"attempt": 1}, exclusive=True)
    assert not write_json_atomic(fs, "tokenmill-commit/run/_run.json", {"attempt": 2}, exclusive=True)
    assert read_json(fs, "tokenmill-commit/run/_run.json") == {"attempt": 1}


def test_files_no_manifest_lists_are_removed(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    for name in ("results/a/1.parquet", "results/a/2.parquet", "rejects/a/1.parquet", "results/b/9.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    write_json_atomic(fs, f"{root}/_manifests/a.json", {
        "shard": "a", "path": "a.parquet", "state": "committed", "rows": 3, "results": [f"{root}/results/a/1.parquet"],
        "rejects": [f"{root}/rejects/a/1.parquet"], "results_rows": 2, "rejects_rows": 1, "failed_rows": 0})
    manifests = read_manifests(fs, root)
    assert remove_uncommitted(fs, root, manifests) == 2  # a retried task's a/2, and all of uncommitted b
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet"))
    assert left == ["rejects/a/1.parquet", "results/a/1.parquet"]



def test_run_records_and_manifests_are_typed_and_a_newer_or_damaged_one_is_named(tmp_path):
    import pytest

    from pipelines.errors import ConfigError
    from pipelines.run.commit import SCHEMA_VERSION, RunRecord, create_run_record, read_run_record

    fs = fsspec.filesystem("file")
    root = str(tmp_path / "run")
    record = RunRecord(run_id="r", job="j", fingerprint="f" * 40, created_at="2026-11-29T00:00:00+00:00")
    assert read_run_record(fs, root) is None
    assert create_run_record(fs, root, record) and not create_run_record(fs, root, record.model_copy())
    assert read_run_record(fs, root) == record and record.schema_version == SCHEMA_VERSION
    manifest = {"shard": "a", "path": "a.parquet", "state": "quarantined", "rows": None, "results": [],
                "rejects": [], "results_rows": 0, "rejects_rows": 0, "failed_rows": 0, "reason": "schema",
                "message": "column 'x' is missing"}
    write_json_atomic(fs, f"{root}/_manifests/a.json", manifest)
    assert read_manifests(fs, root)["a"].message == "column 'x' is missing"
    write_json_atomic(fs, f"{root}/_manifests/a.json", {**manifest, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ConfigError, match=r"a\.json: written by a newer tokenmill"):
        read_manifests(fs, root)
    write_json_atomic(fs, f"{root}/_manifests/a.json", {**manifest, "state": "half-done"})
    with pytest.raises(ConfigError, match=r"a\.json: not a valid Manifest"):
        read_manifests(fs, root)


def test_a_manifest_listing_a_file_outside_its_run_is_refused_and_nothing_is_deleted(tmp_path, capsys):
    from pathlib import Path

    import pytest

    from pipelines.cli import main
    from pipelines.config.load import job_snapshot, load_job
    from pipelines.errors import ConfigError
    from pipelines.run.commit import RunRecord, create_run_record

    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out" / "run")
    victim = tmp_path / "elsewhere" / "precious.parquet"
    victim.parent.mkdir()
    victim.write_bytes(b"not the run's")
    own = f"{root}/results/a/1.parquet"
    manifest = {"shard": "a", "path": "a.parquet", "state": "committed", "rows": 1, "results": [own], "rejects": [],
                "results_rows": 1, "rejects_rows": 0, "failed_rows": 0}
    for listed in (str(victim), f"{root}/results/../../../elsewhere/precious.parquet", f"{root}/_manifests/b.json",
                   f"{root}-other/results/a/1.parquet"):
        write_json_atomic(fs, f"{root}/_manifests/a.json", {**manifest, "results": [own, listed]})
        with pytest.raises(ConfigError, match=r"a\.json: lists .*, outside the run's results and rejects folders"):
            read_manifests(fs, root)
    # The same refusal where a person meets it: rebuilding the run's report.
    job = load_job(Path(__file__).resolve().parents[2] / "conf/jobs/ticket_triage.yaml",
                   overrides=[f"output.path={tmp_path / 'out'}"])
    create_run_record(fs, root, RunRecord(run_id="run", job=job.spec.name, fingerprint="f" * 40,
                                          created_at="2026-11-29T00:00:00+00:00", snapshot=job_snapshot(job)))
    assert main(["report", root]) == 2
    assert "outside the run's results and rejects folders" in capsys.readouterr().err
    assert victim.read_bytes() == b"not the run's"
    write_json_atomic(fs, f"{root}/_manifests/a.json", manifest)
    assert list(read_manifests(fs, root)) == ["a"]  # its own files only: trusted
