"""Joining a Ray cluster: the one in `RAY_ADDRESS` (as under `ray job submit`), else a local one."""

from __future__ import annotations

import logging
import os

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
        ray.init()
        return
    if not small_host.enabled():
        ray.init(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)
        return
    with small_host.daemon_env(small_host.QUIET_CLUSTER_ENV):
        ray.init(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)
    small_host.tune()
