"""Retries one by one: a flaky task is retried alone; a failed run re-run redoes only what failed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from yokai_pipeline import synthetic
from yokai_pipeline.config import PipelineConfig

pytestmark = pytest.mark.usefixtures("prefect_harness")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def episode_video(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("retry_series")
    synthetic.generate_series(out, seed=0, episodes=1, seconds=6.0)
    return str(out / "episodes" / "ep01.mp4")


def _config() -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.layering.chunk_size = 4  # several chunk tasks for a 6 s episode
    return cfg


def _child_runs(flow_run_id) -> list:
    """The subflow runs started by a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
                )
            )

    return asyncio.run(read())


def _task_runs(flow_run_id) -> list:
    """Every task run of a flow run and of its subflow runs (not the runs standing for subflow calls,
    nor the ``run-<stage>`` tasks that make those calls: flows.heavy.run_subflow)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    async def read():
        async with get_client() as client:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
                )
            )
            ids = [flow_run_id, *[c.id for c in children]]
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            callers = {c.parent_task_run_id for c in children}
            return [r for r in runs if r.id not in callers and not r.name.startswith("run-")]

    return asyncio.run(read())


class ChunkFault:
    """Wraps ``layering.segment_layers``: the first chunk it sees fails ``times`` times."""

    def __init__(self, real, times: int):
        self.real, self.times = real, times
        self.target: int | None = None
        self.failures = 0
        self.lock = threading.Lock()

    def __call__(self, rows, workspace, cfg, detection=None):
        with self.lock:
            if self.target is None:
                self.target = rows[0]["frame_index"]
            fail = rows[0]["frame_index"] == self.target and self.failures < self.times
            if fail:
                self.failures += 1
        if fail:
            raise OSError(f"injected fault on the chunk starting at frame {self.target}")
        return self.real(rows, workspace, cfg, detection)


def test_flaky_task_is_retried_alone(episode_video, tmp_path, monkeypatch):
    from flows.episode import episode_flow
    from yokai_pipeline import layering

    fault = ChunkFault(layering.segment_layers, times=1)
    monkeypatch.setattr(layering, "segment_layers", fault)
    state = episode_flow(episode_video, str(tmp_path / "ws"), _config(), return_state=True)

    assert state.is_completed(), state.message
    assert fault.failures == 1
    runs = _task_runs(state.state_details.flow_run_id)
    counts = {r.name: (r.run_count, r.state.name) for r in runs}
    retried = {name: c for name, c in counts.items() if c[0] != 1}
    assert len(retried) == 1, counts
    ((name, (run_count, final)),) = retried.items()
    assert name.startswith("segment-layers-ep01-") and run_count == 2 and final == "Completed", counts
    assert sum(n.startswith("segment-layers") for n in counts) >= 3, counts
    assert all(s == "Completed" for _, s in counts.values()), counts
    assert state.result()["layers"]["character_layers"] > 0


def test_failed_run_retried_redoes_only_the_failed_task(episode_video, tmp_path, monkeypatch):
    """`prefect flow-run retry` (what the UI's Retry button does) re-runs the same flow run:
    the tasks that had finished come back Cached, the failed chunk runs again."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH

    from flows.episode import episode_flow
    from yokai_pipeline import layering

    fault = ChunkFault(layering.segment_layers, times=100)
    monkeypatch.setattr(layering, "segment_layers", fault)
    ws = tmp_path / "ws"
    state = episode_flow(episode_video, str(ws), _config(), return_state=True)
    assert state.is_failed()
    assert fault.failures == 2, "segment-layers has retries=1: two tries, then the task fails"
    flow_run_id = state.state_details.flow_run_id
    first = {r.name: r.state.name for r in _task_runs(flow_run_id)}
    failed = [n for n, s in first.items() if s == "Failed"]
    assert len(failed) == 1 and failed[0].startswith("segment-layers"), first
    finished = [n for n, s in first.items() if s == "Completed"]
    assert any(n.startswith("extract-frames") for n in finished), first

    # The fault is gone (a fixed bug, a worker back online); the retry runs in a fresh process.
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()),
        "PYTHONPATH": str(REPO),
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    out = subprocess.run(
        [prefect, "flow-run", "retry", str(flow_run_id), "--entrypoint", "flows/episode.py:episode_flow"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    async def read_run():
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    run = asyncio.run(read_run())
    assert run.state.name == "Completed" and run.run_count == 2, (run.state, run.run_count)
    # Each attempt called the layering subflow; compare what the second call did with the first.
    tries = [t for t in _task_runs(flow_run_id) if t.flow_run_id == flow_run_id]
    extract = sorted((t for t in tries if t.name.startswith("extract-frames")), key=lambda t: t.created)
    assert [t.state.name for t in extract] == ["Completed", "Cached"], extract
    children = sorted(_child_runs(flow_run_id), key=lambda r: r.created)
    assert [c.state.name for c in children] == ["Failed", "Completed"], children
    before = {t.name: t.state.name for t in _task_runs(children[0].id)}
    after = {t.name: t.state.name for t in _task_runs(children[1].id)}
    for name, was in before.items():
        assert after[name] == ("Cached" if was == "Completed" else "Completed"), (name, before, after)
    not_cached = {n for n, s in after.items() if s != "Cached"}
    assert not_cached == {failed[0]} | (after.keys() - before.keys()), (before, after)
    rows = (ws / "layered_frames" / "manifests" / "ep01.jsonl").read_text().splitlines()
    assert rows, "the retried run wrote the layer manifest"
