"""The per-episode flow on real Prefect: caching, resume, and bad episodes failing alone."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from yokai_pipeline import synthetic
from yokai_pipeline.config import PipelineConfig

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def short_series(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("short_series")
    synthetic.generate_series(out, seed=3, episodes=2, seconds=8.0)
    return out


def _task_states(flow_run_id) -> list[tuple[str, str]]:
    """(name, state) of every task run of a flow run and of its subflows (not the subflow wrappers,
    nor the uncached ``run-<stage>`` tasks that call them: flows.heavy.run_subflow)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read(run_id):
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
        out = []
        for r in runs:
            child = r.state.state_details.child_flow_run_id if r.state else None
            if child is not None:
                out.extend(await read(child))
            elif not r.name.startswith("run-"):
                out.append((r.name, r.state.name))
        return out

    return asyncio.run(read(flow_run_id))


def test_second_run_is_fully_cached(short_series, tmp_path):
    from flows.episode import episode_flow

    video = str(short_series / "episodes" / "ep01.mp4")
    cfg = PipelineConfig()
    cfg.layering.chunk_size = 8
    first = episode_flow(video, str(tmp_path / "ws"), cfg, return_state=True)
    assert first.is_completed()
    out1 = first.result()
    assert out1["frames"]["kept"] > 0 and out1["layers"]["character_layers"] > 0
    assert out1["layers"]["chunks"] >= 2

    second = episode_flow(video, str(tmp_path / "ws"), cfg, return_state=True)
    assert second.is_completed()
    states = _task_states(second.state_details.flow_run_id)
    assert states, "no task runs recorded"
    not_cached = [(n, s) for n, s in states if s != "Cached"]
    assert not not_cached, f"tasks that re-ran: {not_cached}"
    out2 = second.result()
    assert out2["layers"] == {
        **out1["layers"],
        "seconds": out2["layers"]["seconds"],
        "steps": out2["layers"]["steps"],
    }
    assert [s["reused"] for s in out1["steps"]] == [False, False, False]
    assert [(s["step"], s["reused"]) for s in out2["steps"]] == [
        ("extract-frames", True),
        ("segment-layers", True),
        ("write-layer-manifest", True),
    ]


def test_interrupted_run_redoes_only_unfinished_chunks(short_series, tmp_path, monkeypatch):
    """A run that died after some chunks: the re-run finds finished chunks Cached and runs the rest."""
    from flows.episode import episode_flow
    from yokai_pipeline import layering

    video = str(short_series / "episodes" / "ep02.mp4")
    ws = tmp_path / "ws"
    cfg = PipelineConfig()
    cfg.layering.chunk_size = 6
    real = layering.segment_layers
    seen: list[int] = []

    def dies_after_two_chunks(rows, workspace, lcfg, detection=None):
        seen.append(rows[0]["frame_index"])
        if len(seen) > 2:
            raise RuntimeError("worker killed")
        return real(rows, workspace, lcfg, detection)

    monkeypatch.setattr(layering, "segment_layers", dies_after_two_chunks)
    cfg.layering.chunk_size = 6
    first = episode_flow(video, str(ws), cfg, return_state=True)
    assert first.is_failed()
    monkeypatch.setattr(layering, "segment_layers", real)

    second = episode_flow(video, str(ws), cfg, return_state=True)
    assert second.is_completed()
    states = _task_states(second.state_details.flow_run_id)
    chunk_states = [s for n, s in states if n.startswith("segment-layers")]
    assert chunk_states.count("Cached") == 2, states
    assert chunk_states.count("Completed") == len(chunk_states) - 2, states
    assert dict(states)[next(n for n, _ in states if n.startswith("extract-frames"))] == "Cached"


def test_bad_episodes_fail_alone(short_series, tmp_path):
    from flows.pipeline import pipeline_flow

    eps = tmp_path / "episodes"
    eps.mkdir()
    shutil.copy(short_series / "episodes" / "ep01.mp4", eps / "a_good.mp4")
    (eps / "b_empty.mp4").write_bytes(b"")
    data = (short_series / "episodes" / "ep02.mp4").read_bytes()
    (eps / "c_truncated.mp4").write_bytes(data[: len(data) // 3])
    (eps / "d_text.mp4").write_text("this is not a video\n")
    ws = tmp_path / "ws"
    state = pipeline_flow(str(eps), str(ws), PipelineConfig(), return_state=True)
    assert state.is_failed()
    import json

    summary = json.loads((ws / "summary.json").read_text())
    failed = {f["episode"]: f["error"] for f in summary["episodes"]["failed"]}
    assert "b_empty.mp4" in failed and "b_empty.mp4" in failed["b_empty.mp4"]
    assert "d_text.mp4" in failed and "d_text.mp4" in failed["d_text.mp4"]
    assert "a_good.mp4" in summary["episodes"]["completed"]
    # a truncated file either yields the decodable part or fails naming the file
    if "c_truncated.mp4" in failed:
        assert "c_truncated.mp4" in failed["c_truncated.mp4"]
    assert summary["stages"]["layers"]["character"] > 0
