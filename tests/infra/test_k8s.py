"""The KubeRay manifests in infra/k8s/: valid against the KubeRay CRDs, and in agreement with the engine profiles."""

from __future__ import annotations

import json
import re
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


def _literal_credentials(doc, where: str = "") -> list[str]:
    """Places in a parsed manifest where a credential is written out: an env entry whose name looks like a
    credential with a `value` (not a `valueFrom` a Secret), or a Secret with its data in the file."""
    from pipelines.run.submit import secret_key

    found = []
    if isinstance(doc, dict):
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            found.append(f"{where}: a Secret with its data")
        if isinstance(doc.get("name"), str) and "value" in doc and secret_key(doc["name"]):
            found.append(f"{where}: {doc['name']} has a literal value")
        for key, value in doc.items():
            found += _literal_credentials(value, f"{where}.{key}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _literal_credentials(value, f"{where}[{i}]")
    return found


# A literal key or token as text, in any file: AWS access key ids, and `secret = ...` assignments.
LITERAL = re.compile(r"AKIA[0-9A-Z]{16}|(?i:(secret_access_key|auth_token|password)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,})")


def test_no_file_under_infra_holds_a_literal_credential():
    files = [p for p in (REPO / "infra").rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".py", ".md",
                                                                                    ".txt", ".json", ".cfg")]
    assert len(files) >= 8
    found = []
    for path in files:
        text = path.read_text()
        found += [f"{path.relative_to(REPO)}: {m.group(0)[:12]}..." for m in LITERAL.finditer(text)]
        if path.suffix in (".yaml", ".yml"):
            for k, doc in enumerate(yaml.safe_load_all(text)):
                found += _literal_credentials(doc, f"{path.relative_to(REPO)}#{k}")
    assert not found, found
    # The check finds what it looks for.
    planted = {"spec": {"containers": [{"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"},
                                                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}]}}
    assert _literal_credentials(planted) == [".spec.containers[0].env[0]: AWS_SECRET_ACCESS_KEY has a literal value"]
    assert _literal_credentials({"kind": "Secret", "stringData": {"auth_token": "t"}})
    assert LITERAL.search("aws_secret_access_key: wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY")


@pytest.mark.parametrize("path", [p for p in MANIFESTS if manifest(p)["kind"] == "RayCluster"], ids=lambda p: p.name)
def test_every_cluster_asks_for_rays_token_on_every_endpoint(path):
    auth = manifest(path)["spec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "tokenmill-ray-auth"}
    version = tuple(int(x) for x in manifest(path)["spec"]["rayVersion"].split(".")[:2])
    assert version >= (2, 52)  # token authentication's first Ray


def test_only_the_scheduler_and_the_clusters_own_pods_reach_the_head():
    policy = manifest(K8S / "policy/networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    rules = policy["spec"]["ingress"]
    assert all(rule.get("from") for rule in rules), "a rule without `from` admits every pod"
    public = {p["port"] for rule in rules for p in rule.get("ports", [])
              if any("namespaceSelector" in f for f in rule["from"])}
    assert public == {8265, 10001, 8080}
    for rule in rules:
        if "ports" not in rule:  # every port: only the Ray nodes themselves
            assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}]
    jobs_api = [rule for rule in rules if {p["port"] for p in rule.get("ports", [])} == {8265, 10001}]
    assert [r["from"] for r in jobs_api] == [[{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "airflow"}}}]]


@pytest.mark.parametrize("path", [p for p in MANIFESTS if manifest(p)["kind"] == "RayCluster"], ids=lambda p: p.name)
def test_pods_read_storage_with_workload_identity_and_the_secret_only_if_present(path):
    spec = manifest(path)["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    assert [p["serviceAccountName"] for p in pods] == ["tokenmill-ray"] * len(pods)
    refs = [ref["secretRef"] for p in pods for c in p["containers"] for ref in c.get("envFrom", [])]
    assert refs and all(r == {"name": "tokenmill-object-store", "optional": True} for r in refs)


def test_the_service_account_is_bound_to_a_cloud_role_and_lets_the_autoscaler_scale():
    account, role, binding = yaml.safe_load_all((K8S / "identity/serviceaccount.yaml").read_text())
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "tokenmill-ray"
    assert set(account["metadata"]["annotations"]) == {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"}
    # KubeRay makes no autoscaler account once the head names one: this Role is the autoscaler's, and no more.
    assert {(g, r, tuple(rule["verbs"])) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"]} == {("", "pods", ("get", "list", "watch", "patch")),
                                            ("ray.io", "rayclusters", ("get", "list", "watch", "patch"))}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tokenmill-ray"}]
