"""Tuning for a small machine (a 2-core development box), off unless `TOKENMILL_SMALL_HOST=1`.

On a machine of two cores every wakeup of Ray's bookkeeping comes out of the
engine's time. With the setting, a cluster tokenmill starts itself is started
quieter (`QUIET_CLUSTER_ENV`), Ray's bookkeeping processes yield to the engine
(niceness, `SCHED_IDLE`), and Ray Data's scheduler and node polls look less
often (through `pipelines.compat`, Ray's private names). It is worth a few
percent of throughput there and nothing on a GPU node, where the engine does
not run on the CPU; a cluster that tokenmill joins (`RAY_ADDRESS`, `ray job
submit`) is never tuned. Measure it with `tokenmill bench throughput` on your
own machine before you turn it on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time

from pipelines import compat

log = logging.getLogger(__name__)

ENV = "TOKENMILL_SMALL_HOST"


def enabled() -> bool:
    """Whether the user asked for the small-machine tuning (`TOKENMILL_SMALL_HOST=1`)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def tune(*, scheduler_wait_s: float = 0.5, node_poll_s: float = 30.0) -> None:
    """Everything but the daemons' environment, once the local cluster is up (`pipelines.run.cluster`).

    Ray Data's scheduler loop wakes every 0.1 s, and asks which nodes drain and
    where its actors live once a second; our tasks run for seconds and one local
    node never drains (py-spy over 90 s of a 2-core run: the two polls were 84 of
    the driver's 581 busy samples).
    """
    yield_to_workers()
    compat.slow_ray_data_scheduler(scheduler_wait_s)
    compat.slow_ray_data_node_polls(node_poll_s)
    # Ray Data starts its helper actors when a dataset runs: look for new ones for as long as we live.
    threading.Thread(target=_keep_yielding, name="tokenmill-yield", daemon=True).start()


# What a cluster tokenmill starts for itself hands its daemons, which read it when they start. On a small
# machine every wakeup of Ray's bookkeeping comes out of the engine:
QUIET_CLUSTER_ENV = {
    # Ray starts its workers at niceness 15 and keeps its daemons and this driver at 0, so its bookkeeping
    # preempts the engine; here the engine's actor runs at 0 and the rest yields (yield_to_workers).
    "RAY_worker_niceness": "0",
    # The log monitor globs the log folder for new files ten times a second until there are a thousand;
    # every 2 s is soon enough (a new file is read from its start, so no line is lost).
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "2",
    # The dashboard agent samples every worker's process stats every 5 s for a dashboard a local cluster
    # does not run; its node metrics come every 30 s instead. Application metrics are not affected.
    "REPORTER_UPDATE_INTERVAL_MS": "30000",
}


@contextlib.contextmanager
def daemon_env(values: dict[str, str]):
    """`values` in the environment (where the user has not set them) while the cluster's daemons start."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# Ray's processes that do bookkeeping, not the job's work: its daemons, by program, and Ray Data's helper
# actors, by process title. The raylet stays as it is (it forks the workers, which would inherit its
# niceness), and so do the task workers that feed the engine.
_RAY_DAEMONS = ("gcs_server", "dashboard/agent.py", "runtime_env/agent/main.py")
_RAY_HELPER_TITLES = ("ray::_", "ray::ActorLocationTracker", "ray::DashboardA")


# Bookkeeping nothing waits on: Ray Data's helper actors and the dashboard agent (called without waiting
# for the answer), and Ray's log and autoscaler monitors, which only poll (by program). They run under
# SCHED_IDLE, only when a core has nothing else to do: a Python Ray worker wakes every 10 ms to check for
# signals, and a waking nice-19 thread may still preempt an engine thread that the engine's other threads
# then wait for. GCS, the runtime-env agent (a starting actor waits for it) and this driver only yield.
_RAY_POLLERS = ("log_monitor.py", "monitor.py")


def _bookkeeping(proc, argv: list[str]) -> str | None:
    """"idle" for bookkeeping nothing waits on, "yield" for the rest of it, None for the job's processes."""
    if proc.name() == "raylet":
        return None
    # The program itself, not its arguments: the raylet names the agents' scripts among its flags.
    program = " ".join(argv[:3])
    if argv[0].startswith(_RAY_HELPER_TITLES) or any(d in program for d in _RAY_POLLERS):
        return "idle"
    return "yield" if any(d in program for d in _RAY_DAEMONS) else None


def yield_to_workers(niceness: int = 19) -> list[int]:
    """Raise the niceness of this driver's threads and of the local cluster's bookkeeping processes (never
    lowers it, so no privilege is needed); the pids changed. Called when the cluster starts, then every few
    seconds (Ray Data starts its helper actors when a dataset runs); a process is looked at once per title."""
    import psutil

    changed = []
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            title = proc.cmdline()
            # A pooled worker takes a new title with each task or actor it runs: look again when it does.
            if not title or title[0] == "ray::IDLE" or (proc.pid, title[0]) in _SEEN:
                continue
            _SEEN.add((proc.pid, title[0]))
            kind = "yield" if proc.pid == me.pid else _bookkeeping(proc, title)
            if kind is None:
                continue
            idle = kind == "idle"
            for tid in [t.id for t in proc.threads()]:  # niceness and policy are per thread on Linux
                if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
                if idle and os.sched_getscheduler(tid) != os.SCHED_IDLE:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            changed.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return changed


_SEEN: set[tuple[int, str]] = set()  # (pid, title) pairs yield_to_workers has dealt with


def _keep_yielding() -> None:
    # Helper actors appear within seconds of a dataset's start; a scan costs tens of milliseconds of /proc
    # reading, so look often at first and seldom after.
    for delay in itertools.chain((1, 2, 4, 8, 15, 30), itertools.repeat(60)):
        time.sleep(delay)
        yield_to_workers()
