"""The S3 workspace mirror against the real S3 server (SeaweedFS): pull, publish, order, refusals."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from yokai_pipeline import remote
from yokai_pipeline.config import StorageConfig
from yokai_pipeline.errors import ConfigError
from yokai_pipeline.workspace import Workspace


@pytest.fixture(scope="module")
def bucket(seaweedfs) -> str:
    return seaweedfs.new_bucket("ws")


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The server's keys in the environment (boto3's default chain), and a scratch folder of its own."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("YOKAI_SCRATCH", str(tmp_path / "scratch-a"))
    return StorageConfig(endpoint_url=s3_server.endpoint_url, region=s3_server.region, max_attempts=1)


def _other_machine(monkeypatch, tmp_path, name: str = "scratch-b") -> None:
    """A second worker host: the same workspace URL, another empty scratch folder."""
    monkeypatch.setenv("YOKAI_SCRATCH", str(tmp_path / name))


def test_s3_workspace_root_is_a_scratch_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("YOKAI_SCRATCH", str(tmp_path / "scr"))
    for given in ("s3://yokai/shows/one", "s3://yokai/shows/one/", "s3:/yokai/shows/one"):
        ws = Workspace(given)
        assert ws.remote == "s3://yokai/shows/one" and ws.location == ws.remote
        assert ws.root == (tmp_path / "scr" / "yokai" / "shows" / "one").resolve()
    assert not (tmp_path / "scr").exists(), "constructing a Workspace writes nothing"
    with pytest.raises(ConfigError, match=r"s3://bucket/prefix"):
        Workspace("s3://yokai/a/../b")
    assert Workspace(tmp_path).remote is None


def test_local_workspace_sync_is_a_no_op(tmp_path):
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1)  # would fail if contacted
    with remote.synced(tmp_path / "ws", cfg) as ws:
        assert ws.root == (tmp_path / "ws").resolve() and ws.remote is None
    assert not (tmp_path / "ws").exists()


def test_publish_then_pull_on_another_machine(s3_env, s3_server, bucket, monkeypatch, tmp_path):
    url = f"s3://{bucket}/{uuid.uuid4().hex[:8]}"
    with remote.synced(url, s3_env, remote.episode_prefixes("ep01")) as ws:
        (ws.episode_dir("ep01") / "frames").mkdir(parents=True)
        (ws.episode_dir("ep01") / "frames" / "a.png").write_bytes(b"png-a")
        (ws.episode_dir("ep01") / ".tmp-123-x.png").write_bytes(b"half written")
        ws.frames_manifest("ep01").write_text('{"path": "episodes/ep01/frames/a.png"}\n')
        (ws.root / ".locks").mkdir(exist_ok=True)
        (ws.root / ".locks" / "x.lock").write_text("")
        (ws.root / "selection.json").write_text("{}")  # outside the episode's prefixes
    keys = {i.key for i in s3_server.storage(bucket, url.split("/", 3)[3]).list()}
    assert keys == {"episodes/ep01/frames/a.png", "episodes/ep01/frames.jsonl"}, keys

    _other_machine(monkeypatch, tmp_path)
    with remote.synced(url, s3_env, ["episodes/"]) as ws_b:
        assert ws_b.root != ws.root
        assert ws_b.frames_manifest("ep01").read_text() == ws.frames_manifest("ep01").read_text()
        assert (ws_b.episode_dir("ep01") / "frames" / "a.png").read_bytes() == b"png-a"
        assert not (ws_b.root / "selection.json").exists()


def test_manifests_go_up_last_and_removed_files_after_them(s3_env, bucket, monkeypatch):
    url = f"s3://{bucket}/{uuid.uuid4().hex[:8]}"
    mirror = remote.open_mirror(url, s3_env)
    root = mirror.ws.root
    for name in ("b.png", "c.png", "old.png"):
        (root / "layers").mkdir(exist_ok=True)
        (root / "layers" / name).write_bytes(name.encode())
    (root / "layers.jsonl").write_text("v1\n")
    mirror.publish([""])
    (root / "layers" / "old.png").unlink()  # the stage re-ran and no longer makes it
    (root / "layers" / "c.png").write_bytes(b"c, second version")
    (root / "layers.jsonl").write_text("v2\n")

    calls: list[tuple[str, str]] = []
    put, delete = mirror._upload, mirror.store.delete
    monkeypatch.setattr(mirror, "_upload", lambda k, p: calls.append(("put", k)) or put(k, p))
    monkeypatch.setattr(mirror.store, "delete", lambda k: calls.append(("delete", k)) or delete(k))
    sent = mirror.publish([""])
    # b.png is unchanged: not sent again; the manifest after the data, the removal after the manifest
    assert calls == [("put", "layers/c.png"), ("put", "layers.jsonl"), ("delete", "layers/old.png")]
    assert sent.skipped == 1
    assert mirror.store.get_bytes("layers.jsonl") == b"v2\n"


def test_pull_skips_what_it_holds_and_follows_remote_changes(s3_env, bucket, monkeypatch, tmp_path):
    url = f"s3://{bucket}/{uuid.uuid4().hex[:8]}"
    a = remote.open_mirror(url, s3_env)
    (a.ws.root / "x").mkdir()
    for i in range(3):
        (a.ws.root / "x" / f"{i}.bin").write_bytes(bytes([i]) * 100)
    a.publish([""])

    _other_machine(monkeypatch, tmp_path)
    b = remote.open_mirror(url, s3_env)
    assert len(b.pull([""]).transferred) == 3
    again = b.pull([""])
    assert again.transferred == [] and again.skipped == 3

    (a.ws.root / "x" / "0.bin").unlink()
    (a.ws.root / "x" / "1.bin").write_bytes(b"new")
    a.publish([""])
    assert b.pull([""]).transferred == ["x/1.bin"]
    assert not (b.ws.root / "x" / "0.bin").exists(), "removed remotely -> removed from the mirror"
    assert (b.ws.root / "x" / "1.bin").read_bytes() == b"new"


def test_nested_flow_in_process_does_not_pull_again(s3_env, bucket, monkeypatch):
    url = f"s3://{bucket}/{uuid.uuid4().hex[:8]}"
    pulls: list[list[str]] = []
    real = remote.Mirror.pull
    monkeypatch.setattr(remote.Mirror, "pull", lambda self, p: pulls.append(list(p)) or real(self, p))
    with remote.synced(url, s3_env) as ws:
        with remote.synced(url, s3_env, remote.episode_prefixes("ep01")):
            ws.frames_manifest("ep01").parent.mkdir(parents=True)
            ws.frames_manifest("ep01").write_text("{}\n")
        # the inner block published on exit, before the outer one ends
        assert remote.open_mirror(url, s3_env).store.exists("episodes/ep01/frames.jsonl")
    assert pulls == [[""]]


def test_missing_bucket_is_refused_naming_the_workspace(s3_env):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/ws"
    with pytest.raises(ConfigError) as err:
        with remote.synced(url, s3_env):
            pytest.fail("the block must not run")
    assert url in str(err.value) and "does not exist" in str(err.value)


def test_unreachable_endpoint_is_refused_naming_the_workspace(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-example")
    monkeypatch.setenv("YOKAI_SCRATCH", str(tmp_path / "scr"))
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        remote.open_mirror("s3://yokai/ws", cfg)
    message = str(err.value)
    assert "s3://yokai/ws" in message and f"127.0.0.1:{port}" in message, message
    assert time.monotonic() - t0 < 30


def test_yokai_run_refuses_a_missing_bucket_at_start(s3_env, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from yokai_pipeline.cli import app

    (tmp_path / "episodes").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nendpoint_url = "{s3_env.endpoint_url}"\nmax_attempts = 1\n')
    url = f"s3://missing-{uuid.uuid4().hex[:8]}/ws"
    res = CliRunner().invoke(
        app, ["run", str(tmp_path / "episodes"), "--workspace", url, "--config", str(cfg)]
    )
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert url in text and "does not exist" in text
    assert not (tmp_path / "scratch-a").exists()


def test_episode_prefixes_cover_its_outputs_and_no_other_episode():
    parts = remote.episode_prefixes("ep01")
    # the layout layering.py and frames.py document
    for key in (
        "episodes/ep01/frames/ep01_f000001.png",
        "episodes/ep01/frames.jsonl",
        "layered_frames/character/ep01/ep01_f000001_i00.png",
        "layered_frames/background/ep01/ep01_f000001.png",
        "layered_frames/masks/ep01/ep01_f000001.png",
        "layered_frames/instances/ep01/ep01_f000001.png",
        "layered_frames/episode_manifests/ep01.jsonl",
        "layered_frames/manifests/ep01.jsonl",
    ):
        assert any(key.startswith(p) for p in parts), key
    for key in ("episodes/ep010/frames.jsonl", "layered_frames/manifests/ep010.jsonl", "selection.json"):
        assert not any(key.startswith(p) for p in parts), key
