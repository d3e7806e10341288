"""Config errors are refused before any work, with a message naming the file and key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.config import load_engine, load_job
from pipelines.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


@pytest.fixture
def conf(tmp_path) -> Path:
    """A copy of the repository's conf tree to edit."""
    shutil.copytree(CONF, tmp_path / "conf")
    return tmp_path / "conf"


def edit(path: Path, change) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_committed_job_and_engine_profile_validates():
    jobs = sorted((CONF / "jobs").glob("*.yaml"))
    assert jobs, "no job specs in conf/jobs"
    for path in jobs:
        job = load_job(path)
        assert job.engine.name == job.spec.engine
    from pipelines.stages.engine import vllm_engine_args

    for path in sorted((CONF / "engines").glob("*.yaml")):
        profile = load_engine(path.stem, CONF)
        assert profile.name == path.stem
        vllm_engine_args(profile, str(path))  # extra_args are real vLLM engine arguments


def test_overrides_are_typed_and_reach_nested_keys():
    job = load_job(CONF / "jobs/ticket_triage.yaml", overrides=[
        "input.path=s3://bucket/tickets/", "output.path=s3://bucket/out/", "batch_size=8",
        "sampling.temperature=0.7", "output.passthrough=[channel]", "input.id_column=ticket_id",
    ])
    assert job.spec.input.path == "s3://bucket/tickets/"
    assert job.spec.output.path == "s3://bucket/out/"
    assert job.spec.batch_size == 8 and job.spec.sampling.temperature == 0.7
    assert job.spec.output.passthrough == ["channel"]


def test_override_values_that_look_like_mappings_stay_text():
    job = load_job(CONF / "jobs/ticket_triage.yaml", overrides=[
        "prompt.user=Subject: {subject}", "prompt.system={channel}", "storage.extra={anon_retries: 2}"])
    assert job.spec.prompt.user == "Subject: {subject}" and job.spec.prompt.system == "{channel}"
    assert job.spec.storage.extra == {"anon_retries": 2}


def test_unknown_key_in_file_is_named(conf):
    path = edit(conf / "jobs/ticket_triage.yaml", lambda d: d["input"].update(paht="x"))
    with pytest.raises(ConfigError) as err:
        load_job(path)
    assert str(path) in str(err.value) and "input.paht: unknown key" in str(err.value)


def test_unknown_key_from_set_is_named():
    with pytest.raises(ConfigError, match=r"sampling\.max_tokenz: unknown key"):
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=["sampling.max_tokenz=5"])


def test_missing_required_key_is_named(conf):
    path = edit(conf / "jobs/ticket_triage.yaml", lambda d: d["input"].pop("path"))
    with pytest.raises(ConfigError, match=r"input\.path: required key is missing"):
        load_job(path)
    path = edit(conf / "jobs/ticket_triage.yaml", lambda d: d["input"].update(path="data/", id_column=None))
    with pytest.raises(ConfigError, match=r"input: id_column: required for Parquet input"):
        load_job(path)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"batch_size: .*integer"):
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=["batch_size=many"])


def test_missing_job_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"job spec not found: .*nope\.yaml"):
        load_job(tmp_path / "nope.yaml")


def test_invalid_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_job(bad)


def test_set_without_equals_and_into_a_value_are_refused():
    with pytest.raises(ConfigError, match=r"--set 'batch_size': expected key.path=value"):
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=["batch_size"])
    with pytest.raises(ConfigError, match=r"input\.path is a value, not a section"):
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=["input.path.deeper=1"])


def test_unknown_engine_profile_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=["engine=cpu-nonexistent"])
    assert "cpu-nonexistent" in str(err.value) and "cpu-smollm2" in str(err.value)


def test_bad_placeholder_is_named():
    with pytest.raises(ConfigError, match=r"prompt\.user: placeholder \{a\.b\} must name one input column"):
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=["prompt.user=Hello {a.b}"])


