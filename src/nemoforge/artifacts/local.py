"""LocalStore: a local directory laid out exactly like the bucket, written by rename so a reader sees whole files."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from nemoforge.artifacts.digests import (
    CHUNK_BYTES,
    changed_since_upload,
    digest_path,
    record_path,
    sha256_file,
    tree_files,
)
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import is_s3, local_path_of
from nemoforge.errors import InputNotFoundError, StorageError

PARTIAL_MARK = ".partial-"
"""Temp files are ``.<name>.partial-<random>`` beside their destination; listings skip them."""


def partial_path(dest: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}{PARTIAL_MARK}", dir=dest.parent)
    os.close(fd)
    return Path(name)


@contextmanager
def replacing(uri: str) -> Iterator[Path]:
    """A temp file beside local ``uri`` that replaces it when the block succeeds (else is removed).

    Raises:
        StorageError: the file system refuses (permissions, no space).
    """
    dest = local_path_of(uri)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(dest)
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
    file whole or not at all. ``s3://`` URIs are served by the store ``open_s3`` opens (an
    :class:`~nemoforge.artifacts.s3.S3Store` with the recipe's endpoint and region, when the store comes from
    :func:`~nemoforge.artifacts.open_store`).

    Args:
        root_uri: the root directory (a path or ``file://`` URI; made absolute, created on first write).
        open_s3: opens the store of an ``s3://bucket`` root, for ``s3://`` URIs read or written through this
            store; None: this store refuses ``s3://`` URIs.
    """

    def __init__(self, root_uri: str, *, open_s3: Callable[[str], ArtifactStore] | None = None):
        self.root_uri = str(local_path_of(root_uri).resolve())
        self._open_s3 = open_s3
        self._s3: ArtifactStore | None = None

    def _route(self, uri: str) -> ArtifactStore:
        if not is_s3(uri):
            return self
        if self._open_s3 is None:
            raise StorageError(
                f"{uri}: this LocalStore has no S3 settings; open it with open_store or store_for to read s3:// URIs"
            )
        if self._s3 is None:
            self._s3 = self._open_s3("/".join(uri.split("/")[:3]))
        return self._s3

    def check(self) -> None:
        """Write and remove a probe file under the root; folders made for the probe are removed too, so a
        check before a run that then fails leaves nothing behind."""
        root = Path(self.root_uri)
        made = [d for d in (root, *root.parents) if not d.exists()]
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = partial_path(root / "check")
            probe.unlink()
            for folder in made:  # deepest first
                folder.rmdir()
        except OSError as err:
            raise StorageError(
                f"artifact root {self.root_uri} is not a writable directory ({err.strerror}): "
                "fix storage.artifact_root or its permissions"
            ) from None

    def _exists(self, uri: str) -> bool:
        path = local_path_of(uri)
        return path.is_file() or (path.is_dir() and bool(self._list(uri)))

    def _digest(self, uri: str) -> str:
        return digest_path(local_path_of(uri))

    def _list(self, uri: str) -> list[str]:
        path = local_path_of(uri)
        if path.is_file():
            return [uri]
        if not path.is_dir():
            return []
        base = uri.rstrip("/")
        return [f"{base}/{rel}" for rel, file in tree_files(path) if PARTIAL_MARK not in file.name]

    def _put_file(self, path: Path, uri: str) -> None:
        dest = local_path_of(uri)
        if dest.exists() and dest.resolve() == path.resolve():
            # already in place (written straight into the store by its producer): record what is there
            self._record(uri, sha256_file(dest))
            return
        with replacing(uri) as tmp:
            sha = hashlib.sha256()
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK_BYTES):
                    sha.update(chunk)
                    dst.write(chunk)
            if tmp.stat().st_size != path.stat().st_size or sha256_file(tmp) != sha.hexdigest():
                raise StorageError(f"copy of {path} to {uri} does not verify (size or sha256): retry")
        self._record(uri, sha.hexdigest())

    def _delete(self, uri: str) -> None:
        path = local_path_of(uri)
        try:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.is_file():
                path.unlink()
                record_path(path).unlink(missing_ok=True)
        except OSError as err:
            raise StorageError(f"cannot delete {uri} ({err.strerror}): check its permissions") from None

    @staticmethod
    def _record(uri: str, sha: str) -> None:
        """Write the record of the file ``uri``'s sha256 (``.<name>.sha256`` beside it)."""
        with replacing(str(record_path(local_path_of(uri)))) as tmp:
            tmp.write_text(sha + "\n")

    def _fetch(self, uri: str) -> Path:
        path = local_path_of(uri)
        if not path.exists():
            raise InputNotFoundError(f"{uri} does not exist")
        files = [("", path)] if path.is_file() else tree_files(path)
        for rel, file in files:
            record = record_path(file)
            if PARTIAL_MARK in file.name or not record.is_file():
                continue
            recorded, content = record.read_text().strip(), sha256_file(file)
            if content != recorded:
                raise changed_since_upload(f"{uri.rstrip('/')}/{rel}" if rel else uri, recorded, content)
        return path

    def _read_bytes(self, uri: str) -> bytes:
        path = local_path_of(uri)
        if not path.is_file():
            raise InputNotFoundError(f"{uri} does not exist")
        return path.read_bytes()

    def _write_bytes(self, uri: str, data: bytes) -> None:
        with replacing(uri) as tmp:
            tmp.write_bytes(data)
            if tmp.read_bytes() != data:
                raise StorageError(f"write of {uri} does not verify: retry")
        self._record(uri, hashlib.sha256(data).hexdigest())
