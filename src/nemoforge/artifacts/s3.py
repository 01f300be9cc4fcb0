"""S3Store: objects in an S3 bucket through boto3; uploads verified by size and sha256, multipart, retried.

Large files go up in parts (boto3 ``TransferConfig``); requests are retried with backoff (botocore ``standard``
retry mode) but a refused or unreachable endpoint fails within seconds.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nemoforge.artifacts.cache import cache_root
from nemoforge.artifacts.digests import changed_since_upload, sha256_file, tree_files
from nemoforge.artifacts.local import PARTIAL_MARK, LocalStore, replacing
from nemoforge.artifacts.store import ArtifactStore, S3Checksums
from nemoforge.artifacts.uris import is_s3, split_s3
from nemoforge.errors import InputNotFoundError, StorageError


class S3Store(ArtifactStore):
    """Objects in an S3 bucket (AWS, MinIO, Ceph, moto) under ``s3://bucket/prefix``.

    Credentials come from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, an IAM role), as boto3 resolves them. Each object carries its sha256 as user
    metadata; uploads are checked against it (and the size) with a HEAD, downloads by hashing.
    Local-path URIs are served from the local file system.

    Args:
        root_uri: ``s3://bucket[/prefix]``.
        endpoint_url: S3 API endpoint (``http://127.0.0.1:9000`` for MinIO); None: AWS.
        region: region name.
        multipart_threshold_bytes: files at least this large go up in parts (S3's minimum part is 5 MiB).
        multipart_chunksize_bytes: part size of multipart transfers.
        max_attempts: attempts per request, the first included (botocore ``standard`` retries with
            exponential backoff, for throttling, 5xx and connection errors alike).
        connect_timeout_s: seconds to wait for a TCP connection.
        read_timeout_s: seconds to wait on a socket read.
        cache_dir: where :meth:`fetch` downloads to (default :func:`cache_root` ``/ "s3"``).
        checksums: botocore's ``request_checksum_calculation`` and ``response_checksum_validation``:
            ``when_required`` (no CRC headers unless an operation requires them: the behaviour before boto3
            1.36, accepted by S3-compatible stores that reject the newer headers) or ``when_supported``
            (boto3 >= 1.36's default: a CRC checksum on every upload, validated on download).

    Raises:
        StorageError: ``root_uri`` has no bucket.
    """

    def __init__(
        self,
        root_uri: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        multipart_threshold_bytes: int = 64 * 2**20,
        multipart_chunksize_bytes: int = 64 * 2**20,
        max_attempts: int = 3,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 60.0,
        cache_dir: str | Path | None = None,
        checksums: S3Checksums = "when_required",
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = split_s3(root_uri)
        self.root_uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = endpoint_url
        self.region = region
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root() / "s3"
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold_bytes, multipart_chunksize=multipart_chunksize_bytes
        )
        self._session = boto3.session.Session()
        self._config = Config(
            region_name=region,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            # MinIO and most S3-compatible servers want path-style addressing
            s3={"addressing_style": "path"} if endpoint_url else {},
            request_checksum_calculation=checksums,
            response_checksum_validation=checksums,
        )
        self._client = self._session.client("s3", endpoint_url=endpoint_url, config=self._config)
        self._local: LocalStore | None = None

    # ------------------------------------------------------------------------------ errors
    def _where(self) -> str:
        return f"S3 endpoint {self.endpoint_url}" if self.endpoint_url else f"AWS S3 (region {self.region})"

    @contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """Turn boto errors into InputNotFoundError / StorageError that name the URI, endpoint and fix."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            yield
        except (S3UploadFailedError, RetriesExceededError, ClientError, BotoCoreError) as raised:
            err: BaseException = raised
            if isinstance(err, RetriesExceededError):
                err = err.last_exception
            elif isinstance(err, S3UploadFailedError) and err.__cause__ is not None:
                err = err.__cause__
            where = self._where()
            if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
                raise StorageError(
                    f"no S3 credentials for {uri} at {where}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an IAM role)"
                ) from None
            if isinstance(err, ConnectionError):
                raise StorageError(
                    f"cannot reach {where} for {uri} ({type(err).__name__}): start the S3/MinIO server "
                    "or fix storage.s3_endpoint_url"
                ) from None
            if isinstance(err, ClientError):
                code = str(err.response.get("Error", {}).get("Code", ""))
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ("404", "NoSuchKey", "NotFound"):
                    raise InputNotFoundError(f"{uri} does not exist") from None
                if code == "NoSuchBucket":
                    bucket = split_s3(uri)[0]
                    raise StorageError(
                        f"bucket {bucket} does not exist at {where}: create it "
                        f"(aws s3 mb s3://{bucket}) or fix storage.artifact_root"
                    ) from None
                if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise StorageError(
                        f"{where} refused {uri} ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                        "and the bucket's permissions"
                    ) from None
                message = err.response.get("Error", {}).get("Message", "")
                raise StorageError(f"{where} failed on {uri}: {code} {message}".rstrip()) from None
            raise StorageError(f"{where} failed on {uri}: {err}") from None

    # ------------------------------------------------------------------------------ helpers
    def _route(self, uri: str) -> ArtifactStore:
        if is_s3(uri):
            return self
        if self._local is None:
            self._local = LocalStore(os.getcwd())
        return self._local

    def _head(self, bucket: str, key: str) -> dict[str, Any] | None:
        """The object's HEAD response, or None when no object has exactly this key."""
        from botocore.exceptions import ClientError

        try:
            return self._client.head_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _keys(self, bucket: str, prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # skip "folder" marker objects
                    yield obj["Key"]

    @staticmethod
    def _dir_prefix(key: str) -> str:
        return f"{key}/" if key else ""

    # ------------------------------------------------------------------------------ backend
    def check(self) -> None:
        from botocore import UNSIGNED
        from botocore.config import Config
        from botocore.exceptions import ClientError

        with self._errors(self.root_uri):
            # one attempt: a preflight should answer within the connect timeout
            once = self._config.merge(Config(retries={"mode": "standard", "total_max_attempts": 1}))
            if self._session.get_credentials() is None:
                # unsigned, so that an endpoint that refuses is named as such rather than the credentials blamed
                unsigned = self._session.client(
                    "s3", endpoint_url=self.endpoint_url, config=once.merge(Config(signature_version=UNSIGNED))
                )
                try:
                    unsigned.head_bucket(Bucket=self.bucket)
                except ClientError:
                    pass  # the endpoint answered: the missing credentials are the problem (raised below)
            client = self._session.client("s3", endpoint_url=self.endpoint_url, config=once)
            try:
                client.head_bucket(Bucket=self.bucket)
            except ClientError as err:
                # HEAD has no body: a missing bucket comes back as a bare 404
                if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                    raise ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket") from None
                raise

    def _exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        with self._errors(uri):
            if key and self._head(bucket, key) is not None:
                return True
            page = self._client.list_objects_v2(Bucket=bucket, Prefix=self._dir_prefix(key), MaxKeys=1)
            return page.get("KeyCount", 0) > 0

    def _digest(self, uri: str) -> str:
        bucket, key = split_s3(uri)
        sha = hashlib.sha256()
        with self._errors(uri):
            head = self._head(bucket, key) if key else None
            if head is not None:
                objects = [("", head["ContentLength"], head["ETag"])]
            else:
                paginator = self._client.get_paginator("list_objects_v2")
                prefix = self._dir_prefix(key)
                objects = [
                    (obj["Key"].removeprefix(prefix), obj["Size"], obj["ETag"])
                    for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                    for obj in page.get("Contents", [])
                    if not obj["Key"].endswith("/")
                ]
        if not objects:
            raise InputNotFoundError(f"{uri} does not exist: cannot compute its digest")
        for rel, size, etag in sorted(objects):
            sha.update(f"{rel}\0{size}\0{etag.strip(chr(34))}\n".encode())
        return sha.hexdigest()

    def _list(self, uri: str) -> list[str]:
        bucket, key = split_s3(uri)
        with self._errors(uri):
            keys = sorted(self._keys(bucket, self._dir_prefix(key)))
            if not keys and key and self._head(bucket, key) is not None:
                keys = [key]
        return [f"s3://{bucket}/{k}" for k in keys]

    def _put_file(self, path: Path, uri: str) -> None:
        bucket, key = split_s3(uri)
        if not key:
            raise StorageError(f"{uri} names a bucket, not an object: put under a key")
        size = path.stat().st_size
        sha = sha256_file(path)
        with self._errors(uri):
            head = self._head(bucket, key)
            if head and head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha:
                return  # identical object already there (a resumed upload)
            self._client.upload_file(
                str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha}}, Config=self._transfer
            )
            head = self._head(bucket, key)
        if head is None or head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha:
            got = "nothing" if head is None else f"{head['ContentLength']} bytes"
            raise StorageError(
                f"upload of {path} to {uri} does not verify ({size} bytes sent, {got} stored): retry"
            )

    def _delete(self, uri: str) -> None:
        bucket = split_s3(uri)[0]
        keys = [u.removeprefix(f"s3://{bucket}/") for u in self._list(uri)]
        with self._errors(uri):
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": k} for k in keys[start : start + 1000]]
                failed = self._client.delete_objects(Bucket=bucket, Delete={"Objects": batch}).get("Errors", [])
                if failed:
                    first = failed[0]
                    raise StorageError(
                        f"{self._where()} did not delete s3://{bucket}/{first['Key']} ({first.get('Code')}): "
                        "check the bucket's permissions"
                    )

    def _fetch(self, uri: str) -> Path:
        bucket, key = split_s3(uri)
        dest = self.cache_dir / bucket / key if key else self.cache_dir / bucket
        with self._errors(uri):
            head = self._head(bucket, key) if key else None
            if head is not None:
                self._download(bucket, key, head, dest, uri)
                return dest
            keys = sorted(self._keys(bucket, self._dir_prefix(key)))
            if not keys:
                raise InputNotFoundError(f"{uri} does not exist")
            wanted = set()
            for k in keys:
                rel = k[len(self._dir_prefix(key)) :]
                wanted.add(rel)
                self._download(
                    bucket,
                    k,
                    self._client.head_object(Bucket=bucket, Key=k),
                    dest / rel,
                    f"s3://{bucket}/{k}",
                )
        # the cached directory mirrors the prefix: drop files of an older version of it
        for rel, file in tree_files(dest):
            if rel not in wanted and PARTIAL_MARK not in file.name:  # (not another fetch's temp file)
                file.unlink(missing_ok=True)
        return dest

    def _download(self, bucket: str, key: str, head: dict[str, Any], dest: Path, uri: str) -> None:
        """Download one object to ``dest`` unless a verified copy is there; check size and sha256."""
        size, sha = head["ContentLength"], head.get("Metadata", {}).get("sha256")
        if dest.is_file() and sha and dest.stat().st_size == size and sha256_file(dest) == sha:
            return
        with replacing(str(dest)) as tmp:
            self._client.download_file(bucket, key, str(tmp), Config=self._transfer)
            if sha and (content := sha256_file(tmp)) != sha:
                raise changed_since_upload(uri, sha, content)
            if tmp.stat().st_size != size:
                raise StorageError(
                    f"download of {uri} does not verify against its size ({size} bytes): retry"
                )

    def _read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        with self._errors(uri):
            return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def _write_bytes(self, uri: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "data"
            src.write_bytes(data)
            self._put_file(src, uri)
