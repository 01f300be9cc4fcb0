"""ArtifactStore against a real directory and a real S3 API server (moto's, on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import moto_s3

from nemoforge.artifacts import open_store
from nemoforge.artifacts.digests import digest_path
from nemoforge.artifacts.local import LocalStore
from nemoforge.artifacts.s3 import S3Store
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import relative_uri, resolve_uri
from nemoforge.config import Recipe
from nemoforge.errors import InputNotFoundError, StorageError


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server in this process, with dummy credentials in the environment."""
    with moto_s3() as endpoint:
        yield endpoint


def _new_bucket(endpoint: str) -> str:
    import boto3

    name = f"nf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """The same tests run against a LocalStore and an S3Store (fresh root each)."""
    if request.param == "local":
        return open_store(str(tmp_path / "artifacts"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(f"s3://{_new_bucket(endpoint)}/root", endpoint_url=endpoint, cache_dir=tmp_path / "cache")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small directory tree like an exported checkpoint."""
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "model.safetensors").write_bytes(os.urandom(3000))
    (root / "sub" / "tokenizer.json").write_text("{}")
    return root


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -------------------------------------------------------------------------------------------- digest
def test_digest_path_of_file_and_tree(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello")
    assert digest_path(f) == hashlib.sha256(b"hello").hexdigest()

    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "b.txt").write_bytes(b"B")
    (tree / "d" / "a.txt").write_bytes(b"A")
    lines = [f"b.txt\0{hashlib.sha256(b'B').hexdigest()}\n", f"d/a.txt\0{hashlib.sha256(b'A').hexdigest()}\n"]
    assert digest_path(tree) == hashlib.sha256("".join(lines).encode()).hexdigest()

    (tree / "d" / "a.txt").write_bytes(b"A2")
    assert digest_path(tree) != hashlib.sha256("".join(lines).encode()).hexdigest()
    with pytest.raises(InputNotFoundError, match="missing"):
        digest_path(tmp_path / "missing")


def test_open_store_kinds(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}/x/").root_uri == str(tmp_path / "x")
    s3 = open_store("s3://bucket/pre/fix/", s3_endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store)
    assert s3.root_uri == "s3://bucket/pre/fix"
    assert s3.join("run-1", "/nas/", "model") == "s3://bucket/pre/fix/run-1/nas/model"
    with pytest.raises(StorageError, match="gs://b"):
        open_store("gs://b/x")
    with pytest.raises(StorageError, match="no bucket"):
        open_store("s3:///x")


def test_stored_uris_are_relative_to_a_local_root_and_resolve_against_the_root_in_use() -> None:
    root, moved = "/w/artifacts", "/copy/of/w/artifacts"
    assert relative_uri("/w/artifacts/run-1/rl/model", root) == "run-1/rl/model"
    assert relative_uri("file:///w/artifacts/run-1/rl/model/", root) == "run-1/rl/model"
    assert relative_uri("/w/artifacts/../artifacts/index/x.json", root + "/") == "index/x.json"
    assert resolve_uri("run-1/rl/model", moved) == "/copy/of/w/artifacts/run-1/rl/model"
    assert resolve_uri(relative_uri("/w/artifacts/corpus/ab", root), "s3://b/p/") == "s3://b/p/corpus/ab"
    kept = ["s3://b/p/run-1/rl/model", "/elsewhere/parent", "/w/artifacts-old/m", "/w/artifacts", "run-1/rl/model"]
    for uri in kept:  # outside the root, the root itself, not local, relative already: stored as they are
        assert relative_uri(uri, root) == uri, uri
    assert relative_uri("/w/artifacts/run-1/rl/model", "s3://b/p") == "/w/artifacts/run-1/rl/model"
    assert relative_uri("/w/artifacts/run-1/rl/model", None) == "/w/artifacts/run-1/rl/model"
    # records written before (absolute paths) and s3:// URIs read as they are; no root known: as stored
    for uri in ("/w/artifacts/run-1/rl/model", "file:///w/artifacts/m", "s3://b/p/m"):
        assert resolve_uri(uri, moved) == uri, uri
    assert resolve_uri("run-1/rl/model", None) == "run-1/rl/model"


