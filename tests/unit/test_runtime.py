"""Device leases with fake device counts: mapping, exclusivity, waits and release on kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from yokai_pipeline import runtime
from yokai_pipeline.errors import ConfigError, YokaiError


@pytest.fixture
def fake2(tmp_path, monkeypatch):
    """Two fake GPUs with a lease folder of this test only."""
    monkeypatch.setenv(runtime.ENV_FAKE_GPUS, "2")
    monkeypatch.setenv(runtime.ENV_LEASE_DIR, str(tmp_path / "leases"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path / "leases"


def test_leases_take_distinct_devices_then_wait(fake2):
    a = runtime.acquire()
    b = runtime.acquire()
    assert {a.indices, b.indices} == {(0,), (1,)}
    assert a.env()["CUDA_VISIBLE_DEVICES"] in ("0", "1") and a.env() != b.env()
    assert a.device == "cpu" and a.label.startswith("fake-gpu:")  # fake slots compute on the CPU
    with pytest.raises(YokaiError, match="no free GPU"):
        runtime.acquire(timeout=0.3)
    b.release()
    c = runtime.acquire(timeout=1)
    assert c.indices == b.indices
    a.release()
    c.release()


def test_cpu_request_and_no_gpu_take_no_lock(fake2, monkeypatch):
    assert runtime.acquire("cpu").indices == ()
    monkeypatch.setenv(runtime.ENV_FAKE_GPUS, "0")
    lease = runtime.acquire("auto")
    assert lease.indices == () and lease.device == "cpu" and lease.label == "cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        runtime.acquire("cuda:0")


def test_named_device_and_ddp_group(fake2):
    one = runtime.acquire("cuda:1")
    assert one.indices == (1,)
    with pytest.raises(YokaiError):
        runtime.acquire("cuda:1", timeout=0.2)
    with pytest.raises(YokaiError):  # a pair needs both devices free at once
        runtime.acquire(count=2, timeout=0.2)
    one.release()
    pair = runtime.acquire(count=2, timeout=1)
    assert pair.indices == (0, 1) and pair.env() == {"CUDA_VISIBLE_DEVICES": "0,1"}
    pair.release()
    with pytest.raises(ConfigError, match="only 2"):
        runtime.acquire(count=3)
    with pytest.raises(ConfigError, match="has 2 GPU"):
        runtime.acquire("cuda:5")


def test_nested_auto_reuses_the_outer_lease_and_auto_resolves_to_it(fake2, monkeypatch):
    monkeypatch.setenv(runtime.ENV_FAKE_GPUS, "1")
    with runtime.lease_device() as outer:
        with runtime.lease_device("auto") as inner:  # would deadlock on one device if not reused
            assert inner is outer
        with runtime.lease_device("cuda:0") as named:
            assert named is outer
        assert runtime.current_lease() is outer
        assert runtime.resolve_auto("auto", cuda_available=True) == outer.device
    assert runtime.current_lease() is None
    assert runtime.resolve_auto("auto", cuda_available=True) == "cuda"
    assert runtime.resolve_auto("cuda:3", cuda_available=False) == "cuda:3"


def test_host_ids_follow_an_existing_cuda_visible_devices(fake2, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    lease = runtime.acquire("cuda:1")
    assert lease.host_ids == ["6"] and lease.env() == {"CUDA_VISIBLE_DEVICES": "6"}
    assert (fake2 / "gpu-6.lock").exists()  # locked by the physical id, shared with other workers
    lease.release()


def test_threads_never_share_a_device(fake2):
    """8 jobs on 2 fake devices from 8 threads: never two holders of one device at once."""
    holders: dict[int, int] = {0: 0, 1: 0}
    worst = {0: 0, 1: 0}
    lock = threading.Lock()

    def job() -> None:
        with runtime.lease_device() as lease:
            (i,) = lease.indices
            with lock:
                holders[i] += 1
                worst[i] = max(worst[i], holders[i])
            time.sleep(0.05)
            with lock:
                holders[i] -= 1

    threads = [threading.Thread(target=job) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst == {0: 1, 1: 1}


def test_bad_fake_count_is_named(monkeypatch):
    monkeypatch.setenv(runtime.ENV_FAKE_GPUS, "two")
    with pytest.raises(ConfigError, match="YOKAI_FAKE_GPUS"):
        runtime.gpu_count()


def test_worker_killed_holding_a_lease_frees_it(fake2, tmp_path):
    """A process holding both devices is killed with SIGKILL: the kernel frees its flocks."""
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from yokai_pipeline import runtime
        lease = runtime.acquire(count=2)
        Path({str(ready)!r}).write_text(",".join(map(str, lease.indices)))
        time.sleep(120)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "lease holder died before taking its lease"
            assert time.monotonic() < deadline, "lease holder never took its lease"
            time.sleep(0.05)
        assert ready.read_text() == "0,1"
        with pytest.raises(YokaiError):  # held by the live worker
            runtime.acquire(timeout=0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        lease = runtime.acquire(count=2, timeout=5)
        assert lease.indices == (0, 1)
        lease.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
