"""ArtifactStore: one small interface over string URIs, a local directory or an S3 bucket.

Everything large (parent, corpus, checkpoints, exported models, plots) lives under one store root.
The embedded default is :class:`LocalStore`, a directory laid out exactly like the bucket; ``s3://``
roots go through :class:`S3Store` (boto3; the endpoint is configurable for MinIO, Ceph or moto).

URIs are plain strings everywhere: a local path (``/work/artifacts/run-1/nas/model``, ``file://`` is
accepted) or ``s3://bucket/key``. ``pathlib`` never touches an ``s3://`` string (it would fold the
``//``). Either store also reads and writes the other kind of URI (a local corpus with an S3 root, an
``s3://`` corpus with a local root); ``root_uri`` and :meth:`ArtifactStore.join` decide where outputs go
(:func:`join_uri` joins under any URI). What outlives a run (the MLflow registry's model versions, the step
index, lineage tags) stores a URI under a local root relative to it (:func:`relative_uri`) and resolves it
against the root in use when read (:func:`resolve_uri`), so a workdir can be moved or copied.

Uploads are verified: the size, and the sha256 of the content, which is also recorded with the file:
an S3 object carries it as user metadata (``x-amz-meta-sha256``), a LocalStore file in a hidden record
beside it (``.<name>.sha256``, left out of listings and digests). :meth:`ArtifactStore.fetch` checks
every file that has a record against it on the way in (models, checkpoints, corpora), so a file changed
after upload (a flipped byte, a replaced ``model.safetensors``) is refused before anything loads it. A
file with no record (placed outside the store, or stored before records existed) is not checked; a
writer that can also rewrite the record is not caught here (lineage keeps the digests of stage outputs).
Large files go up in parts (boto3 ``TransferConfig``); requests are retried with backoff (botocore
``standard`` retry mode) but a refused or unreachable endpoint fails within seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from nemoforge.errors import InputNotFoundError, NemoforgeError, StorageError

if TYPE_CHECKING:
    from nemoforge.config import Recipe

S3Checksums = Literal["when_required", "when_supported"]
"""botocore's checksum modes (``storage.s3_checksums``)."""

log = logging.getLogger(__name__)

_CHUNK_BYTES = 8 * 2**20
_PARTIAL_MARK = ".partial-"
"""Temp files are ``.<name>.partial-<random>`` beside their destination; listings skip them."""
_RECORD_SUFFIX = ".sha256"
"""A LocalStore file's recorded sha256 is in ``.<name>.sha256`` beside it; listings and digests skip it."""


# -------------------------------------------------------------------------------------------- digests
def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def _record_path(path: Path) -> Path:
    """Where a LocalStore records the sha256 of ``path``."""
    return path.with_name(f".{path.name}{_RECORD_SUFFIX}")


