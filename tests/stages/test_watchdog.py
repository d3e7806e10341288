"""The replica watchdog (`pipelines.stages.watchdog`) on real processes: a replica killed with SIGKILL takes the
processes it spawned with it, even those re-parented or in a session of their own, and no process of another
replica. The same on a real vLLM engine is in `tests/run/test_faults.py`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
from conftest import alive, wait_gone

REPO = Path(__file__).resolve().parents[2]

# A stand-in for an engine actor: starts its watchdog, then spawns what vLLM would (a child, and a grandchild
# in a session of its own), writes their pids and sleeps until killed.
REPLICA = textwrap.dedent("""
    import subprocess, sys, time
    from pipelines.stages import watchdog
    watchdog.start()
    # vLLM titles its processes (VLLM::EngineCore), which overwrites where their environment is read from.
    child = subprocess.Popen([sys.executable, "-c", "import setproctitle, time; "
                              "setproctitle.setproctitle('VLLM::EngineCore' + ' ' * 200); time.sleep(600)"])
    grandchild = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
        "print(p.pid, flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    print(child.pid, grandchild.pid, grandchild.stdout.readline().strip(), flush=True)
    time.sleep(600)
""")


def _replica() -> tuple[subprocess.Popen, list[psutil.Process]]:
    proc = subprocess.Popen([sys.executable, "-c", REPLICA], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    spawned = [psutil.Process(int(p)) for p in proc.stdout.readline().split()]
    assert len(spawned) == 3
    return proc, spawned


def test_a_replica_killed_with_sigkill_takes_its_processes_with_it():
    doomed, doomed_spawned = _replica()
    other, other_spawned = _replica()  # another replica on the node: untouched
    try:
        time.sleep(1)  # the watchdog has seen the replica's processes (it looks four times a second)
        doomed.send_signal(signal.SIGKILL)
        wait_gone(doomed_spawned, limit=10, what="the killed replica's processes outlived it")
        doomed.wait()
        assert all(map(alive, [psutil.Process(other.pid), *other_spawned]))
    finally:
        other.kill()
        other.wait()
    wait_gone(other_spawned, limit=10, what="the other replica's processes outlived it")


def test_a_replica_whose_raylet_is_killed_goes_at_once_with_its_processes():
    """The replica's parent (a Ray worker's is its node's raylet) killed with SIGKILL: the watchdog does not
    wait for the replica to notice, it kills the replica and what it spawned."""
    keeper = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        replica = subprocess.Popen([sys.executable, "-c", {REPLICA!r}], stdout=subprocess.PIPE, text=True)
        print(replica.pid, replica.stdout.readline().strip(), flush=True)
        time.sleep(600)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    spawned = [psutil.Process(int(p)) for p in keeper.stdout.readline().split()]
    assert len(spawned) == 4  # the replica and its three
    time.sleep(1)
    keeper.send_signal(signal.SIGKILL)
    wait_gone(spawned, limit=5, what="the replica outlived its raylet")
    keeper.wait()
