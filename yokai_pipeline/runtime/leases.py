"""Device leases: which GPU of this host a GPU task or flow run uses, for how long.

Every GPU stage (layering, embedding, captioning, training, checkpoint sampling) runs inside
:func:`lease_device`. A lease takes a free device of this host for its duration and gives it
back on exit. Each device is a lock file ``<lease dir>/gpu-<N>.lock`` held with
``fcntl.flock``: the kernel drops a dead process's flock, so a worker that crashes or is
killed with SIGKILL frees its device without any clean-up. Inside the lease, device
``auto`` resolves to the leased ``cuda:N`` (:func:`resolve_auto`), and :meth:`Lease.env` gives
``CUDA_VISIBLE_DEVICES`` for subprocesses (kohya).

Cluster-wide counting (the Prefect ``gpu`` global concurrency limit) is the orchestration's
part, in ``tasks/common.py``; this module never imports prefect.

The device count comes from torch, or from ``YOKAI_FAKE_GPUS=N`` (tests, CPU-only hosts
checking the mapping): fake devices are leased like real ones but compute stays on the CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from yokai_pipeline.errors import ConfigError, YokaiError

ENV_FAKE_GPUS = "YOKAI_FAKE_GPUS"
ENV_LEASE_DIR = "YOKAI_LEASE_DIR"
_POLL_SECONDS = 0.1

_current: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("yokai_lease", default=None)


def fake_gpus() -> int | None:
    """``YOKAI_FAKE_GPUS`` as a count, or None when unset."""
    value = os.environ.get(ENV_FAKE_GPUS, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{ENV_FAKE_GPUS}={value!r}: expected a whole number of devices") from None
    if n < 0:
        raise ConfigError(f"{ENV_FAKE_GPUS}={value!r}: the device count cannot be negative")
    return n


def gpu_count() -> int:
    """GPUs this process may use (``YOKAI_FAKE_GPUS`` if set; 0 without torch or CUDA)."""
    fake = fake_gpus()
    if fake is not None:
        return fake
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def lease_dir() -> Path:
    """Host-wide folder of the device lock files (``YOKAI_LEASE_DIR``, else the temp dir)."""
    folder = Path(os.environ.get(ENV_LEASE_DIR) or Path(tempfile.gettempdir()) / "yokai-gpu-leases")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # shared by every user of the host
        folder.chmod(0o1777)
    return folder


@dataclass
class Lease:
    """Devices held by one task or flow run.

    Attributes:
        indices: host GPU indices held (empty: the CPU).
        fake: the devices are ``YOKAI_FAKE_GPUS`` slots; compute runs on the CPU.
    """

    indices: tuple[int, ...] = ()
    fake: bool = False
    _fds: list[int] = field(default_factory=list, repr=False)

    @property
    def device(self) -> str:
        """torch device for in-process work: the first leased ``cuda:N``, else ``cpu``."""
        return f"cuda:{self.indices[0]}" if self.indices and not self.fake else "cpu"

    @property
    def label(self) -> str:
        """What the summary records: ``cuda:0``, ``cuda:0,1``, ``fake-gpu:1`` or ``cpu``."""
        if not self.indices:
            return "cpu"
        return ("fake-gpu:" if self.fake else "cuda:") + ",".join(map(str, self.indices))

    def resolve(self, requested: str) -> str:
        """The device a stage configured with ``requested`` runs on inside this lease."""
        return self.device if requested in ("auto", "cuda") else requested

    def holds(self, requested: str) -> bool:
        """Whether this lease already covers ``requested`` (``auto``, ``cuda`` or one of its ``cuda:N``)."""
        if requested in ("auto", "cuda"):
            return True
        return (
            requested.startswith("cuda:") and requested[5:].isdigit() and int(requested[5:]) in self.indices
        )

    @property
    def host_ids(self) -> list[str]:
        """The leased devices as this host names them (through a ``CUDA_VISIBLE_DEVICES`` already set)."""
        return [host_device_id(i) for i in self.indices]

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that must see only the leased devices."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.host_ids)}

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the file description drops its flock
        self._fds.clear()


def current_lease() -> Lease | None:
    """The lease held by the running task or flow (this context), if any."""
    return _current.get()


def resolve_auto(device: str | None, cuda_available: bool) -> str:
    """What a model loader should use for ``device``: ``auto`` -> the leased device.

    Outside a lease ``auto`` is ``cuda`` when available (GPU 0), else ``cpu``; explicit
    values pass through.
    """
    if device not in (None, "auto"):
        return str(device)
    lease = current_lease()
    if lease is not None:
        return lease.device
    return "cuda" if cuda_available else "cpu"


def host_device_id(index: int) -> str:
    """Host name of this process's GPU ``index``: entry ``index`` of ``CUDA_VISIBLE_DEVICES`` if set.

    Workers started with different ``CUDA_VISIBLE_DEVICES`` then lock the same file for the
    same physical GPU.
    """
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def _try_lock(index: int) -> int | None:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in host_device_id(index))
    path = lease_dir() / f"gpu-{safe}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # who holds it, for a person looking at the folder; the lock itself is the flock
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
    return fd


def _candidates(requested: str, n: int) -> list[int]:
    """Device indices a request may take: one named ``cuda:N``, or any of the host's."""
    if requested.startswith("cuda:"):
        try:
            index = int(requested.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"device={requested!r}: expected cuda:N") from None
        if index >= n:
            raise ConfigError(f"device={requested!r} but this host has {n} GPU(s)")
        return [index]
    return list(range(n))