# ---------------------------------------------------------------------------------- both backends
def test_round_trip_file_and_directory(store: ArtifactStore, model_dir: Path) -> None:
    file_uri = store.join("run-1", "nas", "config.json")
    assert store.put(model_dir / "config.json", file_uri) == file_uri
    assert store.exists(file_uri)
    assert store.read_text(file_uri) == '{"a": 1}'
    assert store.read_json(file_uri) == {"a": 1}
    assert store.list(file_uri) == [file_uri]

    dir_uri = store.join("run-1", "nas", "model")
    store.put(model_dir, dir_uri)
    assert store.exists(dir_uri)
    assert store.exists(store.join("run-1"))  # a non-empty prefix
    assert store.list(dir_uri) == [
        f"{dir_uri}/config.json",
        f"{dir_uri}/model.safetensors",
        f"{dir_uri}/sub/tokenizer.json",
    ]
    fetched = store.fetch(dir_uri)
    assert fetched.is_dir()
    assert digest_path(fetched) == digest_path(model_dir)
    assert (
        store.fetch(f"{dir_uri}/model.safetensors").read_bytes()
        == (model_dir / "model.safetensors").read_bytes()
    )

    assert not store.exists(store.join("run-1", "nas", "mod"))  # a key prefix is not a directory
    assert store.list(store.join("nothing")) == []


def test_store_digest_changes_with_content_and_not_otherwise(store: ArtifactStore, model_dir: Path) -> None:
    uri = store.put(model_dir, store.join("data", "corpus"))
    first = store.digest(uri)
    assert len(first) == 64 and store.digest(uri) == first
    file_digest = store.digest(f"{uri}/config.json")
    assert file_digest != first and len(file_digest) == 64
    store.write_text(f"{uri}/config.json", '{"a": 2}')  # same size, other bytes
    assert store.digest(uri) != first and store.digest(f"{uri}/config.json") != file_digest
    with pytest.raises(InputNotFoundError):
        store.digest(store.join("data", "nothing-here"))


def test_json_and_text(store: ArtifactStore) -> None:
    uri = store.join("index", "nas", "k.json")
    store.write_json(uri, {"state": "running", "n": [1, 2]})
    assert store.read_json(uri) == {"state": "running", "n": [1, 2]}
    store.write_text(uri, "replaced")
    assert store.read_text(uri) == "replaced"


def test_missing_uri_raises_input_not_found(store: ArtifactStore) -> None:
    missing = store.join("run-1", "absent.json")
    assert not store.exists(missing)
    for call in (store.fetch, store.read_text, store.read_json):
        with pytest.raises(InputNotFoundError, match=f"{missing} does not exist"):
            call(missing)
    with pytest.raises(InputNotFoundError, match="nothing to put"):
        store.put("/no/such/local/file", store.join("x"))


