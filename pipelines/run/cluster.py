"""Joining a Ray cluster: the one in `RAY_ADDRESS` (as under `ray job submit`), else a local one."""

from __future__ import annotations

import logging
import os
import socket
import time

from pipelines.errors import ConfigError
from pipelines.io.storage import protocol_of
from pipelines.run import small_host


def ensure_ray() -> None:
    """Join the cluster in `RAY_ADDRESS`, else start a local one.

    A local cluster is started as Ray starts it, unless `TOKENMILL_SMALL_HOST=1` asks for the small-machine
    tuning (`pipelines.run.small_host`); a cluster that is joined is never tuned from here.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        check_answers(os.environ["RAY_ADDRESS"])
        ray.init()
        return
    if not small_host.enabled():
        ray.init(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)
        return
    with small_host.daemon_env(small_host.QUIET_CLUSTER_ENV):
        ray.init(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)
    small_host.tune()


def check_answers(address: str, *, attempts: int = 3, timeout_s: float = 5.0) -> None:
    """Refuse, in one line, a `RAY_ADDRESS` (`host:port` or `ray://host:port`) where nothing listens: `ray.init`
    would retry it for minutes, printing a warning every few seconds. Other forms (`auto`) are Ray's to resolve."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in target:
        return
    error: OSError | None = None
    for attempt in range(attempts):
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
            return
        except OSError as exc:
            error = exc
            if attempt + 1 < attempts:
                time.sleep(1.0)
    raise ConfigError(f"RAY_ADDRESS={address}: nothing answers there ({error}); start the cluster or correct the "
                      "address, or unset RAY_ADDRESS to run on a cluster of this machine's own")


def dead_nodes() -> set[str]:
    """The ids of the cluster's nodes that have died (empty without a cluster)."""
    import ray

    if not ray.is_initialized():
        return set()
    return {n["NodeID"] for n in ray.nodes() if not n.get("Alive", True)}


def is_local(path: str) -> bool:
    """Whether `path` is on this machine's disk (or in its memory), where other nodes cannot reach it."""
    return protocol_of(path) in ("file", "local", "memory")


def check_reachable(paths: dict[str, str | None]) -> None:
    """Refuse local paths when the cluster this driver joins has more than one node.

    Each node would read and write its own disk: the driver's commits would list
    files that other nodes cannot see, and the results would be scattered. Object
    storage (s3://, gs://) is what every node reaches. A local cluster started by
    the driver has one node, and local paths are fine there.
    """
    import ray

    if not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    local = {key: path for key, path in paths.items() if path and is_local(path)}
    if local:
        key, path = next(iter(local.items()))
        raise ConfigError(f"{key}: {path} is a local path, but the Ray cluster at {os.environ.get('RAY_ADDRESS')} "
                          f"has {len(nodes)} nodes, each with a disk of its own: the replicas on other nodes "
                          "could not read or write it. Use object storage (s3://, gs://) that every node reaches")