@pytest.mark.parametrize(("template", "said"), [
    ("{body.__class__}", "placeholder {body.__class__} must name one input column"),  # attribute access
    ("{body[0]}", "placeholder {body[0]} must name one input column"),  # indexing
    ("{body:>999999999}", "placeholder {body:>999999999}: no format spec or conversion, only {body}"),  # 1 GB a row
    ("{body!r}", "placeholder {body!r}: no format spec or conversion, only {body}"),
    ("{subject!s:^40}", "placeholder {subject!s:^40}: no format spec or conversion, only {subject}"),
])
def test_check_refuses_a_template_that_str_format_would_evaluate(template, said, capsys):
    from pipelines.cli import main

    assert main(["check", str(CONF / "jobs/ticket_triage.yaml"), "--set", f"prompt.system=Hi. {template}"]) == 2
    err = capsys.readouterr().err
    assert f"prompt.system: {said}" in err and "records in" not in err


def test_actor_pool_bounds_are_checked():
    with pytest.raises(ConfigError, match=r"actors: min \(3\) is larger than max \(1\)"):
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=["actors.min=3"])


def test_passthrough_may_not_overwrite_result_columns():
    with pytest.raises(ConfigError, match=r"output\.passthrough: \['cost_usd'\] would overwrite"):
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=["output.passthrough=[cost_usd]"])


def test_model_without_price_is_refused(conf):
    edit(conf / "engines/cpu-smollm2.yaml", lambda d: d.update(model_name="Unpriced-Model"))
    with pytest.raises(ConfigError, match=r"prices\.yaml: models: no price for 'Unpriced-Model'"):
        load_job(conf / "jobs/ticket_triage.yaml")


def test_gpu_profile_must_ask_for_its_tensor_parallel_gpus(conf):
    edit(conf / "engines/llama4-scout-h100.yaml", lambda d: d["resources"].update(num_gpus=4))
    with pytest.raises(ConfigError, match=r"(?s)llama4-scout-h100\.yaml.*resources\.num_gpus is 4 but tensor_parallel"):
        load_engine("llama4-scout-h100", conf)


def test_unknown_vllm_engine_arg_is_refused(conf):
    from pipelines.stages.engine import vllm_engine_args

    edit(conf / "engines/cpu-smollm2.yaml", lambda d: d["engine_args"].update(extra_args={"max_num_seqz": 3}))
    job = load_job(conf / "jobs/ticket_triage.yaml")
    with pytest.raises(ConfigError, match=r"unknown vLLM engine argument 'max_num_seqz'"):
        vllm_engine_args(job.engine, "engine profile cpu-smollm2")


def test_engine_arg_values_are_checked_by_vllm(conf):
    from pipelines.stages.engine import vllm_engine_args

    edit(conf / "engines/llama4-scout-h100.yaml", lambda d: d["engine_args"].update(kv_cache_dtype="fp7"))
    job = load_job(conf / "jobs/ticket_triage.yaml", overrides=["engine=llama4-scout-h100"])
    with pytest.raises(ConfigError, match=r"(?s)llama4-scout-h100.*kv-cache-dtype.*fp7"):
        vllm_engine_args(job.engine, "engine profile llama4-scout-h100")


def test_production_profiles_build_vllm_engine_args():
    from pipelines.stages.engine import vllm_engine_args

    scout = vllm_engine_args(load_engine("llama4-scout-h100", CONF), "scout")
    assert scout.model == "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    assert scout.tensor_parallel_size == 8 and scout.kv_cache_dtype == "fp8"
    assert scout.enable_prefix_caching is True and scout.distributed_executor_backend == "mp"
    maverick = vllm_engine_args(load_engine("llama4-maverick-h200", CONF), "maverick")
    assert maverick.model == "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8"
    assert maverick.tensor_parallel_size == 8 and maverick.quantization == "fp8"
    assert maverick.max_model_len == 131072 and maverick.max_num_seqs == 512
    assert maverick.override_generation_config == {"attn_temperature_tuning": True}
    assert scout.limit_mm_per_prompt == maverick.limit_mm_per_prompt == {"image": 1}


