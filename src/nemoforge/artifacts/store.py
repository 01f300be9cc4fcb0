"""The :class:`ArtifactStore` interface: files and directories under a root URI, each URI routed to its backend.

Either store also reads and writes the other kind of URI (a local corpus with an S3 root, an ``s3://`` corpus with a
local root); ``root_uri`` and :meth:`ArtifactStore.join` decide where outputs go.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

from nemoforge.artifacts.digests import tree_files
from nemoforge.artifacts.uris import join_uri
from nemoforge.errors import InputNotFoundError, StorageError

S3Checksums = Literal["when_required", "when_supported"]
"""botocore's checksum modes (``storage.s3_checksums``)."""


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
            for rel, file in tree_files(local_path):
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
