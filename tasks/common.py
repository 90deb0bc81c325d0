"""Cache policy shared by the stage tasks.

A task's cache key is: its own source + its inputs (paths, small records, stage config)
+ the content hash of the input files it names + the source of the library module that
does the work. A re-run of a finished episode therefore comes back Cached, and changing
a video, a config value or the stage code re-runs exactly the affected tasks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import Any

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from yokai_pipeline import remote, runtime
from yokai_pipeline.config import PipelineConfig, StorageConfig
from yokai_pipeline.fsio import file_sha256, stable_hash
from yokai_pipeline.workspace import Workspace

IO_RETRIES = 2
IO_RETRY_DELAYS = [2, 10]


def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [str(value)]
    if isinstance(value, dict):
        return [str(value["path"])] if "path" in value else []
    out: list[str] = []
    for item in value:
        out.extend(_paths(item))
    return out


def content_cache(
    *file_params: str, modules: tuple[ModuleType, ...] = (), root_param: str | None = None
) -> CachePolicy:
    """Cache policy keyed on task source, inputs, input file contents and library module source.

    Args:
        file_params: names of parameters holding a path, a list of paths, or rows with a ``path``.
        modules: library modules whose source is part of the key.
        root_param: parameter holding the workspace root that relative row paths resolve against.
    """
    module_hash = stable_hash([inspect.getsource(m) for m in modules])

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        root = Workspace(parameters[root_param]).root if root_param else None
        parts: list[str] = [module_hash]
        for name in file_params:
            for p in _paths(parameters.get(name)):
                path = Path(p)
                if root is not None and not path.is_absolute():
                    path = root / path
                parts.append(file_sha256(path) if path.is_file() else f"missing:{path}")
        return stable_hash(parts)

    fn: Callable[..., str] = key_fn
    return TASK_SOURCE + INPUTS + CacheKeyFnPolicy(cache_key_fn=fn)


def run_bounded(task: Task, calls: list[dict[str, Any]], max_workers: int) -> list[PrefectFuture]:
    """Run ``task`` once per parameter dict, at most ``max_workers`` at a time.

    The default task runner's thread pool is unbounded, so a mapped GPU task would start
    every call at once (a model copy each); this one is sized by the caller from the
    configuration. Returns the futures, all finished (failures stay in their states).
    """
    with ThreadPoolTaskRunner(max_workers=max(1, max_workers)) as runner:
        futures = [runner.submit(task, parameters=params) for params in calls]
        for future in futures:
            future.wait()
    return futures


def stage_lease(device: str, uses_gpu: bool = True, count: int = 1) -> AbstractContextManager[runtime.Lease]:
    """The device lease a GPU task holds for its duration (a CPU-only backend takes none).

    Inside a GPU flow run that holds a lease already, ``auto`` reuses the flow's device.
    Cluster-wide, tasks tagged ``gpu`` are counted by the ``gpu`` tag concurrency limit.
    """
    return runtime.lease_device(device if uses_gpu else "cpu", count)


@functools.lru_cache(maxsize=8)
def _credentials_block(name: str) -> Any:
    from prefect.blocks.core import Block

    return Block.load(f"aws-credentials/{name}")


def workspace_mirror(workspace: str, cfg: StorageConfig) -> remote.Mirror | None:
    """The scratch mirror of an S3 workspace (None for a local one)."""
    if Workspace(workspace).remote is None:
        return None
    creds = _credentials_block(cfg.credentials_block) if cfg.credentials_block else None
    return remote.open_mirror(workspace, cfg, creds)


def workspace_sync(
    workspace: str, cfg: StorageConfig, prefixes: list[str] | tuple[str, ...] = ("",)
) -> AbstractContextManager[Workspace]:
    """:func:`yokai_pipeline.remote.synced` with the S3 keys of ``storage.credentials_block`` if set."""
    remote_ws = Workspace(workspace).remote is not None
    creds = _credentials_block(cfg.credentials_block) if remote_ws and cfg.credentials_block else None
    return remote.synced(workspace, cfg, prefixes, credentials=creds)


def synced_flow(prefixes: Callable[[dict[str, Any]], list[str]] | None = None) -> Callable:
    """Decorate a flow function (under ``@flow``) so an S3 workspace is pulled before it and published after.

    ``prefixes`` maps the call's bound arguments to the workspace parts the flow reads and writes
    (default: all of it). A local workspace is passed through untouched.
    """

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            config = bound.arguments.get("config") or PipelineConfig()
            parts = prefixes(bound.arguments) if prefixes else [""]
            with workspace_sync(bound.arguments["workspace"], config.storage, parts):
                return fn(*args, **kwargs)

        return run

    return wrap
