"""A replica's engine processes die with the replica, however it dies.

vLLM runs its engine core (and, on some platforms, a worker) as child processes
of the engine actor. When the actor is killed with SIGKILL, or its node's
raylet or the driver is, nothing runs its cleanup: the children are re-parented
to init and hold their memory, on a GPU node the GPU's, until someone kills
them by hand. So each replica starts this watchdog before its engine: a small
process in a session of its own that waits for the replica to disappear and
then kills every process that carries the replica's mark.

The watchdog keeps the replica's descendants as last seen, every quarter
second, and also marks them: an environment variable set in the actor before the
engine starts, which every process vLLM spawns inherits, finds those spawned
since the last look. Either way it finds the engine's processes after they were
re-parented, and never a process of another replica. A parent-death signal would
be quicker, but Linux sends it when the *thread* that forked dies, and actors
fork from short-lived threads.

Run as `python -m pipelines.stages.watchdog <replica pid> <mark>`; it imports
only psutil, so it starts in a fraction of a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from typing import Collection

MARK = "TOKENMILL_REPLICA"
POLL_S = 0.25


def marked(mark: str, *, skip: Collection[int] = ()) -> list:
    """Every process of this user whose environment carries `MARK=mark`."""
    import psutil

    found = []
    for p in psutil.process_iter():
        if p.pid in skip:
            continue
        try:
            if p.environ().get(MARK) == mark:
                found.append(p)
        except (psutil.Error, OSError):  # gone, a zombie, or another user's
            continue
    return found


def watch(replica_pid: int, mark: str, *, poll_s: float = POLL_S) -> int:
    """Wait until the replica's process or its parent (the node's raylet) is gone, then kill what is left of
    the replica; the number of processes killed.

    What it left is found two ways: the replica's descendants as last seen (taken
    every poll, since once it is gone they are re-parented and no longer its), and
    every process carrying its mark (those spawned since the last poll). The mark
    alone is not enough: a process that sets its title (vLLM's `VLLM::EngineCore`
    does) overwrites the memory its environment is read from.
    """
    import psutil

    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    try:
        replica = psutil.Process(replica_pid)
        keeper = replica.ppid()  # a Ray worker's parent is its node's raylet
    except psutil.NoSuchProcess:
        replica, keeper = None, 0
    while replica is not None:
        try:
            # `is_running` also checks the start time, so a recycled pid is not mistaken for the replica.
            if not replica.is_running() or replica.status() == psutil.STATUS_ZOMBIE or os.getppid() != replica_pid:
                break
            if replica.ppid() != keeper:
                # Its raylet is gone (the node is being lost): the replica would notice only after Ray's
                # timeouts, seconds during which its engine holds the accelerator. It goes now, with the rest.
                seen.setdefault(replica.pid, replica)
                break
            for p in replica.children(recursive=True):
                if p.pid != me:
                    seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            break
        seen = {pid: p for pid, p in seen.items() if p.is_running()}
        time.sleep(poll_s)
    victims = {p.pid: p for p in [*seen.values(), *marked(mark, skip={me})] if p.is_running()}
    for p in list(victims.values()):  # what they spawned since the last poll
        try:
            victims.update({c.pid: c for c in p.children(recursive=True) if c.pid != me})
        except psutil.Error:
            pass
    for p in victims.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=5)
    return len(victims)


def start(env: dict[str, str] | None = None) -> str:
    """Mark this process (the replica) and start its watchdog; returns the mark.

    Call before the engine starts, so that its processes inherit the mark.
    """
    mark = os.environ.get(MARK)
    if mark and os.environ.get(f"{MARK}_PID") == str(os.getpid()):
        return mark  # this replica has its watchdog already (an engine restarted in place)
    mark = uuid.uuid4().hex
    os.environ[MARK], os.environ[f"{MARK}_PID"] = mark, str(os.getpid())
    dog = subprocess.Popen([sys.executable, "-m", "pipelines.stages.watchdog", str(os.getpid()), mark],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True, env={**os.environ, **(env or {})})
    os.environ[f"{MARK}_WATCHDOG"] = str(dog.pid)
    return mark


def watchdog_pid() -> int | None:
    """This replica's watchdog, which is no part of its engine (its memory is not the engine's)."""
    pid = os.environ.get(f"{MARK}_WATCHDOG")
    return int(pid) if pid and os.environ.get(f"{MARK}_PID") == str(os.getpid()) else None


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
