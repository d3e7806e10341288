"""What the engine replicas did, kept in the run's folder: the ledger that accelerator time is billed from.

Each replica writes `_engines/<replica>.json` when it starts and after each
batch: when it was created, how long its engine took to start, when it last
worked and how long it was busy. The driver stamps `stopped_at` on its attempt's
replicas when the attempt ends. The files outlive the driver, so a run that is
killed and resumed is still billed for every replica it started, up to the last
moment each was seen working. They hold O(batches) numbers, never rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from typing import Any

from pipelines.io.storage import join, write_json_atomic

log = logging.getLogger(__name__)

LEDGER_DIR = "_engines"


def _node_id() -> str | None:
    """The Ray node this replica runs on (a lost node's replicas are named in the summary), if under Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class ReplicaLedger:
    """One replica's entry in the ledger; written by the engine actor itself."""

    def __init__(self, fs, run_root: str, *, attempt: str, profile: str) -> None:
        self.fs = fs
        self.path = join(run_root, LEDGER_DIR, f"{attempt}-{uuid.uuid4().hex[:12]}.json")
        self.entry: dict[str, Any] = {"attempt": attempt, "profile": profile, "node": _node_id(),
                      "created_at": time.time(), "ready_at": None,
                      "engine_start_s": None, "last_seen": time.time(), "stopped_at": None, "batches": 0,
                      "rows": 0, "output_tokens": 0, "busy_s": 0.0, "first_batch_start": None}
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self._save()  # at once: a replica lost while its engine starts is still billed, and its node known

    def _save(self) -> None:
        try:
            write_json_atomic(self.fs, self.path, self.entry)
        except OSError as exc:  # the ledger must never fail a batch; the driver's stamp still bounds the time
            log.warning("engine ledger %s not written: %s", self.path, exc)

    def ready(self, engine_start_s: float, *, dtype: str | None = None) -> None:
        self.entry.update(ready_at=time.time(), engine_start_s=engine_start_s, last_seen=time.time(), dtype=dtype)
        self._save()

    def batch(self, start: float, end: float, rows: int, output_tokens: int, **profile: float | None) -> None:
        """One batch done; `profile` figures (engine idle seconds, peak memory) replace the last ones."""
        with self._lock:  # two batches of one replica may finish at once
            e = self.entry
            if e["first_batch_start"] is None:
                e["first_batch_start"] = start
            e["batches"] += 1
            e["rows"] += rows
            e["output_tokens"] += output_tokens
            # Batches overlap in the engine loop: busy time is the union of their spans.
            e["busy_s"] += max(0.0, end - max(start, self._busy_until))
            self._busy_until = max(self._busy_until, end)
            e["last_seen"] = max(e["last_seen"], end)
            e.update(profile)
            self._save()


def read_ledger(fs, run_root: str) -> list[dict]:
    """Every replica entry of the run, all attempts."""
    folder = join(run_root, LEDGER_DIR)
    if not fs.exists(folder):
        return []
    out = []
    for path in sorted(fs.find(folder)):
        if path.endswith(".json"):
            with fs.open(path, "rb") as f:
                out.append({**json.load(f), "path": path})
    return out


def stop_attempt(fs, run_root: str, attempt: str, stopped_at: float | None = None) -> None:
    """Stamp the end of an attempt on its replicas: the engines were shut down with the pool at this moment."""
    stopped_at = stopped_at or time.time()
    for entry in read_ledger(fs, run_root):
        if entry["attempt"] == attempt and entry.get("stopped_at") is None:
            path = entry.pop("path")
            write_json_atomic(fs, path, {**entry, "stopped_at": max(stopped_at, entry["last_seen"])})


def replica_seconds(entry: dict) -> float:
    """A replica's billed time: from its creation to its shutdown, or, where its attempt was killed before it
    could say, to the last moment it was seen working."""
    end = entry.get("stopped_at") or entry["last_seen"]
    return max(0.0, end - entry["created_at"])


@dataclasses.dataclass
class EngineStats:
    """The ledger summed: what the summary reports about the engines."""

    replicas: int = 0
    engine_start_s: list[float] = dataclasses.field(default_factory=list)
    replica_s: float = 0.0
    busy_s: float = 0.0
    rows: int = 0
    output_tokens: int = 0
    steady_s: float = 0.0
    dtypes: set[str] = dataclasses.field(default_factory=set)  # what the replicas' engines ran in

    @classmethod
    def from_ledger(cls, entries: list[dict]) -> "EngineStats":
        s = cls(replicas=len(entries))
        for e in entries:
            if e.get("engine_start_s") is not None:
                s.engine_start_s.append(e["engine_start_s"])
            if e.get("dtype"):
                s.dtypes.add(e["dtype"])
            s.replica_s += replica_seconds(e)
            s.busy_s += e["busy_s"]
            s.rows += e["rows"]
            s.output_tokens += e["output_tokens"]
            if e.get("first_batch_start") is not None:
                s.steady_s += e["last_seen"] - e["first_batch_start"]
        return s
