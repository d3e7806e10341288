"""Commit: a shard's files become part of a run only through its manifest, written last by the driver.

Layout under `<output.path>/<run_id>/`:

    _run.json                 what the run is (job, spec fingerprint); written first
    results/<shard>/*.parquet rows the engine generated
    rejects/<shard>/*.parquet rows it never generated, with the reason
    _manifests/<shard>.json   the shard's files and counts: `committed` or `quarantined`
    summary.json, _SUCCESS    written last, when every shard has a manifest

Readers trust only files a manifest lists. A manifest is one small object
written in one request (object stores make it visible whole or not at all;
on a local disk it is renamed into place), so a run killed at any moment leaves
either a shard's manifest or no manifest; resuming redoes the shards without
one, after removing what they had half written. The driver holds one entry per
shard, never per row.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from typing import Any, Literal, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.errors import ConfigError
from pipelines.io.storage import join, read_json, to_uri, write_json_atomic
from pipelines.run.lease import Lease
from pipelines.stages.read import InputPlan

log = logging.getLogger(__name__)

RUN_FILE = "_run.json"
MANIFESTS = "_manifests"
SUCCESS = "_SUCCESS"

# The layout's version, in every `_run.json` and manifest: a reader refuses a newer one rather than misread it.
SCHEMA_VERSION = 2  # 2: `_SUCCESS` names its job and its drift gates' outcome


class RunRecord(BaseModel):
    """`_run.json`: what the run is, written first and exclusively; the job it was started with, credentials
    masked, so that its summary and report can be rebuilt from the run alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    run_id: str
    job: str
    fingerprint: str  # of the spec and engine profile: a resume must match it
    created_at: str
    snapshot: dict[str, Any] | None = None  # `pipelines.config.load.job_snapshot`


class Manifest(BaseModel):
    """`_manifests/<shard>.json`: a shard's files and counts, written once, last, by the attempt that commits it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    shard: str  # the shard's key
    path: str  # the shard as the user named it
    state: Literal["committed", "quarantined"]
    rows: int | None  # the shard's rows; None for a shard set aside before it was read
    results: list[str]
    rejects: list[str]
    results_rows: int
    rejects_rows: int
    failed_rows: int
    reason: str | None = None  # a quarantined shard's `Reason`, and why
    message: str | None = None


class Success(BaseModel):
    """`_SUCCESS`: the run finished; written last, after `summary.json`. Its files and counts let a reader that
    trusts only markers (an Airflow sensor, a downstream job) find the results without the summary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    run_id: str
    results: list[str]
    rejects: list[str]
    records_in: int
    records_out: int
    records_rejected: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    started_at: str
    finished_at: str
    wall_s: float
    resumed: bool
    shards_redone: int
    job: str | None = None  # None in runs written before version 2
    # The drift gates' outcome (`pipelines.run.drift`): a `gate_failed` run is committed but not a baseline.
    gates: Literal["passed", "gate_failed", "not_compared"] | None = None


M = TypeVar("M", bound=BaseModel)


def read_record(model: type[M], fs, path: str, *, version: int = SCHEMA_VERSION, name: str | None = None
                ) -> M | None:
    """A versioned record of the run folder (`version`: the newest this tokenmill reads), or None where there is
    none; one written by a newer tokenmill, or damaged, is an error that names the file and the key."""
    data = read_json(fs, path)
    if data is None:
        return None
    if data.get("schema_version", version) > version:
        raise ConfigError(f"{path}: written by a newer tokenmill (version {data['schema_version']}, this one reads "
                          f"{version}); read it with that version")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: not a valid {name or model.__name__}: {where}: {first['msg']}") from None


def read_run_record(fs, run_root: str) -> RunRecord | None:
    return read_record(RunRecord, fs, join(run_root, RUN_FILE))


def create_run_record(fs, run_root: str, record: RunRecord) -> bool:
    """Write `_run.json` unless it exists (an exclusive create): whether this attempt created the run."""
    return write_json_atomic(fs, join(run_root, RUN_FILE), record.model_dump(mode="json"), exclusive=True)


