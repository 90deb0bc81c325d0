"""An S3 workspace: a local scratch mirror that flows pull before they run and publish after.

Stages keep reading and writing local files (``Workspace.root`` is the mirror), so nothing in
them changes. What this module adds, for a workspace named ``s3://bucket/prefix``:

- **pull**: the objects under the given workspace prefixes that the mirror lacks or holds in
  another version are downloaded (atomically per file); objects deleted remotely since the last
  sync are deleted locally.
- **publish**: the mirror's new or changed files are uploaded, data first and the manifests
  (``.json`` / ``.jsonl``) last. A single S3 PUT is atomic and a manifest is a stage's commit
  point, so a reader never sees a manifest whose files are absent; files the stage removed are
  deleted remotely only after that.

A local index (``.yokai-sync/index.json``: key -> size, mtime_ns, ETag) records what was last
synced, so an unchanged file is neither hashed nor transferred again. Resume across machines is
then what it is locally: a stage whose published outputs were pulled finds them complete and
skips itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yokai_pipeline import fsio
from yokai_pipeline.config import StorageConfig
from yokai_pipeline.errors import ConfigError
from yokai_pipeline.storage import (
    SHA256_METADATA,
    ObjectInfo,
    S3Storage,
    StorageError,
    SyncResult,
    storage_from_config,
)
from yokai_pipeline.workspace import Workspace

log = logging.getLogger(__name__)

#: Workspace parts that stay on each machine: host-local locks, the sync index, Prefect's results.
LOCAL_ONLY = (".locks/", ".yokai-sync/", ".prefect/")
MANIFEST_SUFFIXES = (".json", ".jsonl")
UPLOAD_THREADS = 8
_index_locks: dict[Path, threading.Lock] = {}
_index_locks_guard = threading.Lock()
#: (remote URL, prefix) pairs an enclosing flow of this context has pulled already.
_pulled: contextvars.ContextVar[frozenset[tuple[str, str]]] = contextvars.ContextVar(
    "yokai_pulled", default=frozenset()
)


def _is_local_only(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return key.startswith(LOCAL_ONLY) or name.startswith(fsio.TMP_PREFIX)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


@dataclass
class Mirror:
    """The scratch mirror of one S3 workspace and the store behind it."""

    ws: Workspace
    store: S3Storage

    @property
    def index_path(self) -> Path:
        return self.ws.root / ".yokai-sync" / "index.json"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[Path]:
        with _index_locks_guard:
            lock = _index_locks.setdefault(self.index_path, threading.Lock())
        with lock, fsio.file_lock(self.ws.root / ".locks" / "sync-index.lock") as held:
            yield held

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            log.warning("%s: unreadable sync index; files will be compared by content", self.index_path)
            return {}

    def _save(self, updates: dict[str, dict[str, Any] | None]) -> None:
        """Merge this sync's entries into the index (other threads and processes may have added theirs)."""
        with self._lock():
            index = self._load()
            for key, entry in updates.items():
                if entry is None:
                    index.pop(key, None)
                else:
                    index[key] = entry
            fsio.atomic_write_json(self.index_path, index)

    def _local_files(self, prefix: str) -> dict[str, Path]:
        base = self.ws.root / prefix
        if prefix and not prefix.endswith("/"):
            paths = [base] if base.is_file() else []
        else:
            paths = [p for p in base.rglob("*") if p.is_file()] if base.is_dir() else []
        keys = {p.relative_to(self.ws.root).as_posix(): p for p in paths}
        return {k: p for k, p in keys.items() if not _is_local_only(k)}

    def _remote(self, prefix: str) -> dict[str, ObjectInfo]:
        return {i.key: i for i in self.store.list(prefix) if not _is_local_only(i.key)}

    def _in_sync(self, entry: dict[str, Any] | None, path: Path, info: ObjectInfo) -> bool:
        """Whether the local file is the remote object, without reading it when the index knows."""
        if entry is not None and entry["stamp"] == _stamp(path):
            return entry["etag"] == info.etag
        return self.store._same_as_local(info, path)

    def pull(self, prefixes: Iterable[str]) -> SyncResult:
        """Bring the mirror's ``prefixes`` (``""`` = everything) up to the published state."""
        index, result, updates = self._load(), SyncResult(), {}
        for prefix in prefixes:
            remote = self._remote(prefix)
            for key, info in remote.items():
                path = self.ws.root / key
                if path.is_file() and self._in_sync(index.get(key), path, info):
                    result.skipped += 1
                else:
                    self.store.get_file(key, path)
                    result.transferred.append(key)
                updates[key] = {"stamp": _stamp(path), "etag": info.etag}
            for key, path in self._local_files(prefix).items():
                entry = index.get(key)
                # synced earlier, unchanged here since, and gone remotely: another run removed it
                if key not in remote and entry is not None and entry["stamp"] == _stamp(path):
                    path.unlink(missing_ok=True)
                    updates[key] = None
        self._save(updates)
        return result

    def publish(self, prefixes: Iterable[str]) -> SyncResult:
        """Upload the mirror's new or changed files under ``prefixes``, the manifests last."""
        index, result, updates = self._load(), SyncResult(), {}
        todo: list[tuple[str, Path]] = []
        gone: list[str] = []
        for prefix in prefixes:
            remote, local = self._remote(prefix), self._local_files(prefix)
            for key, path in local.items():
                info = remote.get(key)
                if info is not None and self._in_sync(index.get(key), path, info):
                    result.skipped += 1
                    updates[key] = {"stamp": _stamp(path), "etag": info.etag}
                else:
                    todo.append((key, path))
            gone += [k for k in remote if k not in local and k in index]
        data = [t for t in todo if not t[0].endswith(MANIFEST_SUFFIXES)]
        manifests = [t for t in todo if t[0].endswith(MANIFEST_SUFFIXES)]
        try:
            with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                for key, entry in pool.map(lambda t: self._upload(*t), data):
                    updates[key] = entry
            for key, path in sorted(manifests):
                updates[key] = self._upload(key, path)[1]
            for key in gone:  # no published manifest names them any more
                self.store.delete(key)
                updates[key] = None
        finally:
            self._save(updates)  # what went up before a failure is not sent again
        result.transferred = [k for k, _ in data + sorted(manifests)]
        return result

    def _upload(self, key: str, path: Path) -> tuple[str, dict[str, Any]]:
        stamp = _stamp(path)
        if stamp[0] >= self.store.transfer_config.multipart_threshold:
            return key, {"stamp": stamp, "etag": self.store.put_file(path, key).etag}
        # most workspace files are small PNGs: one PUT whose response carries the ETag (put_file
        # adds a HEAD per file, which doubles the requests of a publish)
        data = path.read_bytes()
        full = self.store.full_key(key)
        meta = {SHA256_METADATA: hashlib.sha256(data).hexdigest()}
        response = self.store._call(
            "put",
            full,
            lambda: self.store.client.put_object(
                Bucket=self.store.bucket, Key=full, Body=data, Metadata=meta
            ),
        )
        return key, {"stamp": stamp, "etag": response["ETag"].strip('"')}


