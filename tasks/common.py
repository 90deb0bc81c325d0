"""Cache policy shared by the stage tasks.

A task's cache key is: its own source + its inputs (paths, small records, stage config)
+ the content hash of the input files it names + the source of the library module that
does the work. A re-run of a finished episode therefore comes back Cached, and changing
a video, a config value or the stage code re-runs exactly the affected tasks.

A cached result also names the files it stands for (``outputs``): :func:`call_checked` and
:func:`run_bounded` run a task again, refreshing its cache record, when it came back Cached
but those files are gone (a deleted workspace whose results live in the worker's store).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from prefect import Task, get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from prefect.futures import PrefectFuture
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from yokai_pipeline import remote, runtime, sharing
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


#: (task parameters, cached result) -> the files that result stands for
OutputsFn = Callable[[dict[str, Any], Any], list[Path]]


@dataclass
class ContentCache(CachePolicy):
    """A content key (``key``) plus the files a cached result stands for (``outputs``).

    The key itself must not look at the outputs: it is computed before the task runs (outputs
    absent) and the result is stored under it, so a key over the outputs would never match on
    the next run. The outputs are checked after a cache hit instead (:func:`missing_outputs`).
    """

    key: CachePolicy | None = None
    outputs: OutputsFn | None = None

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        return None if self.key is None else self.key.compute_key(task_ctx, inputs, flow_parameters, **kwargs)


def content_cache(
    *file_params: str,
    modules: tuple[ModuleType, ...] = (),
    root_param: str | None = None,
    outputs: OutputsFn | None = None,
) -> CachePolicy:
    """Cache policy keyed on task source, inputs, input file contents and library module source.

    Args:
        file_params: names of parameters holding a path, a list of paths, or rows with a ``path``.
        modules: library modules whose source is part of the key.
        root_param: parameter holding the workspace root that relative row paths resolve against.
        outputs: the files a cached result stands for; a hit whose files are gone runs again.
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
    return ContentCache(key=TASK_SOURCE + INPUTS + CacheKeyFnPolicy(cache_key_fn=fn), outputs=outputs)


def row_files(root: str | Path, rows: list[dict]) -> list[Path]:
    """The workspace files manifest rows point at (``path`` and ``mask_path``)."""
    return [Path(root) / r[k] for r in rows for k in ("path", "mask_path") if isinstance(r.get(k), str)]


def missing_outputs(task: Task, parameters: dict[str, Any], state: State) -> list[Path]:
    """The files a Cached ``state`` of ``task`` stands for that are gone (empty when not Cached)."""
    outputs = getattr(task.cache_policy, "outputs", None)
    if outputs is None or state.name != "Cached":
        return []
    return [p for p in outputs(parameters, state.result()) if not p.exists()]


def _refresh_note(task: Task, missing: list[Path]) -> None:
    get_run_logger().warning(
        f"{task.name}: cached result's files are gone ({len(missing)}, e.g. {missing[0]}); running it again"
    )


def call_checked(task: Task, **parameters: Any) -> State:
    """Call ``task`` and return its final state; a Cached result whose files are gone is recomputed.

    The second call refreshes the cache record (``refresh_cache``), so the next run reuses it.
    """
    state = task(**parameters, return_state=True)
    missing = missing_outputs(task, parameters, state)
    if missing:
        _refresh_note(task, missing)
        state = task.with_options(refresh_cache=True)(**parameters, return_state=True)
    return state


def run_bounded(task: Task, calls: list[dict[str, Any]], max_workers: int) -> list[PrefectFuture]:
    """Run ``task`` once per parameter dict, at most ``max_workers`` at a time.

    The default task runner's thread pool is unbounded, so a mapped GPU task would start
    every call at once (a model copy each); this one is sized by the caller from the
    configuration. A call that came back Cached with its files gone runs again (refreshing
    its cache record). Returns the futures, all finished (failures stay in their states).
    """
    with ThreadPoolTaskRunner(max_workers=max(1, max_workers)) as runner:
        futures = [runner.submit(task, parameters=params) for params in calls]
        for future in futures:
            future.wait()
        for i, (future, params) in enumerate(zip(futures, calls, strict=True)):
            missing = missing_outputs(task, params, future.state)
            if missing:
                _refresh_note(task, missing)
                futures[i] = runner.submit(task.with_options(refresh_cache=True), parameters=params)
                futures[i].wait()
    return futures


def reused(state: State) -> bool:
    """Whether a task's result was taken from its cache (an earlier run or attempt)."""
    return state.name == "Cached"


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


#: The parameter every synced flow gains: the token of :mod:`yokai_pipeline.sharing` its parent wrote.
SHARE_TOKEN = "share_token"


def synced_flow(prefixes: Callable[[dict[str, Any]], list[str]] | None = None) -> Callable:
    """Decorate a flow function (under ``@flow``) so an S3 workspace is pulled before it and published after.

    ``prefixes`` maps the call's bound arguments to the workspace parts the flow reads and writes
    (default: all of it). A local workspace is passed through untouched.

    The flow also gains a last parameter ``share_token`` (default None): a parent that starts it
    as a deployment run (:func:`flows.heavy.run_heavy`) passes the token it wrote into a local
    workspace, and the flow fails before any work when this worker does not see it
    (:func:`yokai_pipeline.sharing.check_token`).
    """

    def wrap(fn: Callable) -> Callable:
        # real types, evaluated in the flow's own module: Prefect cannot resolve the strings of a
        # ``from __future__ import annotations`` module from this wrapper's globals, and a config
        # parameter it cannot resolve loses its schema (the UI's run form becomes a raw JSON box)
        sig = inspect.signature(fn, eval_str=True)
        token_param = inspect.Parameter(
            SHARE_TOKEN, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None
        )

        @functools.wraps(fn)
        def run(*args: Any, share_token: str | None = None, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            sharing.check_token(bound.arguments["workspace"], share_token)
            config = bound.arguments.get("config") or PipelineConfig()
            parts = prefixes(bound.arguments) if prefixes else [""]
            with workspace_sync(bound.arguments["workspace"], config.storage, parts):
                return fn(*args, **kwargs)

        # Prefect builds the flow's parameters (and the deployment's schema) from this signature
        run.__signature__ = sig.replace(parameters=[*sig.parameters.values(), token_param])  # type: ignore[attr-defined]
        run.__annotations__ = {
            **{name: p.annotation for name, p in sig.parameters.items() if p.annotation is not p.empty},
            **({"return": sig.return_annotation} if sig.return_annotation is not sig.empty else {}),
            SHARE_TOKEN: str | None,
        }
        return run

    return wrap
