"""The one place tokenmill touches names that Ray, vLLM or argparse do not promise to keep.

Each use names the versions it was checked against. `tests/test_compat.py`
looks every name up in the installed versions and fails when one has gone, so
an upgrade breaks a test here rather than a run somewhere else. Nothing outside
this module imports `ray.*._internal` or reads a private attribute.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import threading
import time
from typing import Any, Callable

RAY_CHECKED = "2.60.0"
VLLM_CHECKED = "0.32.0"

# (module, attribute): what each function below reaches for. The test imports each and checks the attribute.
RAY_DATA_SCHEDULER_WAIT = ("ray.data._internal.execution.streaming_executor_state",
                           "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S")
RAY_DATA_NODE_POLLS = tuple(("ray.data._internal.execution.operators.actor_pool_map_operator", name)
                            for name in ("get_draining_nodes", "get_actor_locations"))
RAY_DATA_TIMED_CACHE = ("ray.data._internal.utils.cache", "timed_cache")
VLLM_ENGINE_DEAD = ("vllm.v1.engine.exceptions", "EngineDeadError")
VLLM_SYNC_CLIENT = ("vllm.v1.engine.core_client", "SyncMPClient")
VLLM_CLIENT_RESOURCES = ("vllm.v1.engine.core_client", "BackgroundResources")
# How the Jobs API tells an entrypoint its submission id: the job supervisor puts the job's config, metadata
# included, in one environment variable. Only the names are used, so nothing of the dashboard is imported at run
# time; tests/test_compat.py checks them against Ray's own constants.
RAY_JOB_CONFIG_ENV = ("ray._private.runtime_env.constants", "RAY_JOB_CONFIG_JSON_ENV_VAR")
RAY_JOB_ID_METADATA = ("ray.dashboard.modules.job.common", "JOB_ID_METADATA_KEY")
JOB_CONFIG_ENV_VAR, JOB_ID_METADATA_KEY = "RAY_JOB_CONFIG_JSON_ENV_VAR", "job_submission_id"

PRIVATE_NAMES: dict[str, tuple[str, str]] = {
    "ray_data_scheduler_wait": RAY_DATA_SCHEDULER_WAIT,
    "ray_data_draining_nodes": RAY_DATA_NODE_POLLS[0],
    "ray_data_actor_locations": RAY_DATA_NODE_POLLS[1],
    "ray_data_timed_cache": RAY_DATA_TIMED_CACHE,
    "vllm_engine_dead_error": VLLM_ENGINE_DEAD,
    "vllm_sync_client": VLLM_SYNC_CLIENT,
    "vllm_client_resources": VLLM_CLIENT_RESOURCES,
    "ray_job_config_env": RAY_JOB_CONFIG_ENV,
    "ray_job_id_metadata": RAY_JOB_ID_METADATA,
}


def _attr(where: tuple[str, str]) -> Any:
    module, name = where
    return getattr(importlib.import_module(module), name, None)


def engine_dead_error() -> type[BaseException]:
    """vLLM's exception for an engine core that died (checked on vLLM 0.32.0): caught by type, not by name."""
    found = _attr(VLLM_ENGINE_DEAD)
    return found if isinstance(found, type) and issubclass(found, BaseException) else _NeverRaised


class _NeverRaised(Exception):
    """Stands in where a vLLM version has no EngineDeadError: nothing is ever an instance of it."""


def output_request_id(enqueued_id: str) -> str:
    """The id a `RequestOutput` carries for a request `LLM.enqueue` answered with `enqueued_id`.

    vLLM 0.32.0 (checked) hands back its internal id, `<id>-<8 random characters>`, from `enqueue`, and the
    external `<id>` on outputs. Only this function knows that format.
    """
    return enqueued_id.rsplit("-", 1)[0]


def job_submission_id() -> str | None:
    """This driver's submission id where it runs as a Jobs API entrypoint (`ray job submit`), else None (checked
    on Ray 2.60.0, whose supervisor sets no variable of its own for it)."""
    raw = os.environ.get(JOB_CONFIG_ENV_VAR)
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    found = metadata.get(JOB_ID_METADATA_KEY) if isinstance(metadata, dict) else None
    return str(found) if found else None


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string an argparse parser knows (argparse's `_option_string_actions`, in CPython 3.11-3.13):
    the way to ask vLLM's own CLI parser whether it takes a flag, without it printing and exiting."""
    return set(parser._option_string_actions)


def shutdown_engine(llm: Any) -> None:
    """Stop a `vllm.LLM`'s engine core process now (vLLM 0.32.0: `llm.llm_engine.engine_core.shutdown()`)
    rather than when the object is collected; a no-op where there is none."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def slow_ray_data_scheduler(wait_s: float) -> bool:
    """Let Ray Data's streaming executor wait `wait_s` for finished tasks before it looks again, instead of
    0.1 s (Ray 2.60.0: a module constant of `streaming_executor_state`). Whether it was set."""
    module = importlib.import_module(RAY_DATA_SCHEDULER_WAIT[0])
    current = getattr(module, RAY_DATA_SCHEDULER_WAIT[1], None)
    if not isinstance(current, (int, float)):
        return False
    setattr(module, RAY_DATA_SCHEDULER_WAIT[1], max(current, wait_s))
    return True


def slow_ray_data_node_polls(ttl_s: float) -> list[str]:
    """Let Ray Data's actor pool ask which nodes drain, and where its actors live, every `ttl_s` instead of
    every second (Ray 2.60.0: two functions imported by name into `actor_pool_map_operator`, each wrapped in
    `timed_cache(ttl=1)`); they are wrapped again, once, with the longer cache. The names it re-wrapped."""
    pool = importlib.import_module(RAY_DATA_NODE_POLLS[0][0])
    timed_cache: Callable[..., Callable] | None = _attr(RAY_DATA_TIMED_CACHE)
    if timed_cache is None:
        return []
    done = []
    for _, name in RAY_DATA_NODE_POLLS:
        current = getattr(pool, name, None)
        inner = getattr(current, "__wrapped__", None)
        if callable(inner) and not getattr(current, "_tokenmill_seldom", False):
            seldom = timed_cache(ttl=ttl_s)(inner)
            seldom._tokenmill_seldom = True  # type: ignore[attr-defined]
            setattr(pool, name, seldom)
            done.append(name)
    return done


def wake_on_engine_death(llm: Any, poll_s: float = 0.5) -> bool:
    """Make a `vllm.LLM` raise `EngineDeadError` when its engine core process dies, instead of waiting forever.

    vLLM 0.32.0's synchronous client (`SyncMPClient`, checked) notices a dead
    engine core (`resources.engine_dead`) and shuts its output thread down, but
    that thread leaves without a word to `outputs_queue`, where `LLM.step` is
    waiting: a killed engine core hangs its replica for good. A watcher puts the
    error the client would have raised into that queue. It stops with the client.
    Returns whether the client had the expected shape (no watcher otherwise).
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    resources = getattr(core, "resources", None)
    outputs = getattr(core, "outputs_queue", None)
    finalizer = getattr(core, "_finalizer", None)
    if resources is None or outputs is None or not hasattr(resources, "engine_dead"):
        return False

    def watch() -> None:
        while not resources.engine_dead:
            if finalizer is not None and not finalizer.alive:
                return  # shut down cleanly
            time.sleep(poll_s)
        outputs.put_nowait(engine_dead_error()())

    threading.Thread(target=watch, name="tokenmill-engine-death-watch", daemon=True).start()
    return True
