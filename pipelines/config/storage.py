"""How to reach object storage: the typed settings, credentials as secrets.

Every field falls back to the standard environment variable named in its
description, so a spec need not hold credentials at all. `pipelines.io.storage`
turns them into filesystems; nothing else reads them.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class StorageOptions(BaseModel):
    """How to reach object storage (`s3://`, `gs://`); ignored for local paths.

    Every field falls back to the standard environment variable named in its
    description, so a spec need not hold credentials at all.
    """

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(
        None, description="S3 endpoint for S3-compatible stores (env `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`)."
    )
    region: str | None = Field(None, description="Region (env `AWS_REGION`, `AWS_DEFAULT_REGION`).")
    access_key_id: SecretStr | None = Field(None, description="Access key id (env `AWS_ACCESS_KEY_ID`).")
    secret_access_key: SecretStr | None = Field(None, description="Secret key (env `AWS_SECRET_ACCESS_KEY`).")
    session_token: SecretStr | None = Field(None, description="Session token (env `AWS_SESSION_TOKEN`).")
    anon: bool = Field(False, description="Anonymous access to public buckets.")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Further fsspec options for the filesystem (e.g. gcsfs `project`)."
    )

    def resolved(self) -> "StorageOptions":
        """A copy with every unset field filled from the environment."""
        env = os.environ.get

        def secret(value: SecretStr | None, name: str) -> SecretStr | None:
            found = env(name)
            return value if value is not None else (SecretStr(found) if found else None)

        return self.model_copy(
            update={
                "endpoint_url": self.endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
                "region": self.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
                "access_key_id": secret(self.access_key_id, "AWS_ACCESS_KEY_ID"),
                "secret_access_key": secret(self.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
                "session_token": secret(self.session_token, "AWS_SESSION_TOKEN"),
            }
        )

    def fsspec_kwargs(self, protocol: str) -> dict[str, Any]:
        """Options in the shape the protocol's fsspec filesystem takes."""
        if protocol in ("s3", "s3a"):
            kwargs: dict[str, Any] = {"anon": self.anon}
            if self.access_key_id is not None:
                kwargs["key"] = self.access_key_id.get_secret_value()
            if self.secret_access_key is not None:
                kwargs["secret"] = self.secret_access_key.get_secret_value()
            if self.session_token is not None:
                kwargs["token"] = self.session_token.get_secret_value()
            client_kwargs: dict[str, Any] = {}
            if self.endpoint_url:
                client_kwargs["endpoint_url"] = self.endpoint_url
            if self.region:
                client_kwargs["region_name"] = self.region
            if client_kwargs:
                kwargs["client_kwargs"] = client_kwargs
            return {**kwargs, **self.extra}
        return dict(self.extra)

    def polars_kwargs(self, protocol: str) -> dict[str, str]:
        """Options in the shape polars' `scan_parquet(storage_options=...)` takes."""
        if protocol not in ("s3", "s3a"):
            return {}
        opts: dict[str, str] = {}
        if self.endpoint_url:
            opts["aws_endpoint_url"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                opts["aws_allow_http"] = "true"
        if self.region:
            opts["aws_region"] = self.region
        if self.access_key_id is not None:
            opts["aws_access_key_id"] = self.access_key_id.get_secret_value()
        if self.secret_access_key is not None:
            opts["aws_secret_access_key"] = self.secret_access_key.get_secret_value()
        if self.session_token is not None:
            opts["aws_session_token"] = self.session_token.get_secret_value()
        if self.anon:
            opts["aws_skip_signature"] = "true"
        return opts