def test_delete_removes_a_file_or_a_whole_prefix_only(store: ArtifactStore, model_dir: Path) -> None:
    for step in (1, 10):
        store.put(model_dir, store.join("ckpt", f"step-{step}"))
    store.delete(store.join("ckpt", "step-1"))
    assert not store.exists(store.join("ckpt", "step-1"))
    assert len(store.list(store.join("ckpt", "step-10"))) == 3  # step-1 is not a prefix of step-10 here
    store.delete(store.join("ckpt", "step-10", "config.json"))
    assert store.list(store.join("ckpt")) == [
        store.join("ckpt", "step-10", "model.safetensors"),
        store.join("ckpt", "step-10", "sub", "tokenizer.json"),
    ]
    store.delete(store.join("ckpt", "nothing"))  # nothing there: no-op


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A ``step-N`` directory that passes ``is_complete_checkpoint`` (random bytes, sizes in meta.json)."""
    import json

    path = root / f"step-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(500))
    (path / "state.pt").write_bytes(os.urandom(50))
    sizes = {"model.safetensors": 500, "state.pt": 50}
    (path / "meta.json").write_text(json.dumps({"step": step, "file_sizes": sizes}))
    return path


def test_checkpoint_uploader_keeps_the_newest_k_and_resume_takes_the_newest(
    store: ArtifactStore, tmp_path: Path
) -> None:
    from nemoforge.stages.training import checkpoint_uploader, fetch_latest_checkpoint, stored_steps

    checkpoints_uri = store.join("run-1", "cpt", "checkpoints")
    upload = checkpoint_uploader(store, checkpoints_uri, keep=2)
    store.put(_fake_checkpoint(tmp_path / "earlier", 12), f"{checkpoints_uri}/step-12")
    store.delete(f"{checkpoints_uri}/step-12/meta.json")  # an earlier attempt's half upload: not counted
    for step in (2, 4, 6, 8, 10):
        upload(_fake_checkpoint(tmp_path / "local", step))
    assert stored_steps(store, checkpoints_uri) == [8, 10, 12]
    assert fetch_latest_checkpoint(store, checkpoints_uri, tmp_path / "resumed") == 10

    checkpoint_uploader(store, checkpoints_uri, keep=1)(_fake_checkpoint(tmp_path / "later", 11))
    assert stored_steps(store, checkpoints_uri) == [11, 12]


def _flip_one_byte(store: ArtifactStore, uri: str) -> None:
    """Change one byte of the stored file ``uri`` in place, leaving its recorded sha256 as uploaded."""
    if isinstance(store, S3Store):
        import boto3

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        client = boto3.client("s3", endpoint_url=store.endpoint_url, region_name="us-east-1")
        obj = client.get_object(Bucket=bucket, Key=key)
        data = bytearray(obj["Body"].read())
        data[100] ^= 0x01
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata=obj["Metadata"])
    else:
        with open(uri, "r+b") as f:
            f.seek(100)
            byte = f.read(1)[0]
            f.seek(100)
            f.write(bytes([byte ^ 0x01]))


def test_a_flipped_byte_in_a_stored_model_is_refused_on_fetch(store: ArtifactStore, model_dir: Path) -> None:
    dir_uri = store.put(model_dir, store.join("run-1", "cpt", "model"))
    file_uri = f"{dir_uri}/model.safetensors"
    _flip_one_byte(store, file_uri)
    recorded = digest_path(model_dir / "model.safetensors")
    refusal = rf"{re.escape(file_uri)} does not verify against the sha256 recorded at upload \(recorded {recorded}, content [0-9a-f]{{64}}\)"
    for uri in (dir_uri, file_uri):
        with pytest.raises(StorageError, match=refusal) as err:
            store.fetch(uri)
        assert "\n" not in str(err.value)


def test_resume_refuses_a_checkpoint_changed_after_upload(store: ArtifactStore, tmp_path: Path) -> None:
    """The fetch in front of every stage's resume (stages.training.fetch_latest_checkpoint)."""
    from nemoforge.stages.training import fetch_latest_checkpoint

    step = _fake_checkpoint(tmp_path, 4)
    checkpoints_uri = store.join("run-1", "cpt", "checkpoints")
    store.put(step, f"{checkpoints_uri}/step-4")
    assert fetch_latest_checkpoint(store, checkpoints_uri, tmp_path / "ok") == 4

    _flip_one_byte(store, f"{checkpoints_uri}/step-4/model.safetensors")
    if isinstance(store, S3Store):
        import shutil

        shutil.rmtree(store.cache_dir)  # (a verified cached copy of the upload would be used instead)
    with pytest.raises(StorageError, match=f"{checkpoints_uri}/step-4/model.safetensors does not verify"):
        fetch_latest_checkpoint(store, checkpoints_uri, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()


def test_local_paths_pass_through_either_store(store: ArtifactStore, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text")
    assert store.exists(str(corpus))
    assert store.fetch(str(corpus)) == corpus
    assert store.read_text(str(corpus)) == "some text"


# ----------------------------------------------------------------------------------------------- local
def test_local_store_is_laid_out_like_the_bucket(tmp_path: Path, model_dir: Path) -> None:
    store = open_store(str(tmp_path / "artifacts"))
    store.check()
    uri = store.put(model_dir, store.join("run-1", "nas", "model"))
    assert Path(uri) == tmp_path / "artifacts" / "run-1" / "nas" / "model"
    assert store.fetch(uri) == Path(uri)  # no copy
    assert store.put(Path(uri), uri) == uri  # onto itself: verified, untouched
    assert digest_path(uri) == digest_path(model_dir)
    assert not list(Path(uri).rglob(".*partial*"))
    # each file's sha256 is recorded beside it (as S3 metadata is), out of listings and digests
    record = Path(uri) / ".model.safetensors.sha256"
    assert record.read_text().strip() == digest_path(model_dir / "model.safetensors")
    assert store.list(uri) == [f"{uri}/config.json", f"{uri}/model.safetensors", f"{uri}/sub/tokenizer.json"]
    assert store.digest(uri) == digest_path(model_dir)


def test_local_check_leaves_no_folder_it_made(tmp_path: Path) -> None:
    open_store(str(tmp_path / "work" / "artifacts")).check()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    open_store(str(tmp_path / "kept")).check()
    assert list((tmp_path / "kept").iterdir()) == []


def test_local_check_refuses_unwritable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="not a writable directory"):
        open_store(str(blocker / "artifacts")).check()


# -------------------------------------------------------------------------------------------------- S3
def test_s3_object_carries_sha256_and_fetch_reverifies(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    bucket = _new_bucket(s3_endpoint)
    store = S3Store(f"s3://{bucket}", endpoint_url=s3_endpoint, cache_dir=tmp_path / "cache")
    store.check()
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights" * 100)
    uri = store.put(src, store.join("m", "w.bin"))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    head = client.head_object(Bucket=bucket, Key="m/w.bin")
    assert head["Metadata"]["sha256"] == digest_path(src)
    assert store.fetch(uri) == tmp_path / "cache" / bucket / "m" / "w.bin"

    # a cached copy that no longer matches the object's sha256 is downloaded again
    (tmp_path / "cache" / bucket / "m" / "w.bin").write_bytes(b"tampered" * 100 + b"123456")
    assert store.fetch(uri).read_bytes() == src.read_bytes()

    # an object whose content does not match its sha256 metadata is refused
    client.put_object(Bucket=bucket, Key="m/bad.bin", Body=b"x" * 10, Metadata={"sha256": "0" * 64})
    with pytest.raises(StorageError, match="does not verify"):
        store.fetch(store.join("m", "bad.bin"))

    # a fetched directory mirrors the prefix (files of an older version are dropped)
    client.put_object(Bucket=bucket, Key="d/a.txt", Body=b"a")
    client.put_object(Bucket=bucket, Key="d/b.txt", Body=b"b")
    assert sorted(p.name for p in store.fetch(store.join("d")).iterdir()) == ["a.txt", "b.txt"]
    client.delete_object(Bucket=bucket, Key="d/b.txt")
    assert sorted(p.name for p in store.fetch(store.join("d")).iterdir()) == ["a.txt"]


def test_s3_large_file_goes_up_in_parts(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    bucket = _new_bucket(s3_endpoint)
    mib = 2**20
    store = S3Store(
        f"s3://{bucket}/p",
        endpoint_url=s3_endpoint,
        multipart_threshold_bytes=5 * mib,
        multipart_chunksize_bytes=5 * mib,  # S3's smallest part
        cache_dir=tmp_path / "cache",
    )
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * mib))
    uri = store.put(big, store.join("big.bin"))
    head = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").head_object(
        Bucket=bucket, Key="p/big.bin"
    )
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts: 5 + 5 + 1 MiB
    assert head["ContentLength"] == 11 * mib
    assert digest_path(store.fetch(uri)) == digest_path(big)


