"""Storage: local folder and a real S3 server (SeaweedFS) behind one interface."""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import uuid
from pathlib import Path

import pytest

from yokai_pipeline.config import StorageConfig
from yokai_pipeline.errors import BadInputError, ConfigError
from yokai_pipeline.storage import (
    LocalStorage,
    MissingObjectError,
    S3Storage,
    Storage,
    StorageError,
    check_key,
    open_storage,
    s3_etag,
    storage_from_config,
)

BAD_KEYS = ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a\x00b", "", "..", "a\\..\\b", "C:/x"]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    """The same tests against a local folder and a bucket prefix on SeaweedFS."""
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("shared_bucket")
    return server.storage(bucket, f"ws/{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def shared_bucket(seaweedfs) -> str:
    """One bucket for the module (creating one takes about a second); tests use own prefixes."""
    return seaweedfs.new_bucket()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip(store: Storage, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    info = store.put_file(src, "episodes/ep01/video.bin")
    assert info.size == 3000
    store.put_bytes("episodes/ep01/frames.jsonl", b'{"a": 1}\n')
    store.put_bytes("episodes/ep02/frames.jsonl", b"{}\n")
    store.put_bytes("summary.json", b"{}")

    assert store.get_bytes("episodes/ep01/frames.jsonl") == b'{"a": 1}\n'
    out = store.get_file("episodes/ep01/video.bin", tmp_path / "dl" / "video.bin")
    assert out.read_bytes() == src.read_bytes()
    assert store.exists("summary.json")
    assert not store.exists("nope.json")

    keys = [i.key for i in store.list("episodes/")]
    assert sorted(keys) == [
        "episodes/ep01/frames.jsonl",
        "episodes/ep01/video.bin",
        "episodes/ep02/frames.jsonl",
    ]
    # A prefix is a key prefix, not only a folder.
    assert sorted(i.key for i in store.list("episodes/ep0")) == sorted(keys)
    assert [i.key for i in store.list("episodes/ep02")] == ["episodes/ep02/frames.jsonl"]
    assert len(store.list()) == 4
    stat = store.stat("episodes/ep01/video.bin")
    assert stat.size == 3000 and stat.etag and stat.mtime > 0

    store.delete("summary.json")
    assert not store.exists("summary.json")
    with pytest.raises(MissingObjectError, match="summary.json"):
        store.get_bytes("summary.json")


def test_create_exclusive_one_winner(store: Storage):
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        results.append(store.create_exclusive("locks/ep01", f"{i}".encode()))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert store.create_exclusive("locks/ep01", b"late") is False


def test_sync_up_and_down_skip_unchanged(store: Storage, tmp_path):
    src = tmp_path / "local_ws"
    (src / "episodes" / "ep01").mkdir(parents=True)
    (src / "episodes" / "ep01" / "frames.jsonl").write_text("{}\n")
    (src / "layered_frames").mkdir()
    (src / "layered_frames" / "a.png").write_bytes(os.urandom(1000))
    # Above the 5 MiB multipart threshold used below: the ETag comparison must handle multipart.
    (src / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    (src / ".tmp-partial").write_bytes(b"crash leftover")
    if isinstance(store, S3Storage):
        store.transfer_config.multipart_threshold = 5 * 1024 * 1024
        store.transfer_config.multipart_chunksize = 5 * 1024 * 1024

    first = store.sync_up(src, "mirror")
    assert sorted(first.transferred) == [
        "mirror/big.bin",
        "mirror/episodes/ep01/frames.jsonl",
        "mirror/layered_frames/a.png",
    ]
    if isinstance(store, S3Storage):
        assert store.stat("mirror/big.bin").etag.endswith("-2")  # really multipart
    again = store.sync_up(src, "mirror")
    assert again.transferred == [] and again.skipped == 3

    (src / "layered_frames" / "a.png").write_bytes(os.urandom(1000))  # same size, new content
    changed = store.sync_up(src, "mirror")
    assert changed.transferred == ["mirror/layered_frames/a.png"]

    dest = tmp_path / "copy"
    down = store.sync_down("mirror", dest)
    assert len(down.transferred) == 3
    expected = _tree(src)
    del expected[".tmp-partial"]
    assert _tree(dest) == expected
    assert store.sync_down("mirror", dest).skipped == 3


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_cannot_escape(store: Storage, key, tmp_path):
    with pytest.raises(BadInputError):
        store.put_bytes(key, b"x")
    with pytest.raises(BadInputError):
        store.get_bytes(key)
    if isinstance(store, LocalStorage):
        assert not (tmp_path / "escape.txt").exists()


def test_sync_down_rejects_escaping_names(tmp_path):
    with pytest.raises(BadInputError):
        LocalStorage(tmp_path / "s").sync_down("../", tmp_path / "out")


def test_local_symlink_cannot_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalStorage(tmp_path / "store")
    store.root.mkdir()
    (store.root / "link").symlink_to(outside)
    with pytest.raises(BadInputError, match="outside"):
        store.put_bytes("link/x.txt", b"x")
    assert not (outside / "x.txt").exists()


def test_check_key_normalises():
    assert check_key("a//b/./c") == "a/b/c"
    assert check_key("frames/", allow_empty=True) == "frames/"
    assert check_key("", allow_empty=True) == ""


def test_storage_from_config(tmp_path, monkeypatch):
    assert isinstance(storage_from_config(StorageConfig(), tmp_path), LocalStorage)
    with pytest.raises(ConfigError, match="bucket"):
        storage_from_config(StorageConfig(kind="s3"), tmp_path)
    cfg = StorageConfig(kind="s3", bucket="yokai", prefix="shows/one", endpoint_url="http://127.0.0.1:1")
    s3 = storage_from_config(cfg, tmp_path)
    assert isinstance(s3, S3Storage) and s3.url("x/y.json") == "s3://yokai/shows/one/x/y.json"
    other = storage_from_config(cfg, "s3://other/ws2")
    assert other.url("a") == "s3://other/ws2/a"
    assert isinstance(open_storage("s3://b/p"), S3Storage)
    assert isinstance(open_storage(tmp_path), LocalStorage)


def test_s3_etag_matches_server(s3_server, tmp_path):
    store = s3_server.storage(s3_server.new_bucket(), multipart_threshold_mb=5, multipart_chunksize_mb=5)
    for name, size in [("small.bin", 1234), ("multi.bin", 11 * 1024 * 1024)]:
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        info = store.put_file(path, name)
        assert info.etag == s3_etag(
            path, multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024
        )
        assert len(info.sha256 or "") == 64


def _all_text(exc: BaseException, caplog) -> str:
    return "\n".join(
        ["".join(traceback.format_exception(exc)), repr(exc), str(exc)]
        + [r.getMessage() for r in caplog.records]
    )


def test_wrong_credentials_clear_error_without_secrets(s3_server, caplog, tmp_path):
    bucket = s3_server.new_bucket()
    wrong_secret = "WrongSecret-" + os.urandom(8).hex()
    store = S3Storage(
        bucket,
        "ws",
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key,
        secret_access_key=wrong_secret,
        retry_base_seconds=0.05,
    )
    assert wrong_secret not in repr(store) and s3_server.access_key not in repr(store)
    caplog.set_level(logging.DEBUG, logger="yokai_pipeline")
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        store.list("")
    assert time.monotonic() - start < 10  # a rejected signature is not retried for long
    message = str(err.value)
    assert f"s3://{bucket}/" in message
    assert "SignatureDoesNotMatch" in message and "credentials" in message
    text = _all_text(err.value, caplog)
    for secret in (wrong_secret, s3_server.secret_key, s3_server.access_key):
        assert secret not in text

    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 10)
    with pytest.raises(StorageError) as err2:
        store.put_file(src, "f.bin")
    assert wrong_secret not in _all_text(err2.value, caplog)


@pytest.mark.slow
def test_server_dies_during_upload_then_rerun_completes(s3_server, caplog, tmp_path):
    bucket = s3_server.new_bucket()
    store = s3_server.storage(
        bucket,
        "inbox",
        multipart_threshold_mb=5,
        multipart_chunksize_mb=5,
        max_concurrency=1,
        max_attempts=3,
        retry_base_seconds=0.2,
        botocore_attempts=2,
        connect_timeout=2,
        read_timeout=5,
    )
    src = tmp_path / "episode.mkv"
    src.write_bytes(os.urandom(21 * 1024 * 1024))  # 5 parts
    sent = 0

    def kill_after_first_part(n: int) -> None:
        nonlocal sent
        sent += n
        if sent >= 6 * 1024 * 1024 and s3_server.running:
            s3_server.kill()

    caplog.set_level(logging.WARNING, logger="yokai_pipeline.storage")
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        store.put_file(src, "ep01.mkv", progress=kill_after_first_part)
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert f"s3://{bucket}/inbox/ep01.mkv" in message and "after 3 attempts" in message
    assert s3_server.secret_key not in _all_text(err.value, caplog)
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2  # backoff 0.2 s then 0.4 s
    assert elapsed >= 0.5

    s3_server.start()
    assert store.list("") == []  # no partial object became visible
    assert not store.exists("ep01.mkv")
    info = store.put_file(src, "ep01.mkv")
    assert info.size == src.stat().st_size
    assert store.get_file("ep01.mkv", tmp_path / "back.mkv").read_bytes() == src.read_bytes()


def test_credentials_from_block_values_or_environment(s3_server, shared_bucket, monkeypatch):
    from pydantic import SecretStr

    block_like = {
        "aws_access_key_id": s3_server.access_key,
        "aws_secret_access_key": SecretStr(
            s3_server.secret_key
        ),  # as a Prefect AwsCredentials block holds it
        "region_name": "us-east-1",
    }
    from_block = S3Storage(
        shared_bucket, "creds", endpoint_url=s3_server.endpoint_url, credentials=block_like
    )
    from_block.put_bytes("a.txt", b"a")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    from_env = S3Storage(shared_bucket, "creds", endpoint_url=s3_server.endpoint_url)
    assert from_env.get_bytes("a.txt") == b"a"
    assert s3_server.secret_key not in repr(from_env) + repr(from_block)
