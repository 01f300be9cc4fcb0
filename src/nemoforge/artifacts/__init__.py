"""ArtifactStore: one small interface over string URIs, a local directory or an S3 bucket.

Everything large (parent, corpus, checkpoints, exported models, plots) lives under one store root.
The embedded default is a :class:`~nemoforge.artifacts.local.LocalStore`, a directory laid out exactly like the
bucket; ``s3://`` roots go through an :class:`~nemoforge.artifacts.s3.S3Store` (boto3; the endpoint is configurable
for MinIO, Ceph or moto). Open one with :func:`open_store` (a root URI) or :func:`store_for` (a recipe): the one
place that knows both kinds, so that either store also reads and writes the other kind of URI.

- :mod:`~nemoforge.artifacts.store`: the :class:`~nemoforge.artifacts.store.ArtifactStore` interface.
- :mod:`~nemoforge.artifacts.local`, :mod:`~nemoforge.artifacts.s3`: its two implementations.
- :mod:`~nemoforge.artifacts.uris`: URIs as plain strings: join, split, stored relative to a local root.
- :mod:`~nemoforge.artifacts.digests`: sha256 of files and trees, and the records uploads are verified against.
- :mod:`~nemoforge.artifacts.cache`: the local cache directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nemoforge.artifacts.local import LocalStore
from nemoforge.artifacts.s3 import S3Store
from nemoforge.artifacts.store import ArtifactStore, S3Checksums
from nemoforge.artifacts.uris import is_s3, local_path_of
from nemoforge.errors import NemoforgeError

if TYPE_CHECKING:
    from nemoforge.config import Recipe


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

    def open_s3(s3_root_uri: str) -> S3Store:
        return S3Store(s3_root_uri, endpoint_url=s3_endpoint_url, region=s3_region, checksums=s3_checksums)

    if is_s3(root_uri):
        return open_s3(root_uri)
    local_path_of(root_uri)  # refuses other schemes
    return LocalStore(root_uri, open_s3=open_s3)


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
