"""Cache policy shared by the stage tasks.

A task's cache key is: its own source + its inputs (paths, small records, stage config)
+ the content hash of the input files it names + the source of the library module that
does the work. A re-run of a finished episode therefore comes back Cached, and changing
a video, a config value or the stage code re-runs exactly the affected tasks.
"""

from __future__ import annotations

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

from yokai_pipeline import runtime
from yokai_pipeline.fsio import file_sha256, stable_hash

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
        root = Path(parameters[root_param]) if root_param else None
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
