"""`tokenmill rejects replay`: a new run over exactly the records a run rejected, once their cause is gone.

The new run reads the rejected rows back from the original input shards (each
reject names its shard and row), staged as Parquet beside the runs
(`<output.path>/_replay/<run id>/`), and runs the original job spec, with the
`--set` changes given and the engine profiles and prices of today's `conf/`, so a
cause fixed there, or with `--set`, is gone. Its summary names the run it
replays. Reasons that the same record can never get past are refused.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config.load import job_from_data, unmasked_storage
from pipelines.config.storage import StorageOptions
from pipelines.errors import ConfigError, InputError
from pipelines.io.storage import filesystem_for, join, protocol_of, to_uri
from pipelines.paths import REPO_CONF_DIR
from pipelines.run.commit import read_manifests, read_run_record, reject_uris
from pipelines.run.runner import run_job
from pipelines.run.summary import ReplayOf, RunSummary, scan_results
from pipelines.schema import Reason

log = logging.getLogger(__name__)

REPLAY_DIR = "_replay"

#: Reasons a record may get past on another try: the engine failed it, its image was missing or refused, or its
#: prompt did not fit (a larger `max_model_len` or smaller `max_tokens` fits it).
REPLAYABLE = (Reason.ENGINE, Reason.IMAGE, Reason.PROMPT_TOO_LONG)
#: The others, and why the same record would be rejected again.
NEVER = {
    Reason.NULL_ID: "its id is null",
    Reason.DUPLICATE_ID: "its id was answered once already",
    Reason.EMPTY_INPUT: "its prompt columns are empty",
    Reason.INVALID_UTF8: "its text is not UTF-8",
    Reason.INVALID_JSON: "its request line is not valid JSON",
    Reason.INVALID_URL: "its request line asks for another endpoint",
    Reason.INVALID_REQUEST: "its request is not one tokenmill can serve",
    Reason.INVALID_ENCODING: "its request line is not UTF-8",
    Reason.DUPLICATE_CUSTOM_ID: "its custom_id was answered once already",
    Reason.LINE_TOO_LONG: "its request line is over the limit",
    Reason.UNREADABLE: "its whole shard is unreadable: fix the shard and run the job again, which resumes it",
    Reason.SCHEMA: "its whole shard lacks a column: fix the shard and run the job again, which resumes it",
}


@dataclass(frozen=True)
class ReplayRows:
    """The rejects chosen for a replay: shard URI, row index, id and reason, one row each."""

    rows: pl.DataFrame
    reasons: tuple[str, ...]


def chosen_reasons(found: dict[str, int], asked: Sequence[str] | None) -> tuple[str, ...]:
    """The reasons to replay, checked: each asked one must be replayable; none asked means every replayable one
    the run has. Raises ConfigError naming what cannot be replayed and why."""
    if asked:
        known = {r.value for r in Reason}
        for reason in asked:
            if reason not in known:
                raise ConfigError(f"--reasons: {reason!r} is not a reason; known: {', '.join(sorted(known))}")
            if reason in NEVER:
                raise ConfigError(f"--reasons: {reason} cannot be replayed: {NEVER[Reason(reason)]}, so the same "
                                  "record would be rejected again")
            if reason not in REPLAYABLE:
                raise ConfigError(f"--reasons: {reason} is not a reject reason")
        return tuple(dict.fromkeys(asked))
    mine = tuple(r.value for r in REPLAYABLE if found.get(r.value))
    if not mine:
        held = ", ".join(f"{r} ({n})" for r, n in sorted(found.items())) or "none"
        raise ConfigError(f"nothing to replay: the run's rejects are {held}; only "
                          f"{', '.join(r.value for r in REPLAYABLE)} can succeed on another try")
    return mine


def rejected_rows(reject_files: list[str], storage: StorageOptions, id_column: str, asked: Sequence[str] | None
                  ) -> ReplayRows:
    """The rejects of the chosen reasons (a quarantined shard's marker row, with no row index, is none of them)."""
    frame = scan_results(reject_files, storage)
    if frame is None:
        raise ConfigError("nothing to replay: the run has no rejects")
    rows = frame.filter(pl.col("row").is_not_null()).select("shard", "row", pl.col(id_column).alias("id"),
                                                            "reason").collect()
    found = {r["reason"]: r["len"] for r in rows.group_by("reason").len().iter_rows(named=True)}
    reasons = chosen_reasons(found, asked)
    chosen = rows.filter(pl.col("reason").is_in(list(reasons))).sort("shard", "row")
    if chosen.is_empty():
        raise ConfigError(f"nothing to replay: the run has no rejects for {', '.join(reasons)}")
    return ReplayRows(rows=chosen, reasons=reasons)


def stage(rows: ReplayRows, columns: list[str], storage: StorageOptions, out_fs, folder: str) -> int:
    """Write the chosen rows, read back from their shards, as one Parquet file per shard under `folder`; the same
    rejects always make the same files, so a retried replay resumes its run. Returns the number of rows."""
    if out_fs.exists(folder):
        out_fs.rm(folder, recursive=True)
    out_fs.makedirs(folder, exist_ok=True)
    total = 0
    for k, (shard, group) in enumerate(rows.rows.group_by("shard", maintain_order=True)):
        fs, path = filesystem_for(str(shard[0]), storage)
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=columns)
        except Exception as exc:  # noqa: BLE001 - gone, moved or rewritten since the run: the user's to see
            raise InputError(f"{shard[0]}: the shard the rejected rows came from cannot be read ({exc}); "
                             "nothing was replayed") from None
        taken = table.take(pa.array(group["row"].to_list(), pa.int64()))
        with out_fs.open(join(folder, f"part-{k:05d}.parquet"), "wb") as f:
            pq.write_table(taken, f)
        total += taken.num_rows
    return total


