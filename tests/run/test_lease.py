"""The run's lease (`pipelines.run.lease`): one holder, conditional writes on a local disk and on real S3,
takeover of an expired lease, fencing of the attempt that lost it, and the commit it then may not make."""

from __future__ import annotations

import threading
import time

import fsspec
import pyarrow as pa
import pytest

from pipelines.errors import RunBusy
from pipelines.io.storage import read_versioned, write_if_version
from pipelines.run.commit import Committer, Manifest, drop_broken_manifests, read_manifests, write_json_atomic
from pipelines.run.lease import LEASE_FILE, Lease


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """A run folder on a local disk, or on the session's SeaweedFS S3 server."""
    if request.param == "local":
        return fsspec.filesystem("file"), str(tmp_path / "run")
    s3 = request.getfixturevalue("s3_env")
    bucket = f"tokenmill-lease-{time.time_ns()}"
    s3.client().create_bucket(Bucket=bucket)
    return fsspec.filesystem("s3", skip_instance_cache=True), f"{bucket}/run"


def test_a_conditional_write_succeeds_once_per_version(store):
    fs, root = store
    path = f"{root}/x.json"
    v1 = write_if_version(fs, path, {"n": 1}, None)
    assert v1 is not None
    assert write_if_version(fs, path, {"n": 9}, None) is None  # exists: a create loses
    v2 = write_if_version(fs, path, {"n": 2}, v1)
    assert v2 is not None and v2 != v1
    assert write_if_version(fs, path, {"n": 3}, v1) is None  # stale version: refused
    assert read_versioned(fs, path) == ({"n": 2}, v2)


def test_of_attempts_racing_for_a_lease_exactly_one_holds_it(store):
    fs, root = store
    won, refused = [], []

    def attempt(n: int) -> None:
        try:
            won.append(Lease(fs, root, attempt=f"a{n}", ttl_s=30, holder=f"racer {n}").acquire())
        except RunBusy as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5, (won, refused)
    holder = won[0].holder
    assert all(f"being run by {holder}" in r and "lease token 1" in r for r in refused)
    won[0].release()


def test_a_live_lease_refuses_names_its_holder_and_can_be_waited_for(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "run")
    first = Lease(fs, root, attempt="aaa", ttl_s=3, holder="alice@node-1 pid 7").acquire()
    with pytest.raises(RunBusy, match=r"being run by alice@node-1 pid 7 \(attempt aaa, lease token 1"):
        Lease(fs, root, attempt="bbb", ttl_s=3).acquire()
    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    second = Lease(fs, root, attempt="bbb", ttl_s=3).acquire(wait_s=20)
    assert 0.8 < time.monotonic() - t0 < 15
    # A released lease is handed on, not taken over: the next token, and no takeover to report.
    assert second.token == 2 and second.previous is None
    second.release()


def test_an_expired_lease_is_taken_over_and_its_old_holder_may_not_commit(store):
    fs, root = store
    old = Lease(fs, root, attempt="old", ttl_s=1.5, holder="old driver").acquire()
    old._stop.set()  # its heartbeat stops, as when the driver is paused or cut off
    old._thread.join()
    time.sleep(1.7)
    new = Lease(fs, root, attempt="new", ttl_s=30, holder="new driver").acquire()
    assert new.token == 2 and new.previous is not None and new.previous.holder == "old driver"
    with pytest.raises(RunBusy, match="refused to commit shard s0: this attempt's lease ran out"):
        old.check("commit shard s0")
    assert not old.renew()  # a renewal finds the new token: lost for good
    with pytest.raises(RunBusy, match="took this run's lease over: now held by new driver"):
        old.check("commit shard s0")
    new.check("commit shard s0")
    new.release()


def test_a_heartbeat_keeps_a_lease_past_its_ttl(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "run")
    lease = Lease(fs, root, attempt="a", ttl_s=1.2).acquire()
    time.sleep(3)  # more than twice the ttl: only renewals keep it
    lease.check("commit")
    with pytest.raises(RunBusy):
        Lease(fs, root, attempt="b", ttl_s=1.2).acquire()
    lease.release()
    assert (tmp_path / "run" / LEASE_FILE).exists()


def _manifest(root: str, key: str, files: list[str]) -> dict:
    return Manifest(shard=key, path=f"{key}.parquet", state="committed", rows=1, results=files, rejects=[],
                    results_rows=1, rejects_rows=0, failed_rows=0).model_dump(mode="json")


def test_a_committer_whose_lease_is_gone_writes_no_manifest(tmp_path):
    import pyarrow.fs as pafs

    from pipelines.stages.read import InputPlan, Shard

    fs, root = fsspec.filesystem("file"), str(tmp_path / "run")
    lease = Lease(fs, root, attempt="a", ttl_s=1.2).acquire()
    lease._stop.set()
    lease._thread.join()
    schema = pa.schema([("id", pa.string())])
    plan = InputPlan(uri="in", shards=[Shard(key="s0", path="s0.parquet", uri="s0.parquet", num_rows=1, schema=schema)],
                     quarantined=[], filesystem=pafs.LocalFileSystem(), columns=["id"], schema=schema)
    committer = Committer(fs, root, plan, rejects=schema, run_id="r", lease=lease)
    time.sleep(1.3)
    written = {"shard": "s0", "results_file": f"{root}/results/s0/x.parquet", "rejects_file": None,
               "results_rows": 1, "rejects_rows": 0, "failed_rows": 0, "quarantine_code": None, "quarantine": None}
    with pytest.raises(RunBusy, match="refused to commit shard s0.parquet"):
        committer.record(written)
    assert read_manifests(fs, root) == {}


def test_a_committed_shard_whose_files_are_gone_is_dropped_to_be_run_again(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "run")
    for name in ("results/a/1.parquet", "results/b/1.parquet"):
        (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / name).write_bytes(b"x")
    write_json_atomic(fs, f"{root}/_manifests/a.json", _manifest(root, "a", [f"{root}/results/a/1.parquet"]))
    write_json_atomic(fs, f"{root}/_manifests/b.json", _manifest(root, "b", [
        f"{root}/results/b/1.parquet", f"{root}/results/b/2.parquet"]))  # b/2 is gone
    good, broken = drop_broken_manifests(fs, root, read_manifests(fs, root))
    assert set(good) == {"a"} and [m.shard for m in broken] == ["b"]
    assert set(read_manifests(fs, root)) == {"a"}  # b's manifest is removed: the next attempt redoes b