def read_success(fs, run_root: str) -> Success | None:
    return read_record(Success, fs, join(run_root, SUCCESS))


def write_success(fs, run_root: str, success: Success) -> None:
    write_json_atomic(fs, join(run_root, SUCCESS), success.model_dump(mode="json"))


def read_manifests(fs, run_root: str) -> dict[str, Manifest]:
    """The run's manifests by shard key."""
    folder = join(run_root, MANIFESTS)
    if not fs.exists(folder):
        return {}
    out: dict[str, Manifest] = {}
    for path in fs.ls(folder, detail=False):
        manifest = read_record(Manifest, fs, path) if path.endswith(".json") else None
        if manifest is not None:  # gone since the listing: another attempt's, removed
            _check_own_files(run_root, path, manifest)
            out[manifest.shard] = manifest
    return out


def _check_own_files(run_root: str, where: str, manifest: Manifest) -> None:
    """Refuse a manifest that lists a file outside its run's results and rejects folders: tokenmill never writes
    one, so it was edited by hand or by someone else, and trusting it would read, list or delete another's files."""
    own = tuple(posixpath.join(_plain(run_root), sub) + "/" for sub in ("results", "rejects"))
    for f in (*manifest.results, *manifest.rejects):
        plain = _plain(f)
        if posixpath.normpath(plain) != plain or not plain.startswith(own):
            raise ConfigError(f"{where}: lists {f}, outside the run's results and rejects folders; refusing to "
                              "trust it (remove that manifest to run its shard again)")


def committed_results(manifests: dict[str, Manifest]) -> list[str]:
    """The results files of the committed shards."""
    return sorted(f for m in manifests.values() if m.state == "committed" for f in m.results)


def reject_uris(manifests: dict[str, Manifest], protocol: str) -> list[str]:
    """Every manifest's rejects files (a quarantined shard's marker among them), as `protocol` URIs."""
    return sorted(to_uri(f, protocol) for m in manifests.values() for f in m.rejects)


def _run_files(fs, run_root: str) -> set[str]:
    """The Parquet files under the run's results and rejects, as the filesystem names them (one listing each)."""
    found: set[str] = set()
    for sub in ("results", "rejects"):
        folder = join(run_root, sub)
        if fs.exists(folder):
            found.update(_plain(p) for p in fs.find(folder) if p.endswith(".parquet"))
    return found


def remove_uncommitted(fs, run_root: str, committed: dict[str, Manifest]) -> int:
    """Delete files no manifest lists (an interrupted attempt's, or a retried task's); return how many.

    Only the holder of the run's lease calls this (`pipelines.run.lease`): a live
    attempt's in-flight files are unlisted too, and must not be taken from under it.
    """
    listed = {_plain(f) for m in committed.values() for f in (*m.results, *m.rejects)}
    removed = 0
    for path in sorted(_run_files(fs, run_root) - listed):
        fs.rm(path)
        removed += 1
    return removed


def drop_broken_manifests(fs, run_root: str, manifests: dict[str, Manifest]
                          ) -> tuple[dict[str, Manifest], list[Manifest]]:
    """Manifests whose files are all there, and those that list a file that is gone, now removed.

    A committed shard can lose files to an older tokenmill's cleanup racing a live
    attempt, or to a hand or a lifecycle rule: its shard is then run again rather
    than failing every resume on the missing file.
    """
    present = _run_files(fs, run_root)
    good: dict[str, Manifest] = {}
    broken: list[Manifest] = []
    for key, m in manifests.items():
        missing = [f for f in (*m.results, *m.rejects) if _plain(f) not in present]
        if not missing:
            good[key] = m
            continue
        log.error("shard %s: its manifest lists %d files that are gone (first: %s); the shard is run again",
                  m.path, len(missing), missing[0])
        fs.rm(join(run_root, MANIFESTS, f"{key}.json"))
        broken.append(m)
    return good, broken


def _plain(path: str) -> str:
    return path.split("://", 1)[-1]


