"""The opt-in small-machine tuning (`TOKENMILL_SMALL_HOST=1`): process priorities, the daemons' environment,
Ray Data's node polls (pure process handling; no Ray cluster needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# In a child process, so the test runner itself is not reniced: stand-ins carry the titles Ray gives its
# processes (`exec -a` sets argv[0]), and one pooled worker changes title as Ray's do.
SCRIPT = r"""
import json, os, subprocess, time
from pipelines.run.small_host import yield_to_workers

def start(title):
    return subprocess.Popen(["bash", "-c", f"exec -a '{title}' sleep 30"])

helpers = [start(t) for t in ("ray::_StatsActor", "ray::ActorLocationTracker", "ray::DashboardAgent")]
engine = start("ray::MapWorker(MapBatches(GenerateStage))")
pooled = start("ray::IDLE")
time.sleep(0.5)
first = yield_to_workers()
nice = lambda p: os.getpriority(os.PRIO_PROCESS, p.pid)
idle = lambda pid: os.sched_getscheduler(pid) == os.SCHED_IDLE
seen = {"helpers": [nice(p) for p in helpers], "engine": nice(engine), "idle": nice(pooled),
        "driver": os.getpriority(os.PRIO_PROCESS, 0), "again": yield_to_workers(),
        "sched_idle": [idle(p.pid) for p in [*helpers, engine, pooled]] + [idle(0)]}
pooled.kill(); pooled.wait()
late = start("ray::_AutoscalingCoordinatorActor")  # a helper actor that starts once the dataset runs
time.sleep(0.5)
seen["late_changed"] = yield_to_workers() == [late.pid]
seen["late"] = nice(late)
for p in [*helpers, engine, late]:
    p.kill()
print(json.dumps(seen))
"""


def test_bookkeeping_yields_to_the_engine_and_late_helpers_are_found():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["helpers"] == [19, 19, 19]
    assert seen["driver"] == 19
    # The engine's actor and workers not yet given a job keep their priority.
    assert seen["engine"] == 0 and seen["idle"] == 0
    assert seen["again"] == []  # each process is looked at once per title
    assert seen["late_changed"] and seen["late"] == 19
    # Helpers nothing waits on run only when a core is free; the engine, pooled workers and driver do not.
    assert seen["sched_idle"] == [True, True, True, False, False, False]


def test_the_quiet_cluster_settings_reach_the_daemons_only(monkeypatch):
    from pipelines.run.small_host import QUIET_CLUSTER_ENV, daemon_env

    monkeypatch.setenv("REPORTER_UPDATE_INTERVAL_MS", "1234")  # the user's own setting wins
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    with daemon_env(QUIET_CLUSTER_ENV):
        assert os.environ["RAY_worker_niceness"] == "0" and os.environ["REPORTER_UPDATE_INTERVAL_MS"] == "1234"
    assert "RAY_worker_niceness" not in os.environ and os.environ["REPORTER_UPDATE_INTERVAL_MS"] == "1234"


def test_node_polls_are_slowed_and_wrapped_once(monkeypatch):
    """With the tuning the actor pool asks about draining nodes every 30 s, not every second."""
    import time

    from ray.data._internal.execution.operators import actor_pool_map_operator as pool
    from ray.data._internal.utils.cache import timed_cache

    from pipelines.compat import slow_ray_data_node_polls

    calls = []
    monkeypatch.setattr(pool, "get_actor_locations", pool.get_actor_locations)  # restored after the test
    monkeypatch.setattr(pool, "get_draining_nodes", timed_cache(ttl=1)(lambda: calls.append(1) or {}))
    assert slow_ray_data_node_polls(30.0) == ["get_draining_nodes", "get_actor_locations"]
    slowed = pool.get_draining_nodes
    assert slow_ray_data_node_polls(30.0) == []
    assert pool.get_draining_nodes is slowed
    assert slowed() == {} and (time.sleep(1.1) or slowed()) == {} and len(calls) == 1
    assert pool.get_actor_locations.__wrapped__.__name__ == "get_actor_locations"


def test_the_tuning_is_off_unless_asked_for(monkeypatch):
    from pipelines.run import small_host

    monkeypatch.delenv(small_host.ENV, raising=False)
    assert not small_host.enabled()
    for value, on in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(small_host.ENV, value)
        assert small_host.enabled() is on
