"""Is a local-path workspace the same folder for the flow run that hands work over and the worker that takes it?

With ``orchestration.distributed`` on, a parent flow run starts its heavy steps as deployment
runs, maybe on another host. An ``s3://`` workspace is shared by construction; a local path is
shared only when every worker mounts the same folder there (NFS, EFS, Lustre). Otherwise the
worker would write its outputs into a folder nobody else reads, and the parent would fail later
with missing files, or silently build from an empty folder.

The check: just before submitting a run, the parent writes a token file (a random id and its host
name) into the workspace, ``.yokai-share/<id>.json``, and passes ``<id>@<host>`` along; the child
looks for that file first thing and fails at once, naming the workspace, both hosts and the fix,
when it is not there. The parent removes the token when the child returns.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from yokai_pipeline import fsio
from yokai_pipeline.errors import ConfigError
from yokai_pipeline.summary import utc_now
from yokai_pipeline.workspace import Workspace

SHARE_DIR = ".yokai-share"
#: How long a child waits for the token to appear: a shared file system's attribute cache may
#: show a file created on another client a moment late (NFS close-to-open is per file, not per name).
VISIBLE_WITHIN_SECONDS = 3.0
#: Tokens of a parent killed before it removed them are swept after this long.
STALE_SECONDS = 24 * 3600


class WorkspaceNotShared(ConfigError):
    """The worker sees another folder at the workspace path than the flow run that started it."""


def _token_path(ws: Workspace, token_id: str) -> Path:
    return ws.root / SHARE_DIR / f"{token_id}.json"


def write_token(workspace: str | Path | Workspace) -> str | None:
    """Write a token into a local workspace; the string to hand to the child (None for ``s3://``).

    Args:
        workspace: the run workspace.

    Returns:
        ``<id>@<host>``, or None for an S3 workspace (nothing to check: every worker reaches it).
    """
    ws = Workspace.of(workspace)
    if ws.remote is not None:
        return None
    _sweep_stale(ws.root / SHARE_DIR)
    token_id, host = uuid.uuid4().hex, socket.gethostname()
    record = {
        "id": token_id,
        "host": host,
        "pid": os.getpid(),
        "workspace": str(ws.root),
        "created": utc_now(),
    }
    fsio.atomic_write_json(_token_path(ws, token_id), record)
    return f"{token_id}@{host}"


def remove_token(workspace: str | Path | Workspace, token: str | None) -> None:
    """Remove a token :func:`write_token` wrote (nothing for None)."""
    if token is None:
        return
    ws = Workspace.of(workspace)
    _token_path(ws, token.partition("@")[0]).unlink(missing_ok=True)


@contextlib.contextmanager
def shared_token(workspace: str | Path | Workspace) -> Iterator[str | None]:
    """A token for the duration of one handed-over run, removed afterwards (also on failure)."""
    token = write_token(workspace)
    try:
        yield token
    finally:
        remove_token(workspace, token)


def check_token(
    workspace: str | Path | Workspace, token: str | None, wait_seconds: float = VISIBLE_WITHIN_SECONDS
) -> None:
    """Fail unless this host sees the token the parent wrote into the workspace.

    Args:
        workspace: the run workspace as the child was given it.
        token: ``<id>@<host>`` from :func:`write_token`; None (run in-process, or by hand) passes.
        wait_seconds: how long to poll for the file before giving up.

    Raises:
        WorkspaceNotShared: the token file is absent, or holds another id (message: workspace,
            this host, the parent's host and the fix).
    """
    ws = Workspace.of(workspace)
    if token is None or ws.remote is not None:
        return
    token_id, _, parent_host = token.partition("@")
    path = _token_path(ws, token_id)
    deadline = time.monotonic() + wait_seconds
    while True:
        problem = _token_problem(path, token_id)
        if problem is None:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    here = socket.gethostname()
    raise WorkspaceNotShared(
        f"workspace {ws.root} is not shared between the flow run that started this one (host "
        f"{parent_host or '?'}) and this worker (host {here}): {problem}. Workers cannot share a "
        "local folder that each host has on its own disk: use an s3:// workspace, or mount the same "
        "folder (NFS, EFS, Lustre) at the same path on every worker"
    )


def _token_problem(path: Path, token_id: str) -> str | None:
    """Why ``path`` is not the parent's token, or None when it is."""
    try:
        record = fsio.read_json(path)
    except FileNotFoundError:
        return f"the token {path.name} the parent wrote into {path.parent} just before is not there"
    except (OSError, ValueError) as exc:
        return f"the token {path} cannot be read ({exc})"
    if not isinstance(record, dict) or record.get("id") != token_id:
        return f"the token {path} holds another id"
    return None


def _sweep_stale(folder: Path) -> None:
    """Remove tokens left by parents killed before they could remove their own."""
    if not folder.is_dir():
        return
    cutoff = time.time() - STALE_SECONDS
    for path in folder.glob("*.json"):
        with contextlib.suppress(OSError):  # another parent swept it first
            if path.stat().st_mtime < cutoff:
                path.unlink()
