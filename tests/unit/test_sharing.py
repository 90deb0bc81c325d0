"""The workspace-sharing check: a worker that sees another folder at the workspace path is refused."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from yokai_pipeline import sharing
from yokai_pipeline.workspace import Workspace


def test_the_same_folder_passes_and_the_token_is_removed_afterwards(tmp_path):
    with sharing.shared_token(tmp_path) as token:
        token_id, _, host = token.partition("@")
        assert host == socket.gethostname()
        record = json.loads((tmp_path / ".yokai-share" / f"{token_id}.json").read_text())
        assert record["id"] == token_id and record["host"] == host and record["pid"] == os.getpid()
        sharing.check_token(tmp_path, token, wait_seconds=0)
    assert list((tmp_path / ".yokai-share").iterdir()) == []


def test_a_worker_with_its_own_folder_at_that_path_is_refused_naming_path_hosts_and_fix(tmp_path):
    # host A's folder and host B's folder: the same workspace path, two different disks
    parent_side, worker_side = tmp_path / "a" / "ws", tmp_path / "b" / "ws"
    parent_side.mkdir(parents=True)
    worker_side.mkdir(parents=True)
    token = sharing.write_token(parent_side)
    t0 = time.monotonic()
    with pytest.raises(sharing.WorkspaceNotShared) as err:
        sharing.check_token(worker_side, token, wait_seconds=0.3)
    assert time.monotonic() - t0 < 2  # at once, not after a long timeout
    msg = str(err.value)
    assert str(worker_side) in msg
    assert f"host {socket.gethostname()}" in msg  # this worker's host
    assert f"host {token.partition('@')[2]}" in msg  # the parent's host
    assert "s3:// workspace" in msg and "mount the same folder" in msg and "every worker" in msg


def test_a_token_file_holding_another_id_is_refused(tmp_path):
    token = sharing.write_token(tmp_path)
    path = tmp_path / ".yokai-share" / f"{token.partition('@')[0]}.json"
    path.write_text(json.dumps({"id": "someone-else"}))
    with pytest.raises(sharing.WorkspaceNotShared, match="holds another id"):
        sharing.check_token(tmp_path, token, wait_seconds=0)


def test_a_token_that_shows_up_late_on_a_shared_mount_passes(tmp_path):
    # what an NFS client's attribute cache can do: the parent's file visible a moment later
    parent_side, worker_side = tmp_path / "parent", tmp_path / "worker"
    parent_side.mkdir()
    token = sharing.write_token(parent_side)

    def mount_later():
        time.sleep(0.4)
        parent_side.rename(worker_side)

    mover = threading.Thread(target=mount_later)
    mover.start()
    sharing.check_token(worker_side, token, wait_seconds=3)
    mover.join()


def test_s3_workspaces_and_in_process_runs_are_not_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("YOKAI_SCRATCH", str(tmp_path / "scratch"))
    ws = Workspace("s3://bucket/show")
    assert sharing.write_token(ws) is None
    assert not (tmp_path / "scratch").exists()  # nothing written into the mirror (it is not shared)
    sharing.check_token(ws, "0123@elsewhere", wait_seconds=0)  # shared by construction
    sharing.check_token(tmp_path, None, wait_seconds=0)  # no token: called in-process or by hand


def test_tokens_of_killed_parents_are_swept_fresh_ones_kept(tmp_path):
    old = sharing.write_token(tmp_path)
    live = sharing.write_token(tmp_path)
    old_path = tmp_path / ".yokai-share" / f"{old.partition('@')[0]}.json"
    stale = time.time() - sharing.STALE_SECONDS - 60
    os.utime(old_path, (stale, stale))
    sharing.write_token(tmp_path)
    assert not old_path.exists()
    sharing.check_token(tmp_path, live, wait_seconds=0)