@dataclasses.dataclass
class ShardProgress:
    key: str
    uri: str
    expected: int
    results: list[str] = dataclasses.field(default_factory=list)
    rejects: list[str] = dataclasses.field(default_factory=list)
    results_rows: int = 0
    rejects_rows: int = 0
    failed_rows: int = 0
    quarantine_code: str | None = None  # set when the shard failed while being read: a `Reason`, and why
    quarantine: str | None = None

    @property
    def seen(self) -> int:
        return self.results_rows + self.rejects_rows


class Committer:
    """Tracks what the write stage reports, shard by shard, and commits each shard when all its rows are written."""

    def __init__(self, fs, run_root: str, plan: InputPlan, *, rejects: pa.Schema, run_id: str,
                 lease: Lease | None = None):
        self.fs, self.run_root, self.rejects, self.run_id, self.lease = fs, run_root, rejects, run_id, lease
        self.progress = {s.key: ShardProgress(s.key, s.uri, s.num_rows) for s in plan.shards}
        self.committed: list[str] = []

    def _manifest(self, p: ShardProgress) -> Manifest:
        return Manifest(shard=p.key, path=p.uri, state="committed", rows=p.expected, results=sorted(p.results),
                        rejects=sorted(p.rejects), results_rows=p.results_rows, rejects_rows=p.rejects_rows,
                        failed_rows=p.failed_rows)

    def _write(self, manifest: Manifest) -> bool:
        """Commit a shard; False (and this attempt's files for it deleted) when another attempt did first."""
        path = join(self.run_root, MANIFESTS, f"{manifest.shard}.json")
        if self.lease is not None:
            self.lease.check(f"commit shard {manifest.path}")
        if write_json_atomic(self.fs, path, manifest.model_dump(mode="json"), exclusive=True):
            return True
        log.warning("shard %s was committed by another attempt of this run; dropping this attempt's files",
                    manifest.path)
        for f in (*manifest.results, *manifest.rejects):
            if self.fs.exists(f):
                self.fs.rm(f)
        return False

    def record(self, written: dict[str, Any]) -> ShardProgress:
        """One row of the write stage's report (`pipelines.stages.write.WRITTEN`); commits the shard when complete."""
        p = self.progress[written["shard"]]
        if written["results_file"]:
            p.results.append(written["results_file"])
        if written["rejects_file"]:
            p.rejects.append(written["rejects_file"])
        p.results_rows += written["results_rows"]
        p.rejects_rows += written["rejects_rows"]
        p.failed_rows += written["failed_rows"]
        if written["quarantine_code"] and not p.quarantine_code:
            p.quarantine_code, p.quarantine = written["quarantine_code"], written["quarantine"]
            log.warning("shard %s quarantined: %s: %s", p.uri, p.quarantine_code, p.quarantine)
        if p.seen == p.expected and not p.quarantine_code and p.key not in self.committed:
            self._write(self._manifest(p))
            self.committed.append(p.key)
        return p

    def quarantine(self, key: str, uri: str, code: str, message: str | None, rows: int | None) -> None:
        """Set a whole shard aside: one reject row (`row` null) says which and why; none of its rows count."""
        row: dict[str, Any] = {name: None for name in self.rejects.names}
        row.update(shard=uri, row=None, reason=code, message=message, run_id=self.run_id)
        path = join(self.run_root, "rejects", key, "quarantine.parquet")
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as f:
            pq.write_table(pa.Table.from_pylist([row], schema=self.rejects), f)
        self._write(Manifest(shard=key, path=uri, state="quarantined", rows=rows, results=[], rejects=[path],
                             results_rows=0, rejects_rows=0, failed_rows=0, reason=code, message=message))

    def quarantine_unread(self, plan: InputPlan) -> None:
        """Shards set aside before reading (unreadable footer, drifted schema)."""
        for q in plan.quarantined:
            self.quarantine(q.key, q.uri, q.code, q.message, None)

    def finish(self) -> list[ShardProgress]:
        """Quarantine shards that failed while being read (their partial rows are dropped); return the incomplete."""
        incomplete = []
        for p in self.progress.values():
            if p.quarantine_code:
                self.quarantine(p.key, p.uri, p.quarantine_code, p.quarantine, p.expected)
            elif p.key not in self.committed:
                incomplete.append(p)
        return incomplete