def _is_record(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(_RECORD_SUFFIX)


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every file under ``root`` (sha256 records left out), sorted by path."""
    files = [
        (p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file() and not _is_record(p)
    ]
    return sorted(files)


def _changed_since_upload(uri: str, recorded: str, content: str) -> StorageError:
    """The one-line refusal of a fetched file whose content is not what was uploaded."""
    return StorageError(
        f"{uri} does not verify against the sha256 recorded at upload (recorded {recorded}, content {content}): "
        "it is corrupt or was changed after upload; re-run the step that wrote it"
    )


def digest_path(path: str | Path) -> str:
    """sha256 hex of a local file, or of a directory tree.

    A directory's digest is the sha256 of one line ``<relative posix path>\\0<file sha256>\\n`` per
    file (a LocalStore's ``.<name>.sha256`` records left out), in sorted path order: it changes when any
    file's name or content changes, and does not depend on timestamps or on the order the file system
    lists entries in.

    Args:
        path: a local file or directory.

    Returns:
        64 hex characters.

    Raises:
        InputNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_file():
        return _sha256_file(path)
    if not path.is_dir():
        raise InputNotFoundError(f"{path} does not exist: cannot compute its digest")
    sha = hashlib.sha256()
    for rel, file in _tree_files(path):
        sha.update(f"{rel}\0{_sha256_file(file)}\n".encode())
    return sha.hexdigest()


# ------------------------------------------------------------------------------------------ interface
def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join_uri(uri: str, *parts: str) -> str:
    """``uri/part/part...`` for any store URI (local path or ``s3://``), without pathlib (it would fold ``//``).

    Parts are ``/``-joined with their outer slashes dropped, and empty parts skipped; a trailing ``/`` of
    ``uri`` is dropped: ``join_uri("s3://b/run/", "/nas/", "model") == "s3://b/run/nas/model"``.
    """
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    base = uri.rstrip("/")
    return f"{base}/{tail}" if tail else base


def relative_uri(uri: str, root_uri: str | None) -> str:
    """``uri`` as the registry, the step index and lineage tags store it: relative to a local artifact root.

    A local path under the local ``root_uri`` becomes its posix path relative to the root
    (``/w/artifacts/run-1/rl/model`` -> ``run-1/rl/model``), so a workdir that is moved or copied points at its
    own files; :func:`resolve_uri` reads it back. Every other URI is stored as it is: ``s3://`` URIs, local paths
    outside the root (a parent checkpoint elsewhere), relative ones, the root itself, and any URI when the root is
    ``s3://`` or None (no root known).

    Args:
        uri: a store URI (local path, ``file://`` or ``s3://``).
        root_uri: the artifact root in use (``storage.artifact_root``); None: none known.
    """
    if root_uri is None or _is_s3(root_uri) or ("://" in uri and not uri.startswith("file://")):
        return uri
    path = _local_path(uri)
    if not path.is_absolute():
        return uri
    path, root = path.resolve(), _local_path(root_uri).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) and path != root else uri


def resolve_uri(uri: str, root_uri: str | None) -> str:
    """The URI a stored ``uri`` (:func:`relative_uri`) stands for under the artifact root in use.

    A relative path is joined under ``root_uri``; an absolute path, a ``file://`` or ``s3://`` URI is returned as
    it is, so records written before URIs were stored relative (absolute paths) read as they did.

    Args:
        uri: a URI as stored.
        root_uri: the artifact root in use (``storage.artifact_root``, default ``<workdir>/artifacts``); None:
            none known, ``uri`` is returned as it is.
    """
    if root_uri is None or "://" in uri or Path(uri).expanduser().is_absolute():
        return uri
    return join_uri(root_uri, uri)


def _local_path(uri: str) -> Path:
    """The local path of a local URI (plain path or ``file://``); any other scheme is refused."""
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme; artifact URIs are local paths or s3://bucket/key")
    return Path(uri.removeprefix("file://")).expanduser()


class ArtifactStore(ABC):
    """Files and directories under a root URI (a local directory or ``s3://bucket/prefix``).

    Every method takes full URIs (build them with :meth:`join`). A "directory" is a prefix: it
    exists when at least one file lies under it.

    Attributes:
        root_uri: the store's root, without a trailing ``/``.
    """

    root_uri: str

    def join(self, *parts: str) -> str:
        """The URI ``root_uri/part/part...``: :func:`join_uri` under the root."""
        return join_uri(self.root_uri, *parts)

    # Public methods route each URI to the backend of its kind: the store itself, or a delegate
    # for the other kind (see the module docstring).
    @abstractmethod
    def _route(self, uri: str) -> ArtifactStore: ...

    def exists(self, uri: str) -> bool:
        """Whether ``uri`` is a file, or a directory/prefix with at least one file under it.

        Raises:
            StorageError: the store cannot be reached or refuses (S3: endpoint, credentials, bucket).
        """
        return self._route(uri)._exists(uri)

    def list(self, uri: str) -> list[str]:
        """File URIs under the directory/prefix ``uri`` (recursive), sorted; ``[uri]`` for a file.

        Returns:
            An empty list when nothing lies under ``uri``.

        Raises:
            StorageError: the store cannot be reached or refuses.
        """
        return self._route(uri)._list(uri)

    def put(self, local_path: str | Path, uri: str) -> str:
        """Copy a local file to ``uri``, or a local directory's files under ``uri/``; verified.

        Each file is checked after the copy (size and sha256). Files already under ``uri`` that
        ``local_path`` lacks are left in place; write a fresh prefix when that matters. Putting a
        path onto itself (a LocalStore path handed out by :meth:`fetch`) only verifies it.

        Args:
            local_path: a local file or directory.
            uri: destination URI.

        Returns:
            ``uri``.

        Raises:
            InputNotFoundError: ``local_path`` does not exist.
            StorageError: the copy could not be written or does not verify.
        """
        local_path = Path(local_path)
        if not local_path.exists():
            raise InputNotFoundError(f"{local_path} does not exist: nothing to put at {uri}")
        backend = self._route(uri)
        if local_path.is_file():
            backend._put_file(local_path, uri)
        else:
            for rel, file in _tree_files(local_path):
                backend._put_file(file, f"{uri.rstrip('/')}/{rel}")
        return uri

    def delete(self, uri: str) -> None:
        """Delete the file at ``uri``, or every file under the directory/prefix ``uri/``; nothing there: no-op.

        A prefix is matched whole: deleting ``.../step-1`` leaves ``.../step-10`` alone.

        Raises:
            StorageError: the store cannot be reached or refuses.
        """
        self._route(uri)._delete(uri)

    def fetch(self, uri: str) -> Path:
        """A local path holding the file or directory at ``uri``, each file checked against its recorded sha256.

        A local URI comes back as its own path (no copy) once every file that has a record matches it;
        an ``s3://`` URI is downloaded into the local cache (``$NEMOFORGE_CACHE/s3``, else
        ``~/.cache/nemoforge/s3``), where a file already cached is reused only when it still matches the
        object's sha256, and a download must match it.

        Raises:
            InputNotFoundError: nothing exists at ``uri``.
            StorageError: the store cannot be reached, or a file does not match the sha256 recorded at upload
                (one line naming the file's URI).
        """
        return self._route(uri)._fetch(uri)

    def digest(self, uri: str) -> str:
        """A sha256 that changes when the file or any file under the directory/prefix ``uri`` changes.

        Local: :func:`digest_path` of the content. S3: the sha256 of one line per object (relative key,
        size, ETag) from the listing, so that nothing is downloaded (a re-upload of the same bytes in
        other parts may change it: a change is then reported where there was none, never the reverse).

        Raises:
            InputNotFoundError: nothing exists at ``uri``.
            StorageError: the store cannot be reached or refuses.
        """
        return self._route(uri)._digest(uri)

    def read_text(self, uri: str) -> str:
        """The UTF-8 text of the file at ``uri``.

        Raises:
            InputNotFoundError: the file does not exist.
            StorageError: the store cannot be reached or refuses.
        """
        return self._route(uri)._read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str) -> str:
        """Write ``text`` (UTF-8) to the file ``uri``, replacing it whole; verified like :meth:`put`.

        Returns:
            ``uri``.

        Raises:
            StorageError: the file could not be written.
        """
        self._route(uri)._write_bytes(uri, text.encode("utf-8"))
        return uri

    def read_json(self, uri: str) -> Any:
        """The JSON value in the file at ``uri``.

        Raises:
            InputNotFoundError: the file does not exist.
            StorageError: the store refuses, or the file is not JSON.
        """
        text = self.read_text(uri)
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise StorageError(f"{uri} is not valid JSON ({err}): rewrite or remove it") from None

    def write_json(self, uri: str, obj: Any) -> str:
        """Write ``obj`` as indented, key-sorted JSON to ``uri``.

        Returns:
            ``uri``.
        """
        return self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    @abstractmethod
    def check(self) -> None:
        """Check, before any compute, that the root can be used.

        LocalStore: the root directory can be created and written to. S3Store: the endpoint answers
        within its connect timeout (one attempt), the bucket exists and the credentials are accepted.

        Raises:
            StorageError: naming the root (and the S3 endpoint) and the fix.
        """

    # backend methods: the URI is of the backend's own kind
    @abstractmethod
    def _exists(self, uri: str) -> bool: ...

    @abstractmethod
    def _list(self, uri: str) -> list[str]: ...

    @abstractmethod
    def _put_file(self, path: Path, uri: str) -> None: ...

    @abstractmethod
    def _delete(self, uri: str) -> None: ...

    @abstractmethod
    def _fetch(self, uri: str) -> Path: ...

    @abstractmethod
    def _digest(self, uri: str) -> str: ...

    @abstractmethod
    def _read_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def _write_bytes(self, uri: str, data: bytes) -> None: ...


