"""Credentials resolve from the environment and never print."""

from __future__ import annotations

from pydantic import SecretStr

from pipelines.config.storage import StorageOptions


def test_env_fills_unset_fields_and_spec_wins(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    opts = StorageOptions(secret_access_key=SecretStr("spec-secret")).resolved()
    kwargs = opts.fsspec_kwargs("s3")
    assert kwargs["key"] == "env-key" and kwargs["secret"] == "spec-secret"
    assert kwargs["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}
    polars = opts.polars_kwargs("s3")
    assert polars["aws_allow_http"] == "true" and polars["aws_secret_access_key"] == "spec-secret"


def test_secrets_never_print():
    opts = StorageOptions(access_key_id=SecretStr("AKIA-very-secret"), secret_access_key=SecretStr("sssh"))
    for text in (repr(opts), str(opts), opts.model_dump_json()):
        assert "AKIA-very-secret" not in text and "sssh" not in text
