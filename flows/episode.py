"""Per-episode flow: frame extraction, then layering mapped over chunks of frames."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, unmapped

from tasks.frames import extract_frames_task
from tasks.layering import read_frame_rows, segment_chunk_task, write_layer_manifest_task
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.frames import episode_id_for
from yokai_pipeline.fsio import remove_stale_temps
from yokai_pipeline.workspace import Workspace


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"episode-{Path(flow_run.parameters.get('video', '?')).name}"


@flow(name="episode", persist_result=True, flow_run_name=_run_name)
def episode_flow(
    video: str,
    workspace: str,
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - pydantic default renders as the UI form
    reference_episodes: list[str] | None = None,
) -> dict:
    """Turn one episode video into frames and character/background layers.

    Args:
        video: path of the episode file.
        workspace: run workspace folder.
        config: pipeline configuration.
        reference_episodes: episode ids processed earlier whose frames count as duplicates
            (the repeated opening is kept once per series).
    """
    log = get_run_logger()
    ws = Workspace(workspace)
    episode_id = episode_id_for(Path(video))
    removed = remove_stale_temps(ws.episode_dir(episode_id)) + remove_stale_temps(ws.layered_frames / "character" / episode_id)
    if removed:
        log.info(f"removed {removed} temporary files left by an interrupted run")
    refs = [str(ws.frames_manifest(e)) for e in (reference_episodes or []) if ws.frames_manifest(e).exists()]

    t0 = time.perf_counter()
    extract = extract_frames_task(video, workspace, config.frames, refs, episode_id)
    t_frames = time.perf_counter() - t0

    rows = read_frame_rows(workspace, episode_id)
    n = config.layering.chunk_size
    chunks = [rows[i : i + n] for i in range(0, len(rows), n)]
    t0 = time.perf_counter()
    futures = segment_chunk_task.map(
        chunks, unmapped(workspace), unmapped(config.layering), unmapped(episode_id), list(range(len(chunks)))
    )
    layers = write_layer_manifest_task(workspace, episode_id, [f.result() for f in futures])
    t_layers = time.perf_counter() - t0
    log.info(f"{episode_id}: {layers['character_layers']} character layers, {layers['background_layers']} backgrounds")
    return {
        "episode": Path(video).name,
        "episode_id": episode_id,
        "frames": {**extract, "flow_seconds": round(t_frames, 3)},
        "layers": {**layers, "chunks": len(chunks), "seconds": round(t_layers, 3)},
    }
