"""Store URIs: plain strings, a local path (``file://`` accepted) or ``s3://bucket/key``, joined without pathlib.

``pathlib`` never touches an ``s3://`` string (it would fold the ``//``). What outlives a run (the MLflow registry's
model versions, the step index, lineage tags) stores a URI under a local root relative to it (:func:`relative_uri`)
and resolves it against the root in use when read (:func:`resolve_uri`), so a workdir can be moved or copied.
"""

from __future__ import annotations

from pathlib import Path

from nemoforge.errors import StorageError


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` URI."""
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``("bucket", "key/with/slashes")`` of ``s3://bucket/key/with/slashes`` (key may be empty)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"{uri} has no bucket: write s3://bucket/prefix")
    return bucket, key.strip("/")


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
    if root_uri is None or is_s3(root_uri) or ("://" in uri and not uri.startswith("file://")):
        return uri
    path = local_path_of(uri)
    if not path.is_absolute():
        return uri
    path, root = path.resolve(), local_path_of(root_uri).resolve()
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


def local_path_of(uri: str) -> Path:
    """The local path of a local URI (plain path or ``file://``); any other scheme is refused."""
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme; artifact URIs are local paths or s3://bucket/key")
    return Path(uri.removeprefix("file://")).expanduser()
