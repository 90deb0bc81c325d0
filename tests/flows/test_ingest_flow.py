"""The ingest flow on real Prefect: new inbox episodes run once each, files still being written wait."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from yokai_pipeline import synthetic
from yokai_pipeline.config import PipelineConfig

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def tiny_series(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingest_series")
    synthetic.generate_series(out, seed=0, episodes=2, seconds=6.0)
    return out


def _child_runs(flow_run_id, flow_name: str) -> list[tuple[str, str]]:
    """(name, state) of the flow runs of ``flow_name`` started inside run ``flow_run_id``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
                ),
            )
            return [(r.name, r.state.name) for r in runs]

    return asyncio.run(read())


def test_ingest_runs_each_new_episode_once_and_waits_for_growing_files(tiny_series, tmp_path):
    from flows.ingest import ingest_flow

    inbox, ws = tmp_path / "inbox", tmp_path / "ws"
    inbox.mkdir()
    for name in ("ep01.mp4", "ep02.mp4"):
        shutil.copy(tiny_series / "episodes" / name, inbox / name)
    growing = inbox / "ep03.mp4"
    data = (tiny_series / "episodes" / "ep02.mp4").read_bytes()
    growing.write_bytes(data[:1000])

    def grow(n: int) -> None:  # another chunk of a copy still in progress, with a new mtime
        with growing.open("ab") as fh:
            fh.write(data[1000 * n : 1000 * (n + 1)])
        os.utime(growing, (time.time() + n, time.time() + n))

    stable = 0.5
    cfg = PipelineConfig()
    first_look = ingest_flow(str(inbox), str(ws), cfg, stable_seconds=stable, return_state=True)
    assert first_look.is_completed()
    assert first_look.result()["new"] == [], "a video seen for the first time must wait one stability period"
    assert _child_runs(first_look.state_details.flow_run_id, "episode") == []

    time.sleep(stable + 0.1)
    grow(1)
    state = ingest_flow(str(inbox), str(ws), cfg, stable_seconds=stable, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert sorted(out["done"]) == ["ep01", "ep02"]
    runs = _child_runs(state.state_details.flow_run_id, "episode")
    assert sorted(runs) == [("episode-ep01.mp4", "Completed"), ("episode-ep02.mp4", "Completed")]
    assert len(_child_runs(state.state_details.flow_run_id, "dataset")) == 1
    assert out["dataset"]["clustering"]["n_layers"] > 0
    for eid in ("ep01", "ep02"):
        assert (ws / "layered_frames" / "manifests" / f"{eid}.jsonl").is_file()
    assert not (ws / "layered_frames" / "manifests" / "ep03.jsonl").exists()

    time.sleep(stable + 0.1)
    grow(2)
    again = ingest_flow(str(inbox), str(ws), cfg, stable_seconds=stable, return_state=True)
    assert again.is_completed()
    assert again.result() == {"new": [], "done": [], "skipped": [], "dataset": {}}
    assert _child_runs(again.state_details.flow_run_id, "episode") == []
    assert _child_runs(again.state_details.flow_run_id, "dataset") == []

    # The same content under another name is the same episode: not run again.
    shutil.copy(inbox / "ep01.mp4", inbox / "ep01_copy.mp4")
    growing.unlink()
    dup = ingest_flow(str(inbox), str(ws), cfg, stable_seconds=0, return_state=True)
    assert dup.is_completed() and dup.result()["new"] == []

    # A broken upload fails alone, names the file, and is offered again by the next run.
    (inbox / "ep04.mp4").write_text("not a video\n")
    bad = ingest_flow(str(inbox), str(ws), cfg, stable_seconds=0, return_state=True)
    assert bad.is_failed() and "ep04.mp4" in bad.message, bad.message
    assert [s for _, s in _child_runs(bad.state_details.flow_run_id, "episode")] == ["Failed"]
    from yokai_pipeline.ingest import load_registry

    statuses = sorted(rec["status"] for rec in load_registry(ws)["episodes"].values())
    assert statuses == ["done", "done", "released"]


def test_cli_ingest_processes_a_new_episode_once(tiny_series, tmp_path):
    """`yokai ingest INBOX --workspace W`: one new episode the first time, none the second."""
    from typer.testing import CliRunner

    from yokai_pipeline.cli import app

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(tiny_series / "episodes" / "ep01.mp4", inbox / "ep01.mp4")
    args = ["ingest", str(inbox), "--workspace", str(tmp_path / "ws"), "--stable-seconds", "0"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "1 new episode(s), 1 processed" in first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "0 new episode(s), 0 processed" in second.output
