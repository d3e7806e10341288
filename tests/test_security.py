"""Security: what tokenmill lets in and what it lets out (issue 18), on the real stack where a point needs it.

This module holds the points that cross the package: data-borne image fetches on
SeaweedFS and a local HTTP server, and the canary secret sent in through every
route. The others sit beside the code they test; `INDEX` names each of them, and
`test_every_point_has_its_test` fails when one of those tests disappears.
"""

from __future__ import annotations

import ast
import http.server
import io
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import S3_SPEC_KEY, S3_SPEC_SECRET, _free_port, jobs_api
from PIL import Image

from pipelines.config.job import ImageFetchSpec
from pipelines.config.storage import StorageOptions
from pipelines.io.fetch import FetchPolicy
from pipelines.models.embedded import prepare
from pipelines.stages.prompt import render_batch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

INDEX = {
    "1. authenticated cluster: token auth, NetworkPolicy, workload identity, no literal credential, valid CRDs": [
        "infra/test_k8s.py::test_every_cluster_asks_for_rays_token_on_every_endpoint",
        "infra/test_k8s.py::test_only_the_scheduler_and_the_clusters_own_pods_reach_the_head",
        "infra/test_k8s.py::test_no_file_under_infra_holds_a_literal_credential",
        "infra/test_k8s.py::test_manifest_is_valid_against_the_kuberay_crd",
        "infra/test_k8s.py::test_pods_read_storage_with_workload_identity_and_the_secret_only_if_present",
        "infra/test_k8s.py::test_the_service_account_is_bound_to_a_cloud_role_and_lets_the_autoscaler_scale",
    ],
    "2. secrets never travel": [
        "test_security.py::test_a_canary_secret_sent_through_every_route_is_found_nowhere",
        "infra/test_airflow.py::test_submit_task_runs_a_night_on_the_cluster_and_a_retry_finds_it",
        "run/test_submit_ids.py::test_submit_refuses_a_credential_in_set_before_contacting_the_cluster",
        "run/test_submit_ids.py::test_credentials_are_refused_in_runtime_env",
        "config/test_load.py::test_the_run_snapshot_keeps_profile_env_and_storage_extra_by_name_only",
    ],
    "3. submit runs what it checked; one-line errors for a cluster that does not answer, before any work": [
        "run/test_submit_ids.py::test_the_shipped_spec_runs_not_the_one_of_the_same_name",
        "run/test_submit_ids.py::test_a_spec_holding_a_credential_is_refused_before_contacting_the_cluster",
        "run/test_submit_ids.py::test_a_cluster_that_does_not_answer_is_one_line_naming_it",
        "run/test_submit_ids.py::test_run_with_a_ray_address_where_nothing_answers_is_one_line",
    ],
    "4. Airflow: a Connection, deferral, on_kill": [
        "infra/test_airflow.py::test_submit_task_runs_a_night_on_the_cluster_and_a_retry_finds_it",
        "infra/test_airflow.py::test_a_killed_or_timed_out_task_stops_its_ray_job",
    ],
    "5. data-borne fetches confined": [
        "test_security.py::test_image_references_are_fetched_only_inside_the_fence",
        "test_security.py::test_http_images_only_from_allowed_hosts_never_link_local_never_redirected",
        "test_security.py::test_image_fence_is_checked_with_the_spec",
    ],
    "6. hostile input never stops a run": [
        "io/test_openai_batch.py::test_hostile_lines_are_rejected_one_by_one_and_the_run_goes_on",
        "io/test_openai_batch.py::test_a_request_file_larger_than_the_limit_is_refused_before_any_work",
        "config/test_load.py::test_check_refuses_a_template_that_str_format_would_evaluate",
        "config/test_names.py::test_every_command_refuses_another_spelling_of_a_night",
        "config/test_names.py::test_tokenmill_run_refuses_an_unsafe_run_id_before_any_work",
        "run/test_commit.py::test_a_manifest_listing_a_file_outside_its_run_is_refused_and_nothing_is_deleted",
        "io/test_response_cache.py::test_a_malformed_entry_is_a_miss_never_an_error",
        "io/test_response_cache.py::test_the_key_changes_when_the_weights_do_under_the_same_model_name",
    ],
}


