"""Run a heavy (GPU) flow in-process, or as a deployment on the GPU work pool.

When ``config.orchestration.distributed`` is on, the child flow runs on a GPU worker through
``run_deployment`` and its persisted result is read back; otherwise it is called directly
as a subflow. Either way the caller gets the same dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect import Flow, get_run_logger
from prefect.deployments import run_deployment

from tasks.common import workspace_mirror
from yokai_pipeline import runtime
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.errors import YokaiError

GPU_LIMIT = "gpu"  # the global concurrency limit deployments/setup.py creates, one slot per GPU


@contextlib.contextmanager
def gpu_flow_lease(config: PipelineConfig, device: str, uses_gpu: bool = True) -> Iterator[runtime.Lease]:
    """The device a GPU flow run holds for its duration.

    Distributed, a real GPU also takes a slot of the cluster-wide ``gpu`` global concurrency
    limit (released when the run ends; its lease expires if the worker dies); on the host,
    the lease names a free device of that host.
    """
    requested = device if uses_gpu else "cpu"
    take_slot = (
        config.orchestration.distributed
        and requested != "cpu"
        and runtime.gpu_count() > 0
        and runtime.fake_gpus() is None
    )
    with contextlib.ExitStack() as stack:
        if take_slot:
            from prefect.concurrency.sync import concurrency

            stack.enter_context(concurrency(GPU_LIMIT, occupy=1, strict=False))
        timeout = config.orchestration.lease_timeout_seconds
        yield stack.enter_context(runtime.lease_device(requested, timeout=timeout))


def run_heavy(flow_fn: Flow, stage: str, parameters: dict[str, Any], config: PipelineConfig) -> Any:
    """Call ``flow_fn(**parameters)`` locally or as deployment ``<flow name>/<prefix>-<stage>``."""
    orch = config.orchestration
    if not orch.distributed:
        return flow_fn(**parameters)
    name = f"{flow_fn.name}/{orch.deployment_prefix}-{stage}"
    get_run_logger().info(f"running {name} as a deployment")
    # an S3 workspace: the worker (maybe another host) pulls what this run has written so far
    mirror = workspace_mirror(parameters["workspace"], config.storage)
    if mirror is not None:
        mirror.publish([""])
    run = run_deployment(name=name, parameters=parameters, timeout=orch.timeout_seconds)
    if run.state is None or not run.state.is_completed():
        msg = run.state.message if run.state else "no state"
        raise YokaiError(
            f"deployment {name} run {run.name} ended {run.state.name if run.state else '?'}: {msg}"
        )
    if mirror is not None:
        mirror.pull([""])  # and this run reads what the worker published
    return run.state.result()


def run_heavy_state(
    flow_fn: Flow, stage: str, parameters: dict[str, Any], config: PipelineConfig
) -> dict[str, Any]:
    """Like :func:`run_heavy`, but a failure is returned (``ok``/``result``/``error``), not raised."""
    try:
        return {"ok": True, "result": run_heavy(flow_fn, stage, parameters, config)}
    except Exception as exc:  # the child's own error, shown in the summary
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
