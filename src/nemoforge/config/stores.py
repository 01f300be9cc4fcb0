"""Where a run keeps its records: the ``tracking`` (MLflow) and ``storage`` (artifact store) sections."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from nemoforge.config.base import _Section


class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (None: sqlite:///<workdir>/mlflow.db, the embedded default)."
    )
    experiment: str = Field("nemoforge", description="MLflow experiment name.")


class StorageConfig(_Section):
    artifact_root: str | None = Field(
        None, description="Artifact store root: a local directory or s3://bucket/prefix (None: <workdir>/artifacts)."
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint, http(s)://host[:port] (MinIO, moto); None: AWS default."
    )
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_checksums: Literal["when_required", "when_supported"] = Field(
        "when_required",
        description="botocore's request checksum calculation and response validation: when_required (the "
        "behaviour before boto3 1.36, which S3-compatible stores accept) or when_supported (CRC checksums on "
        "every request, which AWS S3 accepts and some S3-compatible stores refuse). nemoforge checks each "
        "object's sha256 either way.",
    )

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https?://[^/\s:]+(:\d+)?(/\S*)?", url):
            raise ValueError(f"{url!r} is not an S3 endpoint URL: give http(s)://host[:port], e.g. http://127.0.0.1:9000")
        return url