def test_every_point_has_its_test():
    missing = []
    for tests in INDEX.values():
        for ref in tests:
            path, name = ref.split("::")
            tree = ast.parse((TESTS / path).read_text())
            if name not in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}:
                missing.append(ref)
    assert missing == []


def png(color: str, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def llama4_tokenizer() -> str:
    return str(prepare("tiny-llama4"))


def render(refs: list, tokenizer: str, policy: FetchPolicy, storage: StorageOptions | None = None) -> pa.Table:
    table = pa.table({"id": [f"r{i}" for i in range(len(refs))], "sku": ["A"] * len(refs), "photo": refs})
    return render_batch(table, tokenizer_path=tokenizer, id_column="id", max_model_len=1048, max_tokens=16,
                        user="Describe {sku}.", image_column="photo", storage=storage or StorageOptions(),
                        images=policy)


def outcomes(out: pa.Table) -> list[tuple[str | None, str | None]]:
    return list(zip(out.column("error_code").to_pylist(), out.column("error").to_pylist()))


def test_image_references_are_fetched_only_inside_the_fence(llama4_tokenizer, s3_env, tmp_path):
    """Default fence: the input's own bucket. Another team's object, chained URLs, climbing segments,
    local files and the metadata service are refused with reason `image`; the cap holds for fetched and
    inline images. On SeaweedFS, with the pipeline's real credentials."""
    client = s3_env.client()
    for bucket in ("team-a", "team-b"):
        client.create_bucket(Bucket=bucket)
    ok, big = png("green"), png("red", 400)
    client.put_object(Bucket="team-a", Key="images/ok.png", Body=ok)
    client.put_object(Bucket="team-a", Key="images/big.png", Body=big)
    client.put_object(Bucket="team-b", Key="secret.png", Body=png("blue"))
    (tmp_path / "local.png").write_bytes(ok)

    policy = FetchPolicy.for_input(ImageFetchSpec(max_bytes=len(big) - 1), "s3://team-a/input/")
    assert policy.allow == ("s3://team-a/",)
    refs = [
        "s3://team-a/images/ok.png",
        "S3://team-a/images/ok.png",
        "s3://team-b/secret.png",
        "s3://team-a/images/../../team-b/secret.png",
        "s3://team-a/images/%2e%2e/x.png",
        "simplecache::s3://team-b/secret.png",
        "s3://team-a-other/x.png",
        str(tmp_path / "local.png"),
        "file:///etc/hostname",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "s3://team-a/images/big.png",
    ]
    out = render(refs, llama4_tokenizer, policy, StorageOptions().resolved())
    got = outcomes(out)
    assert got[:2] == [(None, None), (None, None)]
    assert out.column("image").to_pylist()[:2] == [ok, ok]
    assert all(code == "image" for code, _ in got[2:])
    messages = [m for _, m in got]
    fence = "refused: outside the allowed locations (s3://team-a/; prompt.images.allow)"
    assert messages[2] == f"s3://team-b/secret.png: {fence}"
    assert messages[3].endswith("refused: a path with `.` or `..` segments is not fetched")
    assert messages[4].endswith("refused: a path with `.` or `..` segments is not fetched")
    assert messages[5].endswith("refused: chained fsspec URLs (`a::b`) are not fetched")
    assert messages[6:10] == [f"{ref}: {fence}" for ref in refs[6:10]]
    assert messages[10] == f"s3://team-a/images/big.png: refused: larger than {len(big) - 1} bytes (prompt.images.max_bytes)"
    assert out.num_rows == len(refs) and out.column("prompt_token_ids").null_count == len(refs) - 2
    inline = outcomes(render([ok, big], llama4_tokenizer, policy))
    assert inline == [(None, None), ("image", f"inline bytes: refused: larger than {len(big) - 1} bytes "
                                              "(prompt.images.max_bytes)")]

    # A local input's fence is its folder: a symbolic link inside it cannot lead out.
    inside = tmp_path / "input"
    inside.mkdir()
    (inside / "in.png").write_bytes(ok)
    (inside / "link.png").symlink_to(tmp_path / "local.png")
    local = FetchPolicy.for_input(ImageFetchSpec(), str(inside / "part-0.parquet"))
    got = outcomes(render([str(inside / "in.png"), str(inside / "link.png"), f"{inside}/../local.png"],
                          llama4_tokenizer, local))
    assert got[0] == (None, None)
    assert [code for code, _ in got[1:]] == ["image", "image"]
    assert all("outside the allowed locations" in m for _, m in got[1:])


class _Images(http.server.BaseHTTPRequestHandler):
    body = png("green")

    def do_GET(self):
        if self.path == "/ok.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        elif self.path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_images_only_from_allowed_hosts_never_link_local_never_redirected(llama4_tokenizer, image_server):
    """http(s) is fetched only from a prefix the spec lists; a redirect is not followed; a link-local host
    (written as an address or as a number that resolves to one) is refused even when listed."""
    spec = ImageFetchSpec(allow=[f"{image_server}/", "http://169.254.169.254/", "http://2852039166/"])
    policy = FetchPolicy.for_input(spec, "s3://team-a/input/")
    refs = [f"{image_server}/ok.png", f"{image_server}/moved.png", f"{image_server}/gone.png",
            "http://169.254.169.254/latest/meta-data/", "http://2852039166/latest/meta-data/",
            "http://user:pw@127.0.0.1/ok.png", "https://other.example/ok.png"]
    got = outcomes(render(refs, llama4_tokenizer, policy))
    assert got[0] == (None, None)
    assert all(code == "image" for code, _ in got[1:])
    messages = [m for _, m in got]
    assert messages[1] == (f"{refs[1]}: refused: HTTP 302 redirect to http://169.254.169.254/latest/meta-data/: "
                           "redirects are not followed")
    assert messages[2] == f"{refs[2]}: not found"
    assert messages[3] == f"{refs[3]}: refused: 169.254.169.254 is a link-local address (prompt.images.allow_link_local)"
    assert messages[4] == f"{refs[4]}: refused: 2852039166 is a link-local address (prompt.images.allow_link_local)"
    assert messages[5] == "http://<masked>@127.0.0.1/ok.png: refused: a URI with a user or password is not fetched"
    assert "outside the allowed locations" in messages[6]


def test_image_fence_is_checked_with_the_spec():
    with pytest.raises(ValueError, match="chained fsspec URLs"):
        ImageFetchSpec(allow=["simplecache::s3://b/"])
    with pytest.raises(ValueError, match="name the bucket or host"):
        ImageFetchSpec(allow=["s3:///images/"])
    with pytest.raises(ValueError, match="must be an absolute path"):
        ImageFetchSpec(allow=["images/"])
    with pytest.raises(ValueError, match="no user or password"):
        ImageFetchSpec(allow=["https://u:p@cdn.example/"])


CANARY = {
    "environment (a token beside the storage keys)": "tm-canary-env-3c59dc04",
    "job spec (storage keys)": S3_SPEC_SECRET,
    "engine profile env": "tm-canary-profile-env-c4ca4238",
    "job spec storage.extra": "tm-canary-storage-extra-a87ff679",
    "--set on tokenmill run (refused)": "tm-canary-set-run-e4da3b7f",
    "--set on tokenmill submit (refused)": "tm-canary-set-submit-1679091c",
    "job spec holding a key, on tokenmill submit (refused)": "tm-canary-spec-submit-8f14e45f",
}


def _files_under(root: Path):
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                yield str(path), path.read_bytes()
        except OSError:  # sockets, files a process removed meanwhile
            continue


@pytest.mark.cluster
def test_a_canary_secret_sent_through_every_route_is_found_nowhere(ray_nodes, s3_env, tmp_path, capsys):
    """A known dummy secret through each route a credential can take into a run on the multi-node cluster;
    afterwards it is in no file of the run, no line the driver printed, no log of any node, and no record or log
    of the Jobs API. (The Airflow route is tests/infra/test_airflow.py; the storage keys in the nodes'
    environment, tests/run/test_cluster.py.)"""
    client = s3_env.client()
    client.create_bucket(Bucket="tm-canary")
    table = pq.read_table(REPO / "data/samples/tickets").slice(0, 12)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket="tm-canary", Key="in/part-0.parquet", Body=buf.getvalue())

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    profile = yaml.safe_load((conf / "engines/stand-in.yaml").read_text())
    profile["env"] = {"TOKENMILL_NOTE": CANARY["engine profile env"]}
    (conf / "engines/stand-in.yaml").write_text(yaml.safe_dump(profile))
    spec = yaml.safe_load((REPO / "conf/jobs/ticket_triage.yaml").read_text())
    spec.update(engine="stand-in")
    spec["input"]["path"], spec["output"]["path"] = "s3://tm-canary/in/", "s3://tm-canary/out/"
    spec["sampling"]["max_tokens"] = 4
    spec["storage"] = {"access_key_id": S3_SPEC_KEY, "secret_access_key": S3_SPEC_SECRET,
                       "extra": {"config_kwargs": {"user_agent_extra": CANARY["job spec storage.extra"]}}}
    (conf / "jobs/canary.yaml").write_text(yaml.safe_dump({**spec, "name": "canary"}))

    env = {**ray_nodes.driver_env, "HF_TOKEN": CANARY["environment (a token beside the storage keys)"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the spec's keys are the ones used here
        env.pop(key)
    run = [sys.executable, "-m", "pipelines.cli", "run", str(conf / "jobs/canary.yaml"), "--no-progress"]
    refused = subprocess.run([*run, "--set", f"storage.session_token={CANARY['--set on tokenmill run (refused)']}"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--set storage.session_token: looks like a credential" in refused.stderr
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    nobody = f"http://127.0.0.1:{_free_port()}"
    submit = [sys.executable, "-m", "pipelines.cli", "submit", "--date", "2026-11-25", "--address", ray_nodes.address]
    by_set = subprocess.run([*submit, str(REPO / "conf/jobs/ticket_triage.yaml"), "--set",
                             f"storage.extra.api_key={CANARY['--set on tokenmill submit (refused)']}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert by_set.returncode == 2 and "looks like a credential" in by_set.stderr, by_set.stderr[-2000:]
    (tmp_path / "held.yaml").write_text(yaml.safe_dump(
        {**spec, "storage": {"secret_access_key": CANARY["job spec holding a key, on tokenmill submit (refused)"]}}))
    by_spec = subprocess.run([*submit[:-2], "--address", nobody, str(tmp_path / "held.yaml")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert by_spec.returncode == 2 and "a credential in the spec" in by_spec.stderr, by_spec.stderr[-2000:]

    api = jobs_api(ray_nodes.address)
    jobs = api.list_jobs()
    places = {
        "printed": "".join(p.stdout + p.stderr for p in (refused, done, by_set, by_spec)).encode(),
        "Jobs API records": json.dumps([j.model_dump(mode="json") if hasattr(j, "model_dump") else vars(j)
                                        for j in jobs], default=str).encode(),
        "Jobs API logs": "".join(api.get_job_logs(j.submission_id) for j in jobs if j.submission_id).encode(),
        **{f"s3://tm-canary/{o['Key']}": client.get_object(Bucket="tm-canary", Key=o["Key"])["Body"].read()
           for o in client.list_objects_v2(Bucket="tm-canary", Prefix="out/")["Contents"]},
        **dict(_files_under(ray_nodes.temp)),
    }
    assert any(k.endswith("/_SUCCESS") for k in places) and any(k.endswith("report.html") for k in places)
    assert sum("python-core-driver" in k or "/logs/" in k for k in places) > 10  # the nodes' logs are read
    leaked = {route: [where for where, data in places.items() if value.encode() in data]
              for route, value in CANARY.items()}
    with capsys.disabled():
        print(f"\nsecret routes tried: {len(CANARY)}, leaked: {sum(bool(w) for w in leaked.values())} "
              f"(searched {len(places)} files, logs and records)")
    assert leaked == {route: [] for route in CANARY}