def open_store(
    root_uri: str,
    *,
    s3_endpoint_url: str | None = None,
    s3_region: str = "us-east-1",
    s3_checksums: S3Checksums = "when_required",
) -> ArtifactStore:
    """Open the artifact store rooted at ``root_uri``.

    Args:
        root_uri: a local directory (created on the first write) or ``s3://bucket[/prefix]``.
        s3_endpoint_url: S3 API endpoint (MinIO, Ceph, moto: ``http://host:port``); None: AWS.
            Also used by a LocalStore for ``s3://`` inputs.
        s3_region: S3 region name.
        s3_checksums: the S3 client's checksum behaviour (:class:`S3Store` ``checksums``).

    Returns:
        A :class:`LocalStore` or an :class:`S3Store`. Nothing is contacted yet: call
        :meth:`ArtifactStore.check` to fail early.

    Raises:
        StorageError: an unsupported scheme, or an ``s3://`` URI without a bucket.
    """
    if _is_s3(root_uri):
        return S3Store(root_uri, endpoint_url=s3_endpoint_url, region=s3_region, checksums=s3_checksums)
    _local_path(root_uri)  # refuses other schemes
    return LocalStore(root_uri, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region, s3_checksums=s3_checksums)


def store_for(recipe: Recipe, root_uri: str | None = None) -> ArtifactStore:
    """The store at ``root_uri`` (default ``storage.artifact_root``) with the recipe's S3 settings.

    Either kind of store reads and writes both kinds of URI, so any input the recipe names (an ``s3://``
    corpus, a plot, a model) can be read through ``store_for(recipe)`` or a store at the input itself.

    Raises:
        NemoforgeError: no ``root_uri`` and ``storage.artifact_root`` is not resolved yet.
        StorageError: as :func:`open_store`.
    """
    storage = recipe.storage
    root_uri = root_uri or storage.artifact_root
    if root_uri is None:
        raise NemoforgeError("storage.artifact_root is not resolved; run through `nemoforge run` or set it")
    return open_store(
        root_uri,
        s3_endpoint_url=storage.s3_endpoint_url,
        s3_region=storage.s3_region,
        s3_checksums=storage.s3_checksums,
    )


