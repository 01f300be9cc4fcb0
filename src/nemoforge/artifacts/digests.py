"""sha256 digests of local files and trees, and the sha256 records a LocalStore keeps beside its files.

Uploads are verified: the size, and the sha256 of the content, which is also recorded with the file: an S3 object
carries it as user metadata (``x-amz-meta-sha256``), a LocalStore file in a hidden record beside it
(``.<name>.sha256``, left out of listings and digests). :meth:`~nemoforge.artifacts.store.ArtifactStore.fetch`
checks every file that has a record against it on the way in (models, checkpoints, corpora), so a file changed
after upload (a flipped byte, a replaced ``model.safetensors``) is refused before anything loads it. A file with
no record (placed outside the store, or stored before records existed) is not checked; a writer that can also
rewrite the record is not caught here (lineage keeps the digests of stage outputs).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from nemoforge.errors import InputNotFoundError, StorageError

CHUNK_BYTES = 8 * 2**20
"""Read and copy size of streamed files."""
RECORD_SUFFIX = ".sha256"
"""A LocalStore file's recorded sha256 is in ``.<name>.sha256`` beside it; listings and digests skip it."""


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def record_path(path: Path) -> Path:
    """Where a LocalStore records the sha256 of ``path``."""
    return path.with_name(f".{path.name}{RECORD_SUFFIX}")


def is_record(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(RECORD_SUFFIX)


def tree_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every file under ``root`` (sha256 records left out), sorted by path."""
    files = [
        (p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file() and not is_record(p)
    ]
    return sorted(files)


def changed_since_upload(uri: str, recorded: str, content: str) -> StorageError:
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
        return sha256_file(path)
    if not path.is_dir():
        raise InputNotFoundError(f"{path} does not exist: cannot compute its digest")
    sha = hashlib.sha256()
    for rel, file in tree_files(path):
        sha.update(f"{rel}\0{sha256_file(file)}\n".encode())
    return sha.hexdigest()