def test_cli_prints_the_message_without_a_traceback(capsys):
    code = main(["check", str(CONF / "jobs/ticket_triage.yaml"), "--set", "input.colums=[a]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "input.colums: unknown key" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides, message", [
    (["task=classify"], r"classify: give this section exactly when task is 'classify'"),
    (["classify.labels=[a, b]"], r"classify: give this section exactly when task is 'classify' \(task is 'generate'\)"),
    (["task=classify", "classify.labels=[a, a, b]"], r"classify\.labels: labels repeated: \['a'\]"),
    (["task=classify", "classify.labels=[only]"], r"classify\.labels: List should have at least 2 items"),
    (["task=extract", "extract.model=pipelines.samples.invoices:Nope"], r"has no 'Nope'"),
    (["task=extract", "extract.model=no_such_module:Model"], r"cannot import 'no_such_module'"),
    (["task=extract", "extract.model=pipelines.samples.invoices:Invoice",
      "extract.json_schema={type: object}"], r"give exactly one of json_schema and model"),
    (["task=extract", "extract.json_schema={type: object, properties: {a: {type: nope}}}"],
     r"extract: not a valid JSON Schema"),
    (["task=extract", "extract.json_schema={type: array}"], r"must be `type: object` with `properties`"),
    (["task=extract", "extract.json_schema={type: object, properties: {channel: {type: string}}}"],
     r"extract: fields \['channel'\] clash"),
    (["task=extract", "extract.json_schema={type: object, properties: {team: {type: string}}}",
      "extract.truth_columns={teem: true_category}"], r"truth_columns names fields the schema lacks: \['teem'\]"),
    (["input.format=openai_batch"], r"input: id_column: OpenAI batch files are keyed by 'custom_id'"),
    (["input.format=openai_batch", "input.id_column=null"], r"prompt: OpenAI batch files carry their own messages"),
])
def test_task_and_format_mistakes_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=overrides)


def test_classify_and_extract_specs_resolve(tmp_path):
    job = load_job(CONF / "jobs/ticket_triage.yaml", overrides=[
        "task=extract", "extract.json_schema={type: object, properties: {team: {type: string}, urgent: {type: boolean}}}",
        "extract.truth_columns={team: true_category}"])
    assert job.spec.extract.fields == ["team", "urgent"] and job.spec.truth_columns == ["true_category"]
    job = load_job(CONF / "jobs/review_sentiment.yaml")
    assert job.spec.classify.names == ["positive", "negative", "neutral"]
    assert job.spec.read_columns == ["review_id", "product", "title", "text", "true_sentiment"]
    job = load_job(CONF / "jobs/invoice_fields.yaml")
    assert job.spec.extract.schema_dict["properties"]["invoice_date"]["format"] == "date"
    assert job.spec.carried_columns == ["true_invoice_number", "true_vendor", "true_invoice_date", "true_currency",
                                        "true_total"]


def test_a_missing_truth_column_is_named_before_any_engine_starts(tmp_path):
    from pipelines.errors import InputError
    from pipelines.stages.read import plan_input

    job = load_job(CONF / "jobs/review_sentiment.yaml", overrides=["classify.label_column=stars"])
    with pytest.raises(InputError, match=r"column 'stars' \(classify\.label_column\) is missing"):
        plan_input(job.spec, job.spec.storage.resolved())


def test_date_fills_the_paths_and_names_the_run():
    from pipelines.run.runner import default_run_id, spec_fingerprint

    job = load_job(CONF / "jobs/ticket_triage.yaml", partition="2026-11-27",
                   overrides=["input.path=s3://b/tickets/{date}/", "output.path=s3://b/out/{date}/"])
    assert job.spec.input.path == "s3://b/tickets/2026-11-27/" and job.spec.output.path == "s3://b/out/2026-11-27/"
    run_id = default_run_id(job, spec_fingerprint(job))
    assert run_id.startswith("ticket_triage-2026-11-27-")
    other = load_job(CONF / "jobs/ticket_triage.yaml", partition="2026-11-28",
                     overrides=["input.path=s3://b/tickets/{date}/", "output.path=s3://b/out/{date}/"])
    assert default_run_id(other, spec_fingerprint(other)) != run_id
    with pytest.raises(ConfigError, match=r"input\.path: 's3://b/\{date\}/' has \{date\}; give the night with --date"):
        load_job(CONF / "jobs/ticket_triage.yaml", overrides=["input.path=s3://b/{date}/"])
    with pytest.raises(ConfigError, match=r"--date '27/11/2026': expected a date as YYYY-MM-DD"):
        load_job(CONF / "jobs/ticket_triage.yaml", partition="27/11/2026")


