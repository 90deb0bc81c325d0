"""Find new episodes in an inbox (a folder or an S3 prefix) and make sure each is processed once.

An episode is identified by the SHA-256 of its content, not its name: the same video uploaded
again under another name is recognised and skipped. The workspace keeps the state:

```
WORKSPACE/ingest/registry.json        what scans have seen and what became of each episode
WORKSPACE/ingest/claims/<sha256>.json one per episode a run has taken (created exclusively)
WORKSPACE/ingest/done/<sha256>.json   one per episode whose run finished
```

The claim files are the authority on "never twice": :func:`claim_episode` creates one
atomically (``O_CREAT | O_EXCL`` locally, a conditional ``If-None-Match: *`` write on S3), so of
two overlapping ingest runs exactly one gets each episode. ``registry.json`` is a convenience
index (first-seen sizes for the stability check, hashes already computed, statuses); a lost
update to it (two runs writing at once on S3) only delays a file by one scan, it never lets an
episode through twice.

A file still being written is not taken: the first scan that sees a file records its size and
change token (mtime locally, ETag on S3); a later scan at least ``stable_seconds`` afterwards
takes it only if both are unchanged. S3 lists an object only once its upload has completed (an
unfinished multipart upload is invisible), and the same two-scan rule applies on top.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from yokai_pipeline import fsio
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.storage import LocalStorage, MissingObjectError, Storage, open_storage

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi")
REGISTRY_KEY = "ingest/registry.json"
CLAIMS_PREFIX = "ingest/claims/"
DONE_PREFIX = "ingest/done/"
_LOCK_KEY = "ingest/.registry.lock"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class NewEpisode:
    """An inbox video that is complete, not yet processed and not claimed.

    Attributes:
        key: Key of the video in the inbox.
        sha256: SHA-256 of its content (the episode's identity).
        size: Size in bytes.
        episode_id: Workspace episode id: the file stem through ``fsio.safe_name``, with
            ``_<sha[:8]>`` appended when another content already uses that id.
        source: URL of the video (``file://...`` or ``s3://bucket/key``).
        local_path: A local copy of the video when one exists (a local inbox file, or the
            download made to hash an S3 object), else None.
    """

    key: str
    sha256: str
    size: int
    episode_id: str
    source: str
    local_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _empty_registry() -> dict[str, Any]:
    return {"version": 1, "seen": {}, "episodes": {}}


def load_registry(workspace: str | Path | Storage) -> dict[str, Any]:
    """The ingest registry of a workspace (an empty one if none exists yet).

    Returns:
        ``{"version": 1, "seen": {url: {size, etag, first_seen, sha256}},
        "episodes": {sha256: {episode_id, status, source, size, updated}}}``; status is
        ``claimed``, ``done`` or ``released``.

    Raises:
        BadInputError: The registry exists but is not valid JSON.
    """
    ws = open_storage(workspace)
    try:
        data = ws.get_bytes(REGISTRY_KEY)
    except MissingObjectError:
        return _empty_registry()
    try:
        reg = json.loads(data)
    except json.JSONDecodeError as exc:
        raise BadInputError(ws.url(REGISTRY_KEY), f"ingest registry is not valid JSON: {exc.msg}") from exc
    if not isinstance(reg, dict):
        raise BadInputError(ws.url(REGISTRY_KEY), "ingest registry is not a JSON object")
    base = _empty_registry()
    base.update(reg)
    return base


@contextlib.contextmanager
def _registry_lock(ws: Storage) -> Iterator[None]:
    # Locally an flock serialises read-modify-write between processes on this machine; on S3
    # there is no cheap lock, and none is needed for correctness (see the module docstring).
    if not isinstance(ws, LocalStorage):
        yield
        return
    import fcntl

    path = ws.path(_LOCK_KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _update_registry(ws: Storage, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    with _registry_lock(ws):
        reg = load_registry(ws)
        change(reg)
        ws.put_bytes(REGISTRY_KEY, (json.dumps(reg, indent=2, sort_keys=True) + "\n").encode())
    return reg


def _claimed_hashes(ws: Storage) -> set[str]:
    out = set()
    for info in ws.list(CLAIMS_PREFIX):
        name = PurePosixPath(info.key).name
        if name.endswith(".json"):
            out.add(name[: -len(".json")])
    return out


def _is_video(key: str, extensions: tuple[str, ...]) -> bool:
    name = PurePosixPath(key).name
    # Hidden and temp names are partial copies by convention (rsync, browsers, fsio).
    if name.startswith(".") or name.endswith((".part", ".crdownload", ".tmp")):
        return False
    return PurePosixPath(name).suffix.lower() in extensions


def _hash_object(inbox: Storage, key: str, cache_dir: Path) -> tuple[str, str | None]:
    """SHA-256 of an inbox object, and the local file it was read from (if any)."""
    if isinstance(inbox, LocalStorage):
        path = inbox.path(key)
        return fsio.file_sha256(path), str(path)
    info = inbox.stat(key)
    if info.sha256 and _SHA_RE.match(info.sha256):
        # Uploaded by S3Storage.put_file, which records the hash it computed.
        return info.sha256, None
    # The ETag in the name: a replaced object of the same size must not reuse a stale download.
    name = fsio.safe_name(f"{inbox.url(key)}-{info.etag}", max_len=200)
    dest = cache_dir / f"{name}{PurePosixPath(key).suffix.lower()}"
    if not (dest.is_file() and dest.stat().st_size == info.size):
        inbox.get_file(key, dest)
    return fsio.file_sha256(dest), str(dest)


def _unique_episode_id(stem: str, sha: str, taken: dict[str, str]) -> str:
    base = fsio.safe_name(stem, fallback="episode")
    owner = taken.get(base)
    return base if owner in (None, sha) else f"{base}_{sha[:8]}"


def scan_inbox(
    inbox: str | Path | Storage,
    *,
    state: str | Path | Storage,
    stable_seconds: float = 60.0,
    cache_dir: str | Path | None = None,
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
    now: float | None = None,
) -> list[NewEpisode]:
    """List the inbox's complete, new videos; record what was seen for the next scan.

    Args:
        inbox: Folder, ``s3://bucket/prefix`` URL or a Storage holding the videos.
        state: The workspace (folder, URL or Storage) that keeps ``ingest/registry.json`` and
            the claims.
        stable_seconds: A video is taken only once a previous scan at least this long ago saw
            the same size and change token; 0 takes complete files on the first scan.
        cache_dir: Where S3 videos without a stored hash are downloaded to be hashed (default:
            ``<state>/ingest/cache`` for a local workspace, else ``$TMPDIR/yokai-ingest-cache``).
        extensions: Video file suffixes (lower case).
        now: Current time (seconds since the epoch); for tests.

    Returns:
        New episodes in key order, each content at most once. Nothing is claimed yet: call
        :func:`claim_episode` before processing one.
    """
    inbox_st = open_storage(inbox)
    ws = open_storage(state)
    now = time.time() if now is None else now
    if cache_dir is None:
        if isinstance(ws, LocalStorage):
            cache_dir = ws.root / "ingest" / "cache"
        else:
            import tempfile

            cache_dir = Path(tempfile.gettempdir()) / "yokai-ingest-cache"
    cache_dir = Path(cache_dir)

    registry = load_registry(ws)
    claimed = _claimed_hashes(ws)
    taken_ids = {
        rec.get("episode_id"): sha for sha, rec in registry["episodes"].items() if rec.get("episode_id")
    }
    seen_updates: dict[str, dict[str, Any]] = {}
    found: list[NewEpisode] = []
    picked: set[str] = set()

    for info in sorted(inbox_st.list(""), key=lambda i: i.key):
        if not _is_video(info.key, extensions):
            continue
        url = inbox_st.url(info.key)
        prev = registry["seen"].get(url)
        unchanged = prev is not None and prev.get("size") == info.size and prev.get("etag") == info.etag
        if not unchanged:
            prev = {"size": info.size, "etag": info.etag, "first_seen": now, "sha256": None}
            seen_updates[url] = prev
        if now - float(prev["first_seen"]) < stable_seconds:
            log.info("inbox %s: not stable yet (size %d), waiting for the next scan", url, info.size)
            continue
        sha = prev.get("sha256")
        local_path = None
        if not sha:
            try:
                sha, local_path = _hash_object(inbox_st, info.key, cache_dir)
            except (OSError, MissingObjectError) as exc:
                # Removed or renamed between list and read: the next scan sees the new state.
                log.warning("inbox %s: could not read it (%s); skipping this scan", url, exc)
                continue
            if isinstance(inbox_st, LocalStorage):
                after = inbox_st.stat(info.key)
                if (after.size, after.etag) != (info.size, info.etag):
                    log.info("inbox %s: changed while hashing, waiting for the next scan", url)
                    seen_updates[url] = {
                        "size": after.size,
                        "etag": after.etag,
                        "first_seen": now,
                        "sha256": None,
                    }
                    continue
            seen_updates[url] = {**prev, "sha256": sha}
        elif isinstance(inbox_st, LocalStorage):
            local_path = str(inbox_st.path(info.key))
        if sha in claimed:
            log.debug("inbox %s: episode %s already taken", url, sha[:12])
            continue
        if sha in picked:
            log.info("inbox %s: same content as another new video in this scan; skipped", url)
            continue
        episode_id = _unique_episode_id(PurePosixPath(info.key).stem, sha, taken_ids)
        taken_ids[episode_id] = sha
        picked.add(sha)
        found.append(NewEpisode(info.key, sha, info.size, episode_id, url, local_path))

    if seen_updates:
        _update_registry(ws, lambda reg: reg["seen"].update(seen_updates))
    return found


def fetch_episode(episode: NewEpisode, inbox: str | Path | Storage, dest_dir: str | Path) -> Path:
    """A local video file for ``episode`` whose stem is its ``episode_id``.

    The episode flow derives the episode id from the file name, so a video whose id got a
    hash suffix (another content already had the name) is linked or copied under that id.
    A local inbox file whose name already gives the id is returned as is.

    Args:
        episode: From :func:`scan_inbox`.
        inbox: The inbox it was found in.
        dest_dir: Folder for the linked/downloaded copy (e.g. ``<workspace>/ingest/videos``).

    Returns:
        Path of the local video.
    """
    import shutil

    inbox_st = open_storage(inbox)
    suffix = PurePosixPath(episode.key).suffix.lower()
    if (
        episode.local_path
        and fsio.safe_name(Path(episode.local_path).stem, fallback="episode") == episode.episode_id
    ):
        if isinstance(inbox_st, LocalStorage):
            return Path(episode.local_path)
    dest = Path(dest_dir) / f"{episode.episode_id}{suffix}"
    if dest.is_file() and dest.stat().st_size == episode.size:
        return dest
    if episode.local_path and Path(episode.local_path).is_file():
        with fsio.atomic_path(dest) as tmp:
            tmp.unlink()
            try:
                os.link(episode.local_path, tmp)
            except OSError:  # another filesystem
                shutil.copyfile(episode.local_path, tmp)
        return dest
    return inbox_st.get_file(episode.key, dest)


def _check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise BadInputError(repr(sha), "not a lowercase hex SHA-256")
    return sha


def _set_status(ws: Storage, sha: str, status: str, **fields: Any) -> None:
    def change(reg: dict[str, Any]) -> None:
        rec = reg["episodes"].setdefault(sha, {})
        rec.update({k: v for k, v in fields.items() if v is not None})
        rec["status"] = status
        rec["updated"] = time.time()

    _update_registry(ws, change)


def claim_episode(
    workspace: str | Path | Storage,
    sha: str,
    *,
    episode_id: str | None = None,
    source: str | None = None,
) -> bool:
    """Take an episode for processing; True for exactly one caller per content hash.

    Args:
        workspace: The workspace (folder, URL or Storage).
        sha: The episode's content hash (:attr:`NewEpisode.sha256`).
        episode_id: Recorded in the claim and the registry.
        source: Recorded in the claim and the registry.

    Returns:
        True if this call created the claim; False if any run (this one earlier, or an
        overlapping one) already holds or finished it.
    """
    ws = open_storage(workspace)
    _check_sha(sha)
    claim = {
        "sha256": sha,
        "episode_id": episode_id,
        "source": source,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "claimed_at": time.time(),
    }
    won = ws.create_exclusive(f"{CLAIMS_PREFIX}{sha}.json", json.dumps(claim, sort_keys=True).encode())
    if won:
        _set_status(ws, sha, "claimed", episode_id=episode_id, source=source)
    return won


def mark_done(workspace: str | Path | Storage, sha: str, episode_id: str) -> None:
    """Record that the episode's run finished (the claim stays, so it is never taken again)."""
    ws = open_storage(workspace)
    _check_sha(sha)
    record = {"sha256": sha, "episode_id": episode_id, "done_at": time.time()}
    ws.put_bytes(f"{DONE_PREFIX}{sha}.json", json.dumps(record, sort_keys=True).encode())
    _set_status(ws, sha, "done", episode_id=episode_id)


def release_claim(workspace: str | Path | Storage, sha: str) -> None:
    """Give a claimed episode back (its run failed), so the next scan offers it again."""
    ws = open_storage(workspace)
    _check_sha(sha)
    ws.delete(f"{CLAIMS_PREFIX}{sha}.json")
    _set_status(ws, sha, "released")


def is_done(workspace: str | Path | Storage, sha: str) -> bool:
    """Whether :func:`mark_done` was called for this content hash."""
    return open_storage(workspace).exists(f"{DONE_PREFIX}{_check_sha(sha)}.json")


__all__ = [
    "NewEpisode",
    "VIDEO_EXTENSIONS",
    "claim_episode",
    "fetch_episode",
    "is_done",
    "load_registry",
    "mark_done",
    "release_claim",
    "scan_inbox",
]
