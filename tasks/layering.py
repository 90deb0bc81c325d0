"""Layering tasks: segment chunks of frames into character and background layers."""

from __future__ import annotations

from prefect import get_run_logger, task

from tasks.common import content_cache
from yokai_pipeline import detection, layering
from yokai_pipeline.config import DetectionConfig, LayeringConfig
from yokai_pipeline.fsio import read_jsonl
from yokai_pipeline.workspace import Workspace


@task(
    name="segment-layers",
    tags=["gpu"],
    retries=1,
    retry_delay_seconds=5,
    cache_policy=content_cache("rows", modules=(layering, detection), root_param="workspace"),
    persist_result=True,
    task_run_name="segment-layers-{episode_id}-{chunk_id}",
)
def segment_chunk_task(
    rows: list[dict],
    workspace: str,
    cfg: LayeringConfig,
    episode_id: str,
    chunk_id: int,
    detection_cfg: DetectionConfig | None = None,
) -> list[dict]:
    """Detect the instances of one chunk of frames and cut them into layers; returns its layer rows."""
    out = layering.segment_layers(rows, Workspace(workspace), cfg, detection_cfg)
    get_run_logger().info(f"{episode_id} chunk {chunk_id}: {len(rows)} frames -> {len(out)} layers")
    return out


@task(name="write-layer-manifest", persist_result=True, cache_policy=content_cache(modules=(layering,)))
def write_layer_manifest_task(workspace: str, episode_id: str, chunk_rows: list[list[dict]]) -> dict:
    """Merge chunk outputs into the episode's layer manifest."""
    ws = Workspace(workspace)
    rows = [r for chunk in chunk_rows for r in chunk]
    layering.write_layer_manifest(ws, episode_id, rows)
    n_char = sum(r["kind"] == "character" for r in rows)
    return {
        "character_layers": n_char,
        "background_layers": len(rows) - n_char,
        "manifest": str(ws.layers_manifest(episode_id)),
    }


def read_frame_rows(workspace: str, episode_id: str) -> list[dict]:
    return read_jsonl(Workspace(workspace).frames_manifest(episode_id))
