"""The KubeRay manifests in infra/k8s/: valid against the KubeRay CRDs, and in agreement with the engine profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.config.load import load_engine

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra/k8s"
CRDS = REPO.parent / "shared/kuberay"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"the KubeRay CRDs are not at {CRDS} (../shared/kuberay beside the checkout): cannot validate")
    name = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    crd = yaml.safe_load((CRDS / name).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def manifest(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_is_a_cluster_per_gpu_profile():
    profiles = {manifest(p)["metadata"]["annotations"]["tokenmill.io/engine-profile"]
                for p in MANIFESTS if manifest(p)["kind"] == "RayCluster"}
    gpu = {p.stem for p in (REPO / "conf/engines").glob("*.yaml") if load_engine(p.stem, REPO / "conf").device == "gpu"}
    assert gpu and profiles == gpu


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kuberay_crd(path):
    import jsonschema

    doc = manifest(path)
    assert doc["apiVersion"] == "ray.io/v1"
    schema = crd_schema(doc["kind"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_validation_catches_a_broken_manifest():
    import jsonschema

    doc = manifest(K8S / "raycluster-llama4-scout-h100.yaml")
    doc["spec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    del doc["spec"]["headGroupSpec"]["template"]
    errors = list(jsonschema.Draft7Validator(crd_schema("RayCluster")).iter_errors(doc))
    assert {e.message for e in errors} >= {"'zero' is not of type 'integer'", "'template' is a required property"}


def _ray_resources(params: dict) -> dict:
    return json.loads(json.loads(params["resources"])) if "resources" in params else {}


@pytest.mark.parametrize("path", [p for p in MANIFESTS if manifest(p)["kind"] == "RayCluster"], ids=lambda p: p.name)
def test_cluster_agrees_with_its_engine_profile(path):
    doc = manifest(path)
    profile = load_engine(doc["metadata"]["annotations"]["tokenmill.io/engine-profile"], REPO / "conf")
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no work
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    gpus = profile.engine_args.tensor_parallel_size * profile.engine_args.pipeline_parallel_size
    assert profile.resources.num_gpus == gpus
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    # One pod holds one replica: its GPUs are exactly the profile's tensor x pipeline parallel size.
    assert int(group["rayStartParams"]["num-gpus"]) == gpus
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus
    assert int(group["rayStartParams"]["num-cpus"]) >= profile.resources.num_cpus
    # The accelerator the profile schedules on is what the nodes are and what the group declares.
    assert profile.resources.accelerator_type in pod["nodeSelector"]["nvidia.com/gpu.product"]
    assert _ray_resources(group["rayStartParams"]) == {f"accelerator_type:{profile.resources.accelerator_type}": 1}
    # vLLM needs shared memory, and the weights come from a volume.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "persistentVolumeClaim" in volumes[mounts["/models"]]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"].startswith("/models")
    # Credentials reach the pods from a secret, never as plain values.
    assert not any("SECRET" in k or "KEY" in k for k in env)
    assert container["envFrom"][0]["secretRef"]["name"]


@pytest.mark.parametrize("path", [p for p in MANIFESTS if manifest(p)["kind"] == "RayJob"], ids=lambda p: p.name)
def test_rayjob_runs_a_job_on_the_cluster_of_its_profile(path):
    doc = manifest(path)
    profile = doc["metadata"]["annotations"]["tokenmill.io/engine-profile"]
    cluster = doc["spec"]["clusterSelector"]["ray.io/cluster"]
    target = next(manifest(p) for p in MANIFESTS if manifest(p)["metadata"]["name"] == cluster)
    assert target["metadata"]["annotations"]["tokenmill.io/engine-profile"] == profile
    entry = doc["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", f"jobs.{entry[2].removeprefix('jobs.')}"]
    assert (REPO / "jobs" / f"{entry[2].removeprefix('jobs.')}.py").is_file()
    assert f"engine={profile}" in entry
    date = entry[entry.index("--date") + 1]
    assert doc["spec"]["jobId"] == f"tokenmill-{entry[2].removeprefix('jobs.')}-{date}"