def test_accelerator_time_needs_a_rate_for_the_profile(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    job = load_job(conf / "jobs/ticket_triage.yaml", overrides=["cost.mode=accelerator_time"])
    assert job.accelerator_price.usd_per_hour > 0 and job.engine.billed_units == 1
    prices = (conf / "prices.yaml").read_text().replace("  cpu-2-vcpu:", "  cpu-other:")
    (conf / "prices.yaml").write_text(prices)
    with pytest.raises(ConfigError, match=r"accelerators: no hourly rate for 'cpu-2-vcpu' \(engine profile "
                                          r"'cpu-smollm2', cost\.accelerator\); known: H100-SXM-80GB"):
        load_job(conf / "jobs/ticket_triage.yaml", overrides=["cost.mode=accelerator_time"])
    # Per-token costing does not need it.
    assert load_job(conf / "jobs/ticket_triage.yaml").accelerator_price is None


def test_the_run_snapshot_keeps_profile_env_and_storage_extra_by_name_only():
    """`_run.json` holds `job_snapshot`: neither the engine profile's env values nor the storage's extra options
    (either may carry a credential) are in it, and the job rebuilt from it goes without them."""
    import json

    from pipelines.config.load import MASKED, job_from_snapshot, job_snapshot

    canary = "canary-5ecret-do-not-keep"
    job = load_job(CONF / "jobs/ticket_triage.yaml",
                   overrides=[f"storage.extra.token={canary}", f"storage.secret_access_key={canary}"],
                   engine_overrides=[f"env.HF_TOKEN={canary}"])
    assert job.engine.env["HF_TOKEN"] == canary and job.spec.storage.extra["token"] == canary
    snapshot = job_snapshot(job)
    text = json.dumps(snapshot)
    assert canary not in text
    assert snapshot["engine"]["env"]["HF_TOKEN"] == MASKED and snapshot["spec"]["storage"]["extra"]["token"] == MASKED
    assert snapshot["engine"]["env"]["VLLM_CPU_KVCACHE_SPACE"] == MASKED  # by name only, whatever the name
    rebuilt = job_from_snapshot(json.loads(text))
    assert "HF_TOKEN" not in rebuilt.engine.env and "token" not in rebuilt.spec.storage.extra
    # The masked key is not taken back as a key (it would be sent to the store as one): the environment's serves.
    assert rebuilt.spec.storage.secret_access_key is None
    assert rebuilt.spec.name == job.spec.name and rebuilt.engine.name == job.engine.name


def test_engine_args_vllm_accepted_are_not_parsed_again_and_changed_ones_are(tmp_path, monkeypatch):
    from pipelines.stages import engine

    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    profile = load_engine("cpu-smollm2", CONF)
    engine.check_engine_args(profile, "cpu-smollm2")  # parsed by vLLM, and the pass remembered
    assert len(list((tmp_path / "checked").iterdir())) == 1

    parsed = []
    monkeypatch.setattr(engine, "vllm_engine_args", lambda p, source: parsed.append(source))
    engine.check_engine_args(profile, "cpu-smollm2")
    assert parsed == []
    changed = profile.model_copy(update={"engine_args": profile.engine_args.model_copy(update={"max_num_seqs": 7})})
    engine.check_engine_args(changed, "changed")
    assert parsed == ["changed"]

    # A refusal is not remembered: vLLM is asked each time.
    monkeypatch.undo()
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "again"))
    bad = profile.model_copy(update={"engine_args": profile.engine_args.model_copy(
        update={"extra_args": {"max_num_seqz": 3}})})
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"unknown vLLM engine argument 'max_num_seqz'"):
            engine.check_engine_args(bad, "bad")
    assert not (tmp_path / "again/checked").exists()
