"""The workspace and the episode inbox on local disk or on S3, behind one small interface.

:class:`LocalStorage` keeps objects as files under a root folder (atomic writes via
:mod:`yokai_pipeline.fsio`); :class:`S3Storage` keeps them in a bucket under a key prefix through
boto3, with s3transfer's managed multipart transfers. Both accept the same keys: relative
POSIX paths such as ``episodes/ep01/frames.jsonl``. A key can never leave the storage's root or
prefix (``..``, absolute paths and NUL are rejected).

S3 credentials come from the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN`` or any source of boto3's default chain) or are passed as values, e.g. read
from a Prefect ``AwsCredentials`` block by the flow. They never appear in error messages, logs
or reprs: every message built here is scrubbed of them.

Failures: transient ones (connection refused or reset, timeouts, 5xx, throttling) are retried,
first by botocore (``retries`` mode standard/adaptive) and then around the whole transfer with
exponential backoff; after the last attempt a :class:`StorageError` names the bucket, the key and
the cause. An interrupted S3 upload never leaves a partial object: S3 makes an object visible
only once its (multipart) upload completes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from yokai_pipeline import fsio
from yokai_pipeline.errors import BadInputError, ConfigError, YokaiError

if TYPE_CHECKING:
    from yokai_pipeline.config import StorageConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Metadata key under which uploads record the SHA-256 of their content (``x-amz-meta-sha256``).
SHA256_METADATA = "sha256"

_MB = 1024 * 1024


class StorageError(YokaiError):
    """A storage operation failed (after retries where the failure looked transient).

    The message names the location (``s3://bucket/key`` or the local path) and the cause, never
    credentials.
    """

    def __init__(self, message: str, *, url: str = "", transient: bool = False):
        super().__init__(message)
        self.url = url
        self.transient = transient


class MissingObjectError(StorageError):
    """The key does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object.

    Attributes:
        key: Key relative to the storage root/prefix.
        size: Size in bytes.
        mtime: Last modification, seconds since the epoch.
        etag: Change token. S3: the object's ETag without quotes (MD5 or multipart MD5-of-MD5s).
            Local: ``<size hex>-<mtime_ns hex>``, cheap to get; it changes when the file does.
        sha256: SHA-256 of the content when the store knows it without reading the data
            (S3 objects uploaded by :meth:`S3Storage.put_file` carry it in their metadata;
            only :meth:`stat` returns it), else None.
    """

    key: str
    size: int
    mtime: float
    etag: str
    sha256: str | None = None


@dataclass
class SyncResult:
    """What a sync moved: the keys transferred and how many were already up to date."""

    transferred: list[str] = field(default_factory=list)
    skipped: int = 0


@runtime_checkable
class Storage(Protocol):
    """The operations the pipeline needs from a workspace or inbox store."""

    def put_file(self, local: str | Path, key: str) -> ObjectInfo: ...
    def get_file(self, key: str, local: str | Path) -> Path: ...
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str = "") -> str: ...
    def create_exclusive(self, key: str, data: bytes) -> bool: ...
    def sync_up(self, local_dir: str | Path, prefix: str = "") -> SyncResult: ...
    def sync_down(self, prefix: str, local_dir: str | Path) -> SyncResult: ...


# --------------------------------------------------------------------------- keys


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Validate a storage key and return it in canonical form (POSIX, no ``.`` parts).

    Args:
        key: A relative POSIX path such as ``episodes/ep01/frames.jsonl``.
        allow_empty: Accept ``""`` (the root; used for list prefixes).

    Returns:
        The normalised key; a trailing ``/`` is kept (it matters for prefixes).

    Raises:
        BadInputError: The key is empty, absolute, contains ``..``, NUL, a backslash or a
            control character, i.e. it could escape the storage root or prefix.
    """
    if not isinstance(key, str):
        raise BadInputError(repr(key), "storage key must be a string")
    shown = repr(key)
    if key == "":
        if allow_empty:
            return ""
        raise BadInputError(shown, "empty storage key")
    if "\x00" in key or any(ord(c) < 32 for c in key):
        raise BadInputError(shown, "storage key contains NUL or a control character")
    if "\\" in key:
        raise BadInputError(shown, "storage key contains a backslash; use '/'")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise BadInputError(shown, "storage key must be relative, not absolute")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise BadInputError(shown, "storage key must not contain '..'")
    if not parts:
        if allow_empty:
            return ""
        raise BadInputError(shown, "empty storage key")
    norm = "/".join(parts)
    return norm + "/" if key.endswith("/") else norm


def join_key(*parts: str) -> str:
    """Join key parts with ``/`` (empty parts dropped) and validate the result."""
    joined = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return check_key(joined, allow_empty=True)


def _iter_local_files(local_dir: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and not path.name.startswith(fsio.TMP_PREFIX):
            yield path, path.relative_to(local_dir).as_posix()


# --------------------------------------------------------------------------- local


class LocalStorage:
    """Objects as files under ``root``; every write is atomic (temp file + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self.root)!r})"

    def path(self, key: str) -> Path:
        """Local path of ``key`` (validated to stay under the root)."""
        key = check_key(key)
        path = (self.root / key).resolve()
        # A symlink inside the root could still point outside it.
        if path != self.root and self.root not in path.parents:
            raise BadInputError(repr(key), f"storage key resolves outside {self.root}")
        return path

    def put_file(self, local: str | Path, key: str) -> ObjectInfo:
        dest = self.path(key)
        try:
            with fsio.atomic_path(dest) as tmp:
                shutil.copyfile(local, tmp)
        except OSError as exc:
            raise StorageError(f"copy {local} -> {dest} failed: {exc}", url=dest.as_uri()) from exc
        return self._info(key, dest)

    def get_file(self, key: str, local: str | Path) -> Path:
        src = self._existing(key)
        local = Path(local)
        try:
            with fsio.atomic_path(local) as tmp:
                shutil.copyfile(src, tmp)
        except OSError as exc:
            raise StorageError(f"copy {src} -> {local} failed: {exc}", url=src.as_uri()) from exc
        return local

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        dest = self.path(key)
        fsio.atomic_write_bytes(dest, data)
        return self._info(key, dest)

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        return self._info(key, self._existing(key))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        prefix = check_key(prefix, allow_empty=True)
        # Walk only the deepest folder the prefix names; the rest of the prefix filters names.
        base = prefix[: prefix.rfind("/") + 1]
        folder = self.root / base if base else self.root
        if not folder.is_dir():
            return []
        out = []
        for path, rel in _iter_local_files(folder):
            key = base + rel
            if key.startswith(prefix):
                out.append(self._info(key, path))
        return out

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def url(self, key: str = "") -> str:
        return (self.path(key) if key else self.root).as_uri()

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist; True if this call created it.

        ``O_CREAT | O_EXCL`` makes the check-and-create one atomic step, also between processes.
        """
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def sync_up(self, local_dir: str | Path, prefix: str = "") -> SyncResult:
        """Copy every file under ``local_dir`` to ``prefix``; unchanged files (same size and
        SHA-256) are skipped."""
        local_dir = Path(local_dir)
        result = SyncResult()
        for path, rel in _iter_local_files(local_dir):
            key = join_key(prefix, rel)
            dest = self.path(key)
            if dest.is_file() and _same_local_content(path, dest):
                result.skipped += 1
                continue
            self.put_file(path, key)
            result.transferred.append(key)
        return result

    def sync_down(self, prefix: str, local_dir: str | Path) -> SyncResult:
        """Copy every object under ``prefix`` into ``local_dir``; unchanged files are skipped."""
        prefix = check_key(prefix, allow_empty=True)
        local_dir = Path(local_dir)
        result = SyncResult()
        for info in self.list(prefix):
            rel = _strip_prefix(info.key, prefix)
            dest = local_dir / check_key(rel)
            src = self.root / info.key
            if dest.is_file() and _same_local_content(src, dest):
                result.skipped += 1
                continue
            self.get_file(info.key, dest)
            result.transferred.append(info.key)
        return result

    def _existing(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise MissingObjectError(f"{path}: no such object", url=path.as_uri())
        return path

    @staticmethod
    def _info(key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(
            key=check_key(key), size=st.st_size, mtime=st.st_mtime, etag=f"{st.st_size:x}-{st.st_mtime_ns:x}"
        )


def _same_local_content(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and fsio.file_sha256(a) == fsio.file_sha256(b)


def _strip_prefix(key: str, prefix: str) -> str:
    if not prefix:
        return key
    rel = key[len(prefix) :]
    return rel.lstrip("/")


# --------------------------------------------------------------------------- S3


def s3_etag(path: str | Path, *, multipart_threshold: int, multipart_chunksize: int) -> str:
    """The ETag S3 gives ``path`` when uploaded with the given s3transfer settings.

    Single-part uploads get the MD5 of the content; multipart ones the MD5 of the parts' MD5s
    followed by ``-<parts>``. Used by sync to skip unchanged files without downloading them.
    """
    from s3transfer.utils import ChunksizeAdjuster

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if size < multipart_threshold:
            md5 = hashlib.md5(usedforsecurity=False)
            for block in iter(lambda: fh.read(_MB), b""):
                md5.update(block)
            return md5.hexdigest()
        chunk = ChunksizeAdjuster().adjust_chunksize(multipart_chunksize, size)
        digests = []
        for part in iter(lambda: fh.read(chunk), b""):
            digests.append(hashlib.md5(part, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
}
_AUTH_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, getattr(e, "last_exception", None)])


def _client_error(exc: BaseException) -> Any:
    from botocore.exceptions import ClientError

    for e in _causes(exc):
        if isinstance(e, ClientError):
            return e
    return None


def _is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: connection trouble, timeouts, 5xx or throttling."""
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from botocore.exceptions import (
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    ce = _client_error(exc)
    if ce is not None:
        err = ce.response.get("Error", {})
        status = ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return err.get("Code") in _TRANSIENT_CODES or status >= 500
    transient = (
        BotoConnectionError,
        ReadTimeoutError,
        IncompleteReadError,
        ResponseStreamingError,
        ConnectionError,
        TimeoutError,
    )
    return any(isinstance(e, transient) for e in _causes(exc))


def _reveal(value: Any) -> str | None:
    """Plain string of a credential given as str or a pydantic ``SecretStr``."""
    if value is None:
        return None
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return str(value) or None


def _credential_values(credentials: Any) -> dict[str, str | None]:
    """Read AwsCredentials-style fields from a mapping or an object (e.g. a Prefect block)."""
    names = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region_name")
    out: dict[str, str | None] = {}
    for name in names:
        if isinstance(credentials, Mapping):
            value = credentials.get(name)
        else:
            value = getattr(credentials, name, None)
        out[name] = _reveal(value)
    return out


class _Secrets:
    """Holds the secret strings only to scrub them from messages; never shows them."""

    __slots__ = ("_values",)

    def __init__(self, *values: str | None):
        # Very short values would mangle every message; real keys are far longer.
        self._values = tuple(v for v in values if v and len(v) >= 4)

    def scrub(self, text: str) -> str:
        for v in self._values:
            text = text.replace(v, "***")
        return text

    def __repr__(self) -> str:
        return "<hidden>"


class S3Storage:
    """Objects in ``s3://bucket/prefix/`` on AWS or any S3-compatible server.

    Args:
        bucket: Bucket name.
        prefix: Key prefix all keys live under (validated like a key; may be empty).
        endpoint_url: S3 endpoint (None = AWS); path-style addressing is used when given.
        region: Region name (falls back to the credentials' region, then ``us-east-1``).
        access_key_id, secret_access_key, session_token: Explicit credentials (str or
            ``SecretStr``); None = boto3's default chain (``AWS_ACCESS_KEY_ID`` ... env vars).
        credentials: Alternatively a mapping or object with AwsCredentials-style fields
            (``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``,
            ``region_name``), e.g. a Prefect ``AwsCredentials`` block loaded by a flow.
        max_attempts: Attempts of our own retry loop around each operation.
        retry_base_seconds: First backoff delay; doubled each attempt (with jitter).
        retry_max_seconds: Cap of one backoff delay.
        retry_mode: botocore retry mode (``standard`` or ``adaptive``).
        botocore_attempts: botocore's own attempts per HTTP request.
        multipart_threshold_mb, multipart_chunksize_mb, max_concurrency: s3transfer settings.
        connect_timeout, read_timeout: Socket timeouts in seconds.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: Any = None,
        secret_access_key: Any = None,
        session_token: Any = None,
        credentials: Any = None,
        max_attempts: int = 4,
        retry_base_seconds: float = 1.0,
        retry_max_seconds: float = 30.0,
        retry_mode: str = "standard",
        botocore_attempts: int = 3,
        multipart_threshold_mb: int = 16,
        multipart_chunksize_mb: int = 16,
        max_concurrency: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ):
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - boto3 is a core dependency
            raise ImportError("S3 storage needs boto3: pip install boto3") from exc
        if not bucket:
            raise ConfigError("S3 storage needs a bucket name (storage.bucket)")
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/"), allow_empty=True)
        self.endpoint_url = endpoint_url
        self.max_attempts = max(1, max_attempts)
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        creds = _credential_values(credentials) if credentials is not None else {}
        key_id = _reveal(access_key_id) or creds.get("aws_access_key_id")
        secret = _reveal(secret_access_key) or creds.get("aws_secret_access_key")
        token = _reveal(session_token) or creds.get("aws_session_token")
        self.region = (
            region or creds.get("region_name") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        # Also scrub the environment's credentials: boto3 may have picked them up.
        self._secrets = _Secrets(
            key_id,
            secret,
            token,
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
            os.environ.get("AWS_SESSION_TOKEN"),
        )
        session = boto3.session.Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret, aws_session_token=token
        )
        config = Config(
            region_name=self.region,
            retries={"mode": retry_mode, "max_attempts": botocore_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold_mb * _MB,
            multipart_chunksize=multipart_chunksize_mb * _MB,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )
        self._conditional_writes: bool | None = None

    def __repr__(self) -> str:
        return (
            f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"
        )

    @property
    def client(self) -> Any:
        """The boto3 S3 client (for operations this interface does not cover)."""
        return self._client

    def full_key(self, key: str) -> str:
        """Bucket key of ``key`` (validated, under the prefix)."""
        return join_key(self.prefix, check_key(key))

    def url(self, key: str = "") -> str:
        full = self.full_key(key) if key else self.prefix
        return f"s3://{self.bucket}/{full}"

    # -- retries and errors

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        delay = self.retry_base_seconds
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except Exception as exc:
                transient = _is_transient(exc)
                if not transient or attempt == self.max_attempts:
                    # from None: botocore's error can carry request headers echoed by the server
                    # (the access key id in Authorization); the message keeps its scrubbed text.
                    raise self._error(op, key, exc, attempt, transient) from None
                wait = min(delay, self.retry_max_seconds) * (1 + 0.25 * random.random())
                log.warning(
                    "S3 %s %s failed (attempt %d/%d): %s; retrying in %.1f s",
                    op,
                    self._url_of(key),
                    attempt,
                    self.max_attempts,
                    self._describe(exc),
                    wait,
                )
                time.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _url_of(self, key: str) -> str:
        return key if key.startswith("s3://") else f"s3://{self.bucket}/{key}"

    def _describe(self, exc: BaseException) -> str:
        ce = _client_error(exc)
        if ce is not None:
            err = ce.response.get("Error", {})
            status = ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            text = f"{err.get('Code', 'error')} (HTTP {status}): {err.get('Message', '')}".strip()
        else:
            text = f"{type(exc).__name__}: {exc}"
        return self._secrets.scrub(text)

    def _error(self, op: str, key: str, exc: BaseException, attempts: int, transient: bool) -> StorageError:
        from botocore.exceptions import NoCredentialsError

        url = self._url_of(key)
        cause = self._describe(exc)
        ce = _client_error(exc)
        code = ce.response.get("Error", {}).get("Code") if ce is not None else None
        if code in _MISSING_CODES:
            return MissingObjectError(f"S3 {op} {url}: no such object", url=url)
        if code == "NoSuchBucket":
            return StorageError(f"S3 {op} {url}: bucket {self.bucket!r} does not exist", url=url)
        if code in _AUTH_CODES or isinstance(exc, NoCredentialsError):
            hint = (
                "the credentials were rejected or lack permission; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or the credentials block"
            )
            return StorageError(f"S3 {op} {url} failed: {cause} ({hint})", url=url)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        endpoint = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return StorageError(f"S3 {op} {url}{endpoint} failed{tries}: {cause}", url=url, transient=transient)

    # -- operations

    def put_file(
        self, local: str | Path, key: str, *, progress: Callable[[int], None] | None = None
    ) -> ObjectInfo:
        """Upload a file (multipart above the threshold); the object appears only when complete.

        Args:
            local: Local file.
            key: Destination key.
            progress: Called with the number of bytes sent, as s3transfer reports them.
        """
        full = self.full_key(key)
        local = Path(local)
        if not local.is_file():
            raise BadInputError(local, "file to upload does not exist")
        extra = {"Metadata": {SHA256_METADATA: fsio.file_sha256(local)}}
        self._call(
            "upload",
            full,
            lambda: self._client.upload_file(
                str(local), self.bucket, full, ExtraArgs=extra, Callback=progress, Config=self.transfer_config
            ),
        )
        return self.stat(key)

    def get_file(self, key: str, local: str | Path) -> Path:
        full = self.full_key(key)
        local = Path(local)

        def download() -> None:
            with fsio.atomic_path(local) as tmp:
                self._client.download_file(self.bucket, full, str(tmp), Config=self.transfer_config)

        self._call("download", full, download)
        return local

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        full = self.full_key(key)
        meta = {SHA256_METADATA: hashlib.sha256(data).hexdigest()}
        self._call(
            "put",
            full,
            lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data, Metadata=meta),
        )
        return self.stat(key)

    def get_bytes(self, key: str) -> bytes:
        full = self.full_key(key)
        return self._call(
            "get", full, lambda: self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
        )

    def stat(self, key: str) -> ObjectInfo:
        full = self.full_key(key)
        head = self._call("head", full, lambda: self._client.head_object(Bucket=self.bucket, Key=full))
        return ObjectInfo(
            key=check_key(key),
            size=int(head["ContentLength"]),
            mtime=head["LastModified"].timestamp(),
            etag=head["ETag"].strip('"'),
            sha256=(head.get("Metadata") or {}).get(SHA256_METADATA),
        )

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except MissingObjectError:
            return False
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (complete objects only: S3 never lists an
        unfinished multipart upload)."""
        prefix = check_key(prefix, allow_empty=True)
        full_prefix = self.prefix + "/" if self.prefix else ""
        full_prefix += prefix

        def list_all() -> list[dict[str, Any]]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix
            )
            return [obj for page in pages for obj in page.get("Contents", [])]

        objects = self._call("list", full_prefix or "/", list_all)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for obj in objects:
            key = obj["Key"][strip:]
            if not key or key.endswith("/"):
                continue  # folder placeholder objects some tools create
            out.append(
                ObjectInfo(
                    key=key,
                    size=int(obj["Size"]),
                    mtime=obj["LastModified"].timestamp(),
                    etag=obj.get("ETag", "").strip('"'),
                )
            )
        return out

    def delete(self, key: str) -> None:
        full = self.full_key(key)
        self._call("delete", full, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if absent; True if this call created it.

        Uses a conditional write (``If-None-Match: *``), which the server checks atomically
        (AWS S3 and SeaweedFS do). A server without conditional writes gets a lock object with a
        unique token that is read back: the first writer whose token survives wins. That fallback
        narrows the race but cannot close it; prefer a server with conditional writes.
        """
        full = self.full_key(key)
        if self._conditional_writes is not False:
            try:
                self._call(
                    "put-if-absent",
                    full,
                    lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*"),
                )
                self._conditional_writes = True
                return True
            except StorageError as exc:
                ce = _client_error(exc)
                code = ce.response.get("Error", {}).get("Code") if ce is not None else None
                status = (
                    ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if ce is not None else None
                )
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    return False
                if code not in ("NotImplemented", "InvalidArgument") and status != 501:
                    raise
                log.warning(
                    "S3 server at %s ignores conditional writes; using lock + read-back", self.endpoint_url
                )
                self._conditional_writes = False
        if self.exists(key):
            return False
        token = os.urandom(16).hex().encode()
        self.put_bytes(key, token + b"\n" + data)
        return self.get_bytes(key).split(b"\n", 1)[0] == token

    def sync_up(self, local_dir: str | Path, prefix: str = "") -> SyncResult:
        """Upload every file under ``local_dir`` to ``prefix``; files whose size and ETag match
        the stored object are skipped (the local ETag is computed the way s3transfer uploads)."""
        local_dir = Path(local_dir)
        prefix = check_key(prefix, allow_empty=True)
        listed = {info.key: info for info in self.list(prefix)}
        result = SyncResult()
        for path, rel in _iter_local_files(local_dir):
            key = join_key(prefix, rel)
            remote = listed.get(key)
            if remote is not None and self._same_as_local(remote, path):
                result.skipped += 1
                continue
            self.put_file(path, key)
            result.transferred.append(key)
        return result

    def sync_down(self, prefix: str, local_dir: str | Path) -> SyncResult:
        """Download every object under ``prefix`` into ``local_dir`` (atomically per file);
        local files with the same size and ETag are skipped."""
        prefix = check_key(prefix, allow_empty=True)
        local_dir = Path(local_dir)
        result = SyncResult()
        for info in self.list(prefix):
            rel = check_key(_strip_prefix(info.key, prefix))
            dest = local_dir / rel
            if dest.is_file() and self._same_as_local(info, dest):
                result.skipped += 1
                continue
            self.get_file(info.key, dest)
            result.transferred.append(info.key)
        return result

    def _same_as_local(self, remote: ObjectInfo, path: Path) -> bool:
        if remote.size != path.stat().st_size:
            return False
        return remote.etag == s3_etag(
            path,
            multipart_threshold=self.transfer_config.multipart_threshold,
            multipart_chunksize=self.transfer_config.multipart_chunksize,
        )


# --------------------------------------------------------------------------- factories


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into (bucket, prefix)."""
    if not url.startswith("s3://"):
        raise ConfigError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"S3 URL without a bucket: {url!r}")
    return bucket, check_key(prefix.strip("/"), allow_empty=True)


def storage_from_config(cfg: StorageConfig, root: str | Path, *, credentials: Any = None) -> Storage:
    """Open the store ``cfg`` describes.

    Args:
        cfg: Storage settings. ``kind="local"``: ``root`` is the folder. ``kind="s3"``:
            bucket and prefix from ``cfg``, unless ``root`` is an ``s3://bucket/prefix`` URL,
            which then wins; endpoint, region and retry settings always come from ``cfg``.
        root: Local folder or ``s3://`` URL.
        credentials: AwsCredentials-style values (mapping or Prefect block) for S3; None =
            environment / boto3 default chain.

    Returns:
        A :class:`LocalStorage` or :class:`S3Storage`.
    """
    root_str = str(root)
    if root_str.startswith("s3://"):
        bucket, prefix = parse_s3_url(root_str)
    elif cfg.kind == "local":
        return LocalStorage(root)
    else:
        if not cfg.bucket:
            raise ConfigError("storage.kind is 's3' but storage.bucket is not set")
        bucket, prefix = cfg.bucket, cfg.prefix
    return S3Storage(
        bucket,
        prefix,
        endpoint_url=cfg.endpoint_url,
        region=cfg.region,
        credentials=credentials,
        max_attempts=cfg.max_attempts,
        retry_base_seconds=cfg.retry_base_seconds,
        multipart_chunksize_mb=cfg.multipart_chunksize_mb,
        multipart_threshold_mb=cfg.multipart_chunksize_mb,
    )


def open_storage(location: str | Path | Storage, cfg: StorageConfig | None = None, **kwargs: Any) -> Storage:
    """A Storage for a folder, an ``s3://`` URL or an existing Storage (returned as is)."""
    if isinstance(location, LocalStorage | S3Storage):
        return location
    if str(location).startswith("s3://"):
        from yokai_pipeline.config import StorageConfig

        return storage_from_config(cfg or StorageConfig(kind="s3"), str(location), **kwargs)
    return LocalStorage(location)