def replay(run_path: str, *, reasons: Sequence[str] | None = None, run_id: str | None = None,
           overrides: Sequence[str] = (), engine_overrides: Sequence[str] = (), progress: bool = True
           ) -> RunSummary:
    """Replay the rejects of the run at `run_path` (its folder); the new run's summary."""
    storage = StorageOptions().resolved()
    fs, root = filesystem_for(run_path, storage)
    record = read_run_record(fs, root)
    if record is None or record.snapshot is None:
        raise ConfigError(f"{run_path}: not a tokenmill run folder (no _run.json with its job)")
    snapshot = record.snapshot
    spec = dict(snapshot["spec"])
    if spec["input"].get("format") == "openai_batch":
        raise ConfigError(f"{run_path}: replaying OpenAI batch input is not supported; resubmit the failed lines "
                          "from errors.jsonl as a new batch file")
    spec["storage"] = unmasked_storage(spec.get("storage") or {})
    conf = Path(snapshot["conf_dir"]) if Path(snapshot["conf_dir"], "engines").is_dir() else REPO_CONF_DIR
    source = Path(snapshot.get("spec_path") or "replay.yaml")
    probe = job_from_data(dict(spec), source=source, overrides=overrides, conf_dir=conf,
                          engine_overrides=engine_overrides)
    storage = probe.spec.storage.resolved()
    manifests = read_manifests(fs, root)
    chosen = rejected_rows(reject_uris(manifests, protocol_of(run_path)), storage, probe.spec.id_column, reasons)

    new_id = run_id or f"{record.run_id}-replay-" + hashlib.sha1(",".join(chosen.reasons).encode()).hexdigest()[:6]
    out_fs, out_root = filesystem_for(probe.spec.output.path, storage)
    folder = join(out_root, REPLAY_DIR, new_id)
    n = stage(chosen, probe.spec.read_columns, storage, out_fs, folder)
    log.info("replay of %s: %d rejected records (%s) staged in %s", record.run_id, n, ", ".join(chosen.reasons),
             folder)
    job = job_from_data(dict(spec), source=source, conf_dir=conf, engine_overrides=engine_overrides,
                        overrides=[*overrides, f"input.path={to_uri(folder, protocol_of(probe.spec.output.path))}"])
    lineage = ReplayOf(run=run_path, run_id=record.run_id, reasons=list(chosen.reasons), records=n)
    return run_job(job, run_id=new_id, progress=progress, lineage=lineage)