def acquire(
    requested: str = "auto", count: int = 1, timeout: float | None = None, n_devices: int | None = None
) -> Lease:
    """Take ``count`` free devices of this host, waiting until they are free.

    Args:
        requested: ``auto``/``cuda`` (any free GPU, the CPU when there is none), ``cuda:N``
            (that GPU, waiting for it) or ``cpu`` (no device taken).
        count: devices to hold together (DDP training).
        timeout: give up after this many seconds (None: wait).
        n_devices: device count (default :func:`gpu_count`).

    Raises:
        ConfigError: more devices asked for than the host has, or a malformed device.
        YokaiError: no device became free within ``timeout``.
    """
    if requested == "cpu":
        return Lease()
    n = gpu_count() if n_devices is None else n_devices
    if n == 0:
        if requested.startswith("cuda"):
            raise ConfigError(f"device={requested!r} asked for but no CUDA GPU is visible; use cpu or auto")
        return Lease()
    pool = _candidates(requested, n)
    if count > len(pool):
        raise ConfigError(f"{count} GPUs asked for one run, but only {len(pool)} can be leased here")
    fake = fake_gpus() is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        held: list[tuple[int, int]] = []
        for index in pool:
            fd = _try_lock(index)
            if fd is not None:
                held.append((index, fd))
                if len(held) == count:
                    return Lease(tuple(i for i, _ in held), fake, [fd for _, fd in held])
        for _, fd in held:  # not enough at once: give back, so two DDP runs cannot deadlock
            os.close(fd)
        if deadline is not None and time.monotonic() >= deadline:
            raise YokaiError(f"no free GPU among {pool} within {timeout} s (leases in {lease_dir()})")
        time.sleep(_POLL_SECONDS)


@contextlib.contextmanager
def lease_device(
    requested: str = "auto", count: int = 1, timeout: float | None = None, n_devices: int | None = None
) -> Iterator[Lease]:
    """Hold a device lease for the ``with`` block; nested ``auto`` requests reuse it.

    Args: as :func:`acquire`.
    """
    outer = current_lease()
    if outer is not None and count <= max(1, len(outer.indices)) and outer.holds(requested):
        yield outer  # a task inside a GPU flow run uses the flow's device
        return
    lease = acquire(requested, count, timeout, n_devices)
    token = _current.set(lease)
    try:
        yield lease
    finally:
        _current.reset(token)
        lease.release()


def device_slots(per_run: int = 1) -> int:
    """How many GPU runs of ``per_run`` devices this host runs at once (1 on the CPU)."""
    return max(1, gpu_count() // max(1, per_run))


def stage_workers(uses_gpu: bool, items: int) -> int:
    """Tasks of one stage run at once on this host: one per GPU, or per CPU core for CPU backends."""
    limit = device_slots() if uses_gpu else max(1, os.cpu_count() or 1)
    return max(1, min(limit, items))
