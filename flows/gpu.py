"""Heavy steps as flows of their own, so they can be deployed on the GPU work pool.

Each is called in-process (as a subflow) when running locally, or through
``flows.heavy.run_heavy`` -> ``run_deployment`` when ``orchestration.distributed`` is on.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, unmapped

from tasks.layering import read_frame_rows, segment_chunk_task, write_layer_manifest_task
from yokai_pipeline.config import PipelineConfig


@flow(name="layering", persist_result=True)
def layering_flow(workspace: str, episode_id: str, config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """Segment an episode's extracted frames into layers, one mapped task per chunk."""
    rows = read_frame_rows(workspace, episode_id)
    n = config.layering.chunk_size
    chunks = [rows[i : i + n] for i in range(0, len(rows), n)]
    t0 = time.perf_counter()
    futures = segment_chunk_task.map(
        chunks, unmapped(workspace), unmapped(config.layering), unmapped(episode_id), list(range(len(chunks)))
    )
    layers = write_layer_manifest_task(workspace, episode_id, [f.result() for f in futures])
    seconds = time.perf_counter() - t0
    get_run_logger().info(
        f"{episode_id}: {layers['character_layers']} character layers, {layers['background_layers']} backgrounds"
    )
    return {**layers, "chunks": len(chunks), "seconds": round(seconds, 3)}
