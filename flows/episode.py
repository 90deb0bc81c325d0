"""Per-episode flow: frame extraction, then layering mapped over chunks of frames."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

from flows.gpu import layering_flow
from flows.heavy import run_heavy, step_record
from tasks.common import call_checked, reused, synced_flow
from tasks.frames import extract_frames_task
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.frames import episode_id_for
from yokai_pipeline.fsio import file_lock, remove_stale_temps
from yokai_pipeline.remote import episode_prefixes
from yokai_pipeline.summary import utc_now
from yokai_pipeline.workspace import Workspace


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"episode-{Path(flow_run.parameters.get('video', '?')).name}"


@flow(name="episode", persist_result=True, flow_run_name=_run_name)
@synced_flow(lambda a: episode_prefixes(episode_id_for(Path(a["video"]))))
def episode_flow(
    video: str,
    workspace: str,
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - pydantic default renders as the UI form
) -> dict:
    """Turn one episode video into frames and character/background layers.

    Independent of every other episode (the repeated opening is removed later, by the series
    dedup of the dataset flow), so episodes run in parallel.

    Args:
        video: path of the episode file.
        workspace: run workspace folder.
        config: pipeline configuration.
    """
    log = get_run_logger()
    ws = Workspace(workspace)
    episode_id = episode_id_for(Path(video))
    # one run at a time per episode on a workspace: a second run waits instead of racing
    with file_lock(ws.root / ".locks" / f"episode-{episode_id}.lock"):
        started_at = utc_now()
        removed = remove_stale_temps(ws.episode_dir(episode_id)) + sum(
            remove_stale_temps(ws.layered_frames / kind / episode_id)
            for kind in ("character", "background", "masks")
        )
        if removed:
            log.info(f"removed {removed} temporary files left by an interrupted run")

        t0 = time.perf_counter()
        state = call_checked(
            extract_frames_task, video=video, workspace=workspace, cfg=config.frames, episode_id=episode_id
        )
        extract = state.result()
        t_frames = time.perf_counter() - t0

        layers = run_heavy(
            layering_flow,
            "layering",
            {"workspace": workspace, "episode_id": episode_id, "config": config},
            config,
        )
        return {
            "episode": Path(video).name,
            "episode_id": episode_id,
            "frames": {**extract, "flow_seconds": round(t_frames, 3)},
            "layers": layers,
            "started_at": started_at,
            "finished_at": utc_now(),
            "device": layers.get("device", "cpu"),
            # what this run took from the cache (an earlier run or attempt) and what it computed
            "steps": [step_record("extract-frames", episode_id, reused(state)), *layers.get("steps", [])],
        }