def cache_root() -> Path:
    """The local cache: the parent's download and conversion, corpora, S3 downloads (``s3/``).

    ``$NEMOFORGE_CACHE`` when set (and not empty), else ``~/.cache/nemoforge``.
    """
    return Path(os.environ.get("NEMOFORGE_CACHE") or Path.home() / ".cache" / "nemoforge")


# ------------------------------------------------------------------------------------------ local
def _partial_path(dest: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}{_PARTIAL_MARK}", dir=dest.parent)
    os.close(fd)
    return Path(name)


@contextmanager
def _replacing(uri: str) -> Iterator[Path]:
    """A temp file beside local ``uri`` that replaces it when the block succeeds (else is removed).

    Raises:
        StorageError: the file system refuses (permissions, no space).
    """
    dest = _local_path(uri)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial_path(dest)
        try:
            yield tmp
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        raise StorageError(f"cannot write {uri} ({err.strerror}): check free space and permissions") from None


class LocalStore(ArtifactStore):
    """A local directory laid out exactly like the bucket: URI ``<root>/a/b`` is file ``<root>/a/b``.

    Writes go to a temp file beside the destination and are renamed into place, so a reader sees a
    file whole or not at all. ``s3://`` URIs are served by an :class:`S3Store` with the endpoint
    and region given here.

    Args:
        root_uri: the root directory (a path or ``file://`` URI; made absolute, created on first write).
        s3_endpoint_url: endpoint for ``s3://`` URIs read or written through this store.
        s3_region: region for those URIs.
    """

    def __init__(
        self,
        root_uri: str,
        *,
        s3_endpoint_url: str | None = None,
        s3_region: str = "us-east-1",
        s3_checksums: S3Checksums = "when_required",
    ):
        self.root_uri = str(_local_path(root_uri).resolve())
        self._s3_endpoint_url = s3_endpoint_url
        self._s3_region = s3_region
        self._s3_checksums = s3_checksums
        self._s3: S3Store | None = None

    def _route(self, uri: str) -> ArtifactStore:
        if not _is_s3(uri):
            return self
        if self._s3 is None:
            bucket_root = "/".join(uri.split("/")[:3])
            self._s3 = S3Store(
                bucket_root, endpoint_url=self._s3_endpoint_url, region=self._s3_region, checksums=self._s3_checksums
            )
        return self._s3

    def check(self) -> None:
        """Write and remove a probe file under the root; folders made for the probe are removed too, so a
        check before a run that then fails leaves nothing behind."""
        root = Path(self.root_uri)
        made = [d for d in (root, *root.parents) if not d.exists()]
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = _partial_path(root / "check")
            probe.unlink()
            for folder in made:  # deepest first
                folder.rmdir()
        except OSError as err:
            raise StorageError(
                f"artifact root {self.root_uri} is not a writable directory ({err.strerror}): "
                "fix storage.artifact_root or its permissions"
            ) from None

    def _exists(self, uri: str) -> bool:
        path = _local_path(uri)
        return path.is_file() or (path.is_dir() and bool(self._list(uri)))

    def _digest(self, uri: str) -> str:
        return digest_path(_local_path(uri))

    def _list(self, uri: str) -> list[str]:
        path = _local_path(uri)
        if path.is_file():
            return [uri]
        if not path.is_dir():
            return []
        base = uri.rstrip("/")
        return [f"{base}/{rel}" for rel, file in _tree_files(path) if _PARTIAL_MARK not in file.name]

    def _put_file(self, path: Path, uri: str) -> None:
        dest = _local_path(uri)
        if dest.exists() and dest.resolve() == path.resolve():
            # already in place (written straight into the store by its producer): record what is there
            self._record(uri, _sha256_file(dest))
            return
        with _replacing(uri) as tmp:
            sha = hashlib.sha256()
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK_BYTES):
                    sha.update(chunk)
                    dst.write(chunk)
            if tmp.stat().st_size != path.stat().st_size or _sha256_file(tmp) != sha.hexdigest():
                raise StorageError(f"copy of {path} to {uri} does not verify (size or sha256): retry")
        self._record(uri, sha.hexdigest())

    def _delete(self, uri: str) -> None:
        path = _local_path(uri)
        try:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.is_file():
                path.unlink()
                _record_path(path).unlink(missing_ok=True)
        except OSError as err:
            raise StorageError(f"cannot delete {uri} ({err.strerror}): check its permissions") from None

    @staticmethod
    def _record(uri: str, sha: str) -> None:
        """Write the record of the file ``uri``'s sha256 (``.<name>.sha256`` beside it)."""
        with _replacing(str(_record_path(_local_path(uri)))) as tmp:
            tmp.write_text(sha + "\n")

    def _fetch(self, uri: str) -> Path:
        path = _local_path(uri)
        if not path.exists():
            raise InputNotFoundError(f"{uri} does not exist")
        files = [("", path)] if path.is_file() else _tree_files(path)
        for rel, file in files:
            record = _record_path(file)
            if _PARTIAL_MARK in file.name or not record.is_file():
                continue
            recorded, content = record.read_text().strip(), _sha256_file(file)
            if content != recorded:
                raise _changed_since_upload(f"{uri.rstrip('/')}/{rel}" if rel else uri, recorded, content)
        return path

    def _read_bytes(self, uri: str) -> bytes:
        path = _local_path(uri)
        if not path.is_file():
            raise InputNotFoundError(f"{uri} does not exist")
        return path.read_bytes()

    def _write_bytes(self, uri: str, data: bytes) -> None:
        with _replacing(uri) as tmp:
            tmp.write_bytes(data)
            if tmp.read_bytes() != data:
                raise StorageError(f"write of {uri} does not verify: retry")
        self._record(uri, hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------------------------- S3
def _split_s3(uri: str) -> tuple[str, str]:
    """``("bucket", "key/with/slashes")`` of ``s3://bucket/key/with/slashes`` (key may be empty)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"{uri} has no bucket: write s3://bucket/prefix")
    return bucket, key.strip("/")


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

        self.bucket, self.prefix = _split_s3(root_uri)
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
                    bucket = _split_s3(uri)[0]
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
        if _is_s3(uri):
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
        bucket, key = _split_s3(uri)
        with self._errors(uri):
            if key and self._head(bucket, key) is not None:
                return True
            page = self._client.list_objects_v2(Bucket=bucket, Prefix=self._dir_prefix(key), MaxKeys=1)
            return page.get("KeyCount", 0) > 0

    def _digest(self, uri: str) -> str:
        bucket, key = _split_s3(uri)
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
        bucket, key = _split_s3(uri)
        with self._errors(uri):
            keys = sorted(self._keys(bucket, self._dir_prefix(key)))
            if not keys and key and self._head(bucket, key) is not None:
                keys = [key]
        return [f"s3://{bucket}/{k}" for k in keys]

    def _put_file(self, path: Path, uri: str) -> None:
        bucket, key = _split_s3(uri)
        if not key:
            raise StorageError(f"{uri} names a bucket, not an object: put under a key")
        size = path.stat().st_size
        sha = _sha256_file(path)
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
        bucket = _split_s3(uri)[0]
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
        bucket, key = _split_s3(uri)
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
        for rel, file in _tree_files(dest):
            if rel not in wanted and _PARTIAL_MARK not in file.name:  # (not another fetch's temp file)
                file.unlink(missing_ok=True)
        return dest

    def _download(self, bucket: str, key: str, head: dict[str, Any], dest: Path, uri: str) -> None:
        """Download one object to ``dest`` unless a verified copy is there; check size and sha256."""
        size, sha = head["ContentLength"], head.get("Metadata", {}).get("sha256")
        if dest.is_file() and sha and dest.stat().st_size == size and _sha256_file(dest) == sha:
            return
        with _replacing(str(dest)) as tmp:
            self._client.download_file(bucket, key, str(tmp), Config=self._transfer)
            if sha and (content := _sha256_file(tmp)) != sha:
                raise _changed_since_upload(uri, sha, content)
            if tmp.stat().st_size != size:
                raise StorageError(
                    f"download of {uri} does not verify against its size ({size} bytes): retry"
                )

    def _read_bytes(self, uri: str) -> bytes:
        bucket, key = _split_s3(uri)
        with self._errors(uri):
            return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def _write_bytes(self, uri: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "data"
            src.write_bytes(data)
            self._put_file(src, uri)
