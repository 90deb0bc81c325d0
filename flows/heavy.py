"""Run a heavy (GPU) flow in-process, or as a deployment on the GPU work pool.

When ``config.orchestration.distributed`` is on, the child flow runs on a GPU worker through
``run_deployment`` and its persisted result is read back; otherwise it is called as a
subflow from inside a task (:func:`run_subflow`). Either way the caller gets the same dict.

Why a task around every subflow call: Prefect 3 matches a subflow called straight from a
flow to the earlier attempt's child by call position, and on a retry of the parent hands back
that child's old state whatever the new parameters (``flow_engine.load_subflow_run``). A
subflow called from a task gets a fresh identity each time (``Task.create_run``), so a retry
runs every child again; what the child reuses is decided by its content-keyed tasks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect import Flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from tasks.common import SHARE_TOKEN, workspace_mirror
from yokai_pipeline import runtime, sharing
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


# No cache: the child runs on every call (and every retry); its own tasks are content-keyed.
@task(name="run-subflow", task_run_name="run-{stage}", cache_policy=NO_CACHE)
def subflow_task(flow_fn: Flow, stage: str, parameters: dict[str, Any]) -> Any:
    """One child flow run, shown in the UI under this task run."""
    with own_transactions():
        return flow_fn(**parameters)


@contextlib.contextmanager
def own_transactions() -> Iterator[None]:
    """Let the tasks of a child flow commit their cache records as each finishes.

    A task called while another task runs joins that task's transaction, whose failure rolls
    the whole nest back: without this, the chunks an episode finished before one failed would
    not be cached, and a retry would compute them again.
    """
    from prefect.transactions import BaseTransaction

    token = BaseTransaction.__var__.set(None)
    try:
        yield
    finally:
        BaseTransaction.__var__.reset(token)


def run_subflow(flow_fn: Flow, stage: str, parameters: dict[str, Any]) -> Any:
    """Call ``flow_fn(**parameters)`` as a subflow that a retry of the parent runs again.

    Inside a task of the calling flow run, the call itself gives the child a fresh identity;
    elsewhere (a flow body, or a flow run inside a task of its parent) the call goes through
    :func:`subflow_task`.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    task_ctx, flow_ctx = TaskRunContext.get(), FlowRunContext.get()
    flow_run = flow_ctx.flow_run if flow_ctx else None
    if task_ctx is not None and flow_run is not None and task_ctx.task_run.flow_run_id == flow_run.id:
        with own_transactions():
            return flow_fn(**parameters)
    return subflow_task(flow_fn, stage, parameters)


#: (root flow run id, workspace) -> why a worker could not see the workspace: the rest of that run's
#: hand-overs fail at once with the same message instead of each starting a flow run that fails.
_unshared: dict[tuple[str, str], str] = {}


def _run_key(workspace: str) -> tuple[str, str]:
    from prefect.runtime import flow_run

    return (str(flow_run.root_flow_run_id or flow_run.id), str(workspace))


def run_heavy(flow_fn: Flow, stage: str, parameters: dict[str, Any], config: PipelineConfig) -> Any:
    """Call ``flow_fn(**parameters)`` locally or as deployment ``<flow name>/<prefix>-<stage>``.

    Raises:
        sharing.WorkspaceNotShared: the deployment's worker does not see this workspace (this
            step's, or an earlier step's of the same run: then nothing is handed over).
        YokaiError: the deployment's run ended in another state than Completed.
    """
    orch = config.orchestration
    if not orch.distributed:
        return run_subflow(flow_fn, stage, parameters)
    name = f"{flow_fn.name}/{orch.deployment_prefix}-{stage}"
    key = _run_key(parameters["workspace"])
    if key in _unshared:
        raise sharing.WorkspaceNotShared(
            f"{name} not handed over: an earlier step of this run found {_unshared[key]}"
        )
    get_run_logger().info(f"running {name} as a deployment")
    # an S3 workspace: the worker (maybe another host) pulls what this run has written so far
    mirror = workspace_mirror(parameters["workspace"], config.storage)
    if mirror is not None:
        mirror.publish([""])
    # a local workspace: the child checks first thing that its host sees this very folder
    with sharing.shared_token(parameters["workspace"]) as token:
        params = {**parameters, SHARE_TOKEN: token} if token else parameters
        run = run_deployment(name=name, parameters=params, timeout=orch.timeout_seconds)
    if run.state is None or not run.state.is_completed():
        msg = run.state.message if run.state else "no state"
        text = f"deployment {name} run {run.name} ended {run.state.name if run.state else '?'}: {msg}"
        if sharing.WorkspaceNotShared.__name__ in msg:
            _unshared[key] = text
            raise sharing.WorkspaceNotShared(text)
        raise YokaiError(text)
    if mirror is not None:
        mirror.pull([""])  # and this run reads what the worker published
    return run.state.result()


def step_record(step: str, episode_id: str | None, was_reused: bool, detail: str = "") -> dict:
    """One step of a run as the summary's ``reuse`` lists show it (taken from the cache, or computed)."""
    return {"step": step, "episode": episode_id, "reused": was_reused, "detail": detail}


def run_heavy_state(
    flow_fn: Flow, stage: str, parameters: dict[str, Any], config: PipelineConfig
) -> dict[str, Any]:
    """Like :func:`run_heavy`, but a failure is returned (``ok``/``result``/``error``), not raised."""
    try:
        return {"ok": True, "result": run_heavy(flow_fn, stage, parameters, config)}
    except Exception as exc:  # the child's own error, shown in the summary
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
