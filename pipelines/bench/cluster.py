"""A running Ray cluster for a bench side to join, as a driver under `ray job submit` joins one."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class RunningCluster:
    address: str
    how: str  # where it came from, for the report
    auth_env: dict[str, str] = dataclasses.field(default_factory=dict)  # the head's auth mode, for its drivers

    @property
    def driver_env(self) -> dict[str, str]:
        """What a driver's environment needs to join it."""
        return {"RAY_ADDRESS": self.address, **self.auth_env}


@contextlib.contextmanager
def running_cluster(*, needed: bool, temp: Path, start_timeout_s: float = 120.0) -> Iterator[RunningCluster | None]:
    """The address of a running cluster: `RAY_ADDRESS`, else the one this process is connected to, else a head
    started here (`ray start --head`, its own ports and temp folder) and stopped on leaving. None if not needed.

    The head runs in a process group of its own with `--block`, so one signal stops it; `ray stop` would stop
    every Ray cluster on the machine.
    """
    if not needed:
        yield None
        return
    if os.environ.get("RAY_ADDRESS"):
        yield RunningCluster(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
        return
    import ray

    if ray.is_initialized():
        yield RunningCluster(ray.get_runtime_context().gcs_address, "the cluster this process is connected to")
        return
    from ray.util import get_node_ip_address

    port = free_port()
    # Ray names a local head by the node's address, not 127.0.0.1: a driver that joins dials that one.
    address = f"{get_node_ip_address()}:{port}"
    # Ray 2.60 turns token authentication on for a head where a token exists (~/.ray/auth_token); a driver
    # sends its token only in token mode. Both are told, so the head is the same whether or not one exists.
    auth = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **auth}

    def ready() -> bool:  # `ray start --block` says so once the head's processes are up
        log = temp / "ray-start.log"
        return log.is_file() and "Ray runtime started" in log.read_text(errors="replace")

    with ray_head(temp, [f"--port={port}", f"--num-cpus={os.cpu_count() or 2}", "--include-dashboard=false"],
                  env=env, ready=ready, timeout_s=start_timeout_s):
        yield RunningCluster(address, "a head the bench started (ray start --head)", auth_env=auth)


@contextlib.contextmanager
def ray_head(temp: Path, args: Sequence[str], *, env: dict[str, str], ready: Callable[[], bool],
             timeout_s: float = 120.0) -> Iterator[subprocess.Popen]:
    """`ray start --head --block` with its own temp folder, until `ready()`; stopped on leaving.

    `--block` keeps it in the foreground, in a process group of its own, so one signal stops the whole head
    (`ray stop` would stop every Ray cluster on the machine); the processes that leave the group (the
    dashboard's) are found by the temp folder they were given.
    """
    temp.mkdir(parents=True, exist_ok=True)
    ray_cli = str(Path(sys.executable).parent / "ray")
    log = open(temp / "ray-start.log", "wb")
    proc = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", *args, f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start: {(temp / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(1)
        yield proc
    finally:
        # A head that never started may have taken its group with it: nothing to signal, and the error that
        # says why it did not start must not be hidden behind a ProcessLookupError.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            # Ray's own graceful stop waits on every process in turn (about 30 s on 2 cores); nothing of this
            # throwaway head needs keeping, so it gets a few seconds.
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-f", str(temp)], check=False)
        log.close()
