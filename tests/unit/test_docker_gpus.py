"""Docker GPU pool: every container sees the host's GPUs and takes one through a shared lease folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
JOB_VARIABLES = REPO / "deployments" / "docker" / "gpu-job-variables.yaml"


def _job_variables() -> dict:
    return yaml.safe_load(JOB_VARIABLES.read_text())["job_variables"]


def test_containers_request_all_gpus_and_share_the_lease_folder():
    import docker.types

    jv = _job_variables()
    (req,) = jv["container_create_kwargs"]["device_requests"]
    request = docker.types.DeviceRequest(**req)  # what prefect-docker hands to the Docker API
    # -1 is `--gpus all`; a positive count would give every container the same first GPUs
    assert request.count == -1 and request.driver == "nvidia" and request.capabilities == [["gpu"]]
    lease_dir = jv["env"]["YOKAI_LEASE_DIR"]
    mounts = dict(v.split(":", 1) for v in jv["volumes"])
    assert mounts.get(lease_dir) == lease_dir, "the lease folder must be the host's, bind-mounted"


_HOLD = """
import sys, time
from yokai_pipeline.runtime import lease_device
with lease_device("auto") as lease:
    print(lease.label, flush=True)
    sys.stdin.readline()
"""


def _containers(lease_dirs: list[Path]) -> list[str]:
    """Processes standing in for containers on one 2-GPU host (each with its own /tmp); the GPU each leased."""
    procs = []
    for folder in lease_dirs:
        env = {**os.environ, "YOKAI_FAKE_GPUS": "2", "YOKAI_LEASE_DIR": str(folder), "PYTHONPATH": str(REPO)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _HOLD],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        return [p.stdout.readline().strip() for p in procs]
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)


def test_containers_sharing_the_lease_folder_get_different_gpus(tmp_path):
    shared = tmp_path / "host-leases"
    assert sorted(_containers([shared, shared])) == ["fake-gpu:0", "fake-gpu:1"]
    # without the shared mount each container's own folder is free: both would take GPU 0
    assert _containers([tmp_path / "c1", tmp_path / "c2"]) == ["fake-gpu:0", "fake-gpu:0"]
