"""The run's lease: one live attempt per run, even when a scheduler retries while the first attempt still runs.

`_lease.json` in the run folder names the holder, a fencing token and an
expiry. An attempt creates it, or takes it over once it has expired, with a
conditional write (`pipelines.io.storage.write_if_version`), so of two attempts
racing for it exactly one wins; the token goes up by one at every takeover. A
heartbeat thread renews it, again conditionally: a renewal that finds another
token has lost the lease. Before the holder writes anything that others rely on
(a manifest, `_SUCCESS`) or deletes anything, it checks that its lease is still
good for a safety margin; an attempt that was paused past its expiry (a stalled
driver, a partitioned network) therefore stops instead of committing over the
attempt that took its place.

Times in the file are wall-clock seconds, since they are read on other machines;
the holder judges its own lease by its monotonic clock.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
import socket
import threading
import time

from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines import compat
from pipelines.errors import ConfigError, RunBusy
from pipelines.io.storage import join, read_versioned, write_if_version

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
LEASE_SCHEMA_VERSION = 1


class LeaseRecord(BaseModel):
    """`_lease.json`: who is running the run, until when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = LEASE_SCHEMA_VERSION
    holder: str  # user@host, pid and, under `ray job submit`, the submission id
    attempt: str
    token: int  # the fencing token: one more at every takeover
    acquired_at: float
    renewed_at: float
    expires_at: float
    released: bool = False

    def live(self, now: float) -> bool:
        return not self.released and now < self.expires_at


def holder_name() -> str:
    """Who this attempt is, in words an operator can find it by."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    name = f"{user}@{socket.gethostname()} pid {os.getpid()}"
    submission = compat.job_submission_id()
    return f"{name} (Ray job {submission})" if submission else name


def _ago(t: float) -> str:
    return f"{max(0.0, time.time() - t):.0f} s ago"


class Lease:
    """This attempt's hold on a run folder: `acquire`, then `check` before each commit, then `release`."""

    def __init__(self, fs, run_root: str, *, attempt: str, ttl_s: float, holder: str | None = None) -> None:
        self.fs, self.path, self.attempt, self.ttl_s = fs, join(run_root, LEASE_FILE), attempt, ttl_s
        self.holder = holder or holder_name()
        # Commits stop this long before the lease would expire, so none lands after another attempt may take over.
        self.margin_s = min(10.0, ttl_s / 4)
        self.record: LeaseRecord | None = None
        self.previous: LeaseRecord | None = None  # the expired lease this attempt took over, if any
        self._version: str | None = None
        self._good_until = 0.0  # monotonic
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[LeaseRecord, str] | None:
        found = read_versioned(self.fs, self.path)
        if found is None:
            return None
        data, version = found
        if data.get("schema_version", 1) > LEASE_SCHEMA_VERSION:
            raise ConfigError(f"{self.path}: written by a newer tokenmill (version {data['schema_version']})")
        try:
            return LeaseRecord.model_validate(data), version
        except ValidationError as exc:
            raise ConfigError(f"{self.path}: not a valid lease: {exc.errors()[0]['msg']}") from None

    def _write(self, record: LeaseRecord, version: str | None) -> bool:
        sent = time.monotonic()
        new = write_if_version(self.fs, self.path, record.model_dump(mode="json"), version)
        if new is None:
            return False
        self.record, self._version = record, new
        self._good_until = sent + self.ttl_s - self.margin_s  # from before the write: never longer than the store's
        return True

    def _try(self) -> LeaseRecord | None:
        """One attempt to take the lease; None when taken, else the live lease that stands in the way."""
        now = time.time()
        found = self._read()
        token = 1
        if found is not None:
            current, version = found
            if current.live(now):
                return current
            token = current.token + 1
        record = LeaseRecord(holder=self.holder, attempt=self.attempt, token=token, acquired_at=now, renewed_at=now,
                             expires_at=now + self.ttl_s)
        if self._write(record, None if found is None else found[1]):
            if found is not None and not found[0].released:
                self.previous = found[0]
                log.warning("took over the run's lease from %s (token %d), which expired %s without being released",
                            found[0].holder, found[0].token, _ago(found[0].expires_at))
            return None
        return self._read_live() or self._try()  # lost the race: see who won

    def _read_live(self) -> LeaseRecord | None:
        found = self._read()
        return found[0] if found is not None and found[0].live(time.time()) else None

    def acquire(self, *, wait_s: float = 0.0) -> Lease:
        """Take the lease, waiting up to `wait_s` for a live one to end; `RunBusy` names its holder otherwise."""
        deadline = time.monotonic() + wait_s
        while True:
            other = self._try()
            if other is None:
                break
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:.0f} s" if wait_s else ""
                raise RunBusy(
                    f"{self.path}: this run is being run by {other.holder} (attempt {other.attempt}, lease token "
                    f"{other.token}, renewed {_ago(other.renewed_at)}, expires in "
                    f"{max(0.0, other.expires_at - time.time()):.0f} s){waited}; one attempt at a time: wait for it "
                    "(run --wait SECONDS), stop it, or let its lease expire if it is gone")
            # Look again every few seconds (the holder may release it), and just after it expires.
            time.sleep(max(0.2, min(self.ttl_s / 3, 5.0, other.expires_at - time.time() + 0.2,
                                    deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._heartbeat, name="tokenmill-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Extend the lease; False once it is lost (another token holds it)."""
        with self._lock:
            if self._lost or self.record is None:
                return False
            now = time.time()
            record = self.record.model_copy(update={"renewed_at": now, "expires_at": now + self.ttl_s})
            try:
                if self._write(record, self._version):
                    return True
            except OSError as exc:  # the store is unreachable: try again; the lease lapses by itself meanwhile
                log.warning("lease %s not renewed: %s", self.path, exc)
                return True
            found = self._read()
            by = f"{found[0].holder} (token {found[0].token})" if found else "nobody: the lease file is gone"
            self._lost = f"another attempt took this run's lease over: now held by {by}"
            log.error("%s", self._lost)
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if not self.renew():
                return

    def check(self, what: str) -> None:
        """Raise `RunBusy` unless the lease is still held for the safety margin; call before `what` is done."""
        why = self._lost
        if why is None and time.monotonic() >= self._good_until:
            # Not lost for good: a renewal that still finds this token (the store was only slow) makes it good again.
            why = (f"this attempt's lease ran out {time.monotonic() - self._good_until:.0f} s ago without a "
                   "renewal (was the driver paused or cut off from the store?)")
        if why:
            raise RunBusy(f"{self.path}: refused to {what}: {why}; what was committed stays valid, and the "
                          "attempt that holds the lease finishes the run")

    def release(self) -> None:
        """Stop renewing and mark the lease released, so the next attempt starts at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._lost or self.record is None:
                return
            now = time.time()
            try:
                self._write(self.record.model_copy(update={"released": True, "renewed_at": now, "expires_at": now}),
                            self._version)
            except OSError as exc:
                log.warning("lease %s not released (it expires by itself): %s", self.path, exc)
            self._good_until = 0.0  # nothing is committed after the release

    @property
    def token(self) -> int:
        return self.record.token if self.record else 0

    def describe(self) -> str:
        r = self.record
        if r is None:
            return "no lease"
        since = dt.datetime.fromtimestamp(r.acquired_at, dt.timezone.utc).isoformat(timespec="seconds")
        return f"{r.holder}, token {r.token}, since {since}"