def test_s3_missing_bucket_is_named(s3_endpoint: str) -> None:
    store = S3Store("s3://no-such-bucket-nf/x", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError, match="bucket no-such-bucket-nf does not exist"):
        store.check()
    with pytest.raises(StorageError, match="bucket no-such-bucket-nf does not exist"):
        store.exists("s3://no-such-bucket-nf/x/a")


def test_s3_refused_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = open_store("s3://bucket/root", s3_endpoint_url=endpoint)
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {endpoint}.*storage.s3_endpoint_url"):
        store.check()
    with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {endpoint}"):
        store.read_text("s3://bucket/root/x.json")  # with retries: still seconds, not minutes
    assert time.monotonic() - started < 10


def test_local_store_reads_s3_uris_through_its_endpoint(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = _new_bucket(s3_endpoint)
    S3Store(f"s3://{bucket}", endpoint_url=s3_endpoint).write_text(f"s3://{bucket}/c/corpus.txt", "text")
    local = open_store(str(tmp_path / "artifacts"), s3_endpoint_url=s3_endpoint)
    assert local.exists(f"s3://{bucket}/c")
    assert local.read_text(f"s3://{bucket}/c/corpus.txt") == "text"


@pytest.mark.parametrize("mode", ["when_required", "when_supported"])
def test_s3_checksum_headers_follow_storage_s3_checksums(s3_endpoint: str, tmp_path: Path, mode: str) -> None:
    """The exact upload request: CRC checksum headers only when the recipe asks for them (boto3 >= 1.36 sends
    them by default, and some S3-compatible stores refuse them); the sha256 metadata and check either way."""
    from nemoforge.artifacts import store_for

    bucket = _new_bucket(s3_endpoint)
    recipe = Recipe(
        name="t", storage={"artifact_root": f"s3://{bucket}", "s3_endpoint_url": s3_endpoint, "s3_checksums": mode}
    )
    store = store_for(recipe)
    sent: list[dict[str, str]] = []

    def record(request, **_) -> None:
        sent.append({k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})

    store._client.meta.events.register("before-send.s3.PutObject", record)
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights" * 100)
    uri = store.put(src, store.join("m", "w.bin"))
    assert len(sent) == 1
    crc = sorted(k.lower() for k in sent[0] if k.lower().startswith(("x-amz-checksum-", "x-amz-sdk-checksum")))
    assert crc == ([] if mode == "when_required" else ["x-amz-checksum-crc32", "x-amz-sdk-checksum-algorithm"])
    assert sent[0]["x-amz-meta-sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.fetch(uri).read_bytes() == src.read_bytes()