def open_mirror(workspace: str | Path | Workspace, cfg: StorageConfig, credentials: Any = None) -> Mirror:
    """The mirror of an ``s3://`` workspace, after checking the bucket can be reached.

    Args:
        workspace: the ``s3://bucket/prefix`` workspace.
        cfg: endpoint, region and retry settings (``storage``); bucket and prefix come from the URL.
        credentials: AwsCredentials-style values; None = the environment / boto3's default chain.

    Raises:
        ConfigError: not an S3 workspace, or its bucket is missing, unreachable or refuses the
            credentials (the message names the workspace and the cause).
    """
    ws = Workspace.of(workspace)
    if ws.remote is None:
        raise ConfigError(f"workspace {ws.location}: not an s3:// workspace")
    store = storage_from_config(cfg, ws.remote, credentials=credentials)
    assert isinstance(store, S3Storage)
    try:
        probe = store.full_key(".yokai-sync") if store.prefix else ".yokai-sync"
        store._call(
            "list",
            probe,
            lambda: store.client.list_objects_v2(Bucket=store.bucket, Prefix=probe, MaxKeys=1),
        )
    except StorageError as exc:
        raise ConfigError(f"workspace {ws.remote} cannot be used: {exc}") from None
    ws.root.mkdir(parents=True, exist_ok=True)
    return Mirror(ws, store)


@contextlib.contextmanager
def synced(
    workspace: str | Path, cfg: StorageConfig, prefixes: Iterable[str] = ("",), credentials: Any = None
) -> Iterator[Workspace]:
    """Pull ``prefixes`` of an S3 workspace before the block and publish them after it.

    A local workspace passes straight through (no I/O, no behaviour change). Inside a block
    that pulled a covering prefix already (a subflow run in-process), the pull is skipped: this
    process wrote everything newer. The publish runs even when the block fails, so the complete
    outputs of the stages that finished are kept for a re-run on any machine.
    """
    ws = Workspace(workspace)
    if ws.remote is None:
        yield ws
        return
    prefixes = list(prefixes)
    mirror = open_mirror(ws, cfg, credentials)
    done = _pulled.get()
    todo = [p for p in prefixes if not any(r == ws.remote and p.startswith(q) for r, q in done)]
    if todo:
        pulled = mirror.pull(todo)
        log.info("%s: pulled %d files (%d up to date)", ws.remote, len(pulled.transferred), pulled.skipped)
    token = _pulled.set(done | {(ws.remote, p) for p in prefixes})
    try:
        yield ws
    except BaseException:
        try:
            mirror.publish(prefixes)
        except Exception as exc:  # the block's own error is the one to report
            log.error("%s: publishing after a failure failed too: %s", ws.remote, exc)
        raise
    else:
        sent = mirror.publish(prefixes)
        log.info("%s: published %d files (%d unchanged)", ws.remote, len(sent.transferred), sent.skipped)
    finally:
        _pulled.reset(token)


def episode_prefixes(episode_id: str) -> list[str]:
    """The workspace parts one episode's frame extraction and layering write."""
    from yokai_pipeline import layering

    # the per-frame outputs as layering names them, so a new kind of output is synced too
    ws = Workspace(Path("/"))
    outputs = layering._paths(ws, {"episode_id": episode_id, "frame_index": 0})
    folders = {
        (p if k.endswith("_dir") else p.parent).relative_to(ws.root).as_posix() for k, p in outputs.items()
    }
    return [
        ws.rel(ws.episode_dir(episode_id)) + "/",
        *sorted(f + "/" for f in folders),
        ws.rel(ws.episode_layers_manifest(episode_id)),
        ws.rel(ws.layers_manifest(episode_id)),
    ]
