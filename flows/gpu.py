"""Heavy steps as flows of their own, so they can be deployed on the GPU work pool.

Each is called in-process (as a subflow) when running locally, or through
``flows.heavy.run_heavy`` -> ``run_deployment`` when ``orchestration.distributed`` is on.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, unmapped

from tasks.dataset import caption_task, selected_folders, tag_task
from tasks.identity import embed_task
from tasks.layering import read_frame_rows, segment_chunk_task, write_layer_manifest_task
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.workspace import Workspace


@flow(name="layering", persist_result=True)
def layering_flow(workspace: str, episode_id: str, config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """Segment an episode's extracted frames into layers, one mapped task per chunk."""
    rows = read_frame_rows(workspace, episode_id)
    n = config.layering.chunk_size
    chunks = [rows[i : i + n] for i in range(0, len(rows), n)]
    t0 = time.perf_counter()
    futures = segment_chunk_task.map(
        chunks,
        unmapped(workspace),
        unmapped(config.layering),
        unmapped(episode_id),
        list(range(len(chunks))),
        unmapped(config.detection),
    )
    layers = write_layer_manifest_task(workspace, episode_id, [f.result() for f in futures])
    seconds = time.perf_counter() - t0
    get_run_logger().info(
        f"{episode_id}: {layers['character_layers']} character layers, {layers['background_layers']} backgrounds"
    )
    return {**layers, "chunks": len(chunks), "seconds": round(seconds, 3)}


@flow(name="embedding", persist_result=True)
def embedding_flow(workspace: str, episode_ids: list[str], config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """Embed the character layers of each episode, one mapped task per episode."""
    ws = Workspace(workspace)
    manifests = [str(ws.layers_manifest(e)) for e in episode_ids]
    t0 = time.perf_counter()
    futures = embed_task.map(unmapped(workspace), episode_ids, manifests, unmapped(config.embedding))
    per_episode = [f.result() for f in futures]
    n = sum(s.get("n", 0) for s in per_episode)
    seconds = time.perf_counter() - t0
    return {
        "embeddings": n,
        "episodes": len(per_episode),
        "backend": config.embedding.backend,
        "seconds": round(seconds, 3),
    }


@flow(name="caption", persist_result=True)
def caption_flow(workspace: str, config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """Tag (when captions use tags), then caption every selected cluster folder, one mapped task per character."""
    chars = selected_folders(workspace)
    t0 = time.perf_counter()
    folders = [c["folder"] for c in chars]
    tagged = []
    if config.tags.uses_tags:
        tagged = [f.result() for f in tag_task.map(unmapped(workspace), folders, unmapped(config.tags))]
    futures = caption_task.map(
        unmapped(workspace),
        folders,
        unmapped(config.caption),
        [c["trigger"] for c in chars],
        [c["type"] for c in chars],
        unmapped(config.tags),
    )
    res = [f.result() for f in futures]
    seconds = time.perf_counter() - t0
    return {
        "characters": len(res),
        "captioned": sum(r["captioned"] for r in res),
        "skipped": sum(r["skipped"] for r in res),
        "failed": sum(len(r["failed"]) for r in res),
        "tagged": sum(t["tagged"] for t in tagged),
        "tag_failed": sum(len(t["failed"]) for t in tagged),
        "tag_backend": config.tags.backend if tagged else None,
        "backend": config.caption.backend,
        "seconds": round(seconds, 3),
    }
