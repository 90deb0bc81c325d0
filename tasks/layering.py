"""Layering tasks: segment chunks of frames into character and background layers."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.common import content_cache, row_files, stage_lease
from yokai_pipeline import detection, layering
from yokai_pipeline.config import DetectionConfig, LayeringConfig
from yokai_pipeline.fsio import read_jsonl
from yokai_pipeline.workspace import Workspace


def _chunk_files(parameters: dict, result: list[dict]) -> list[Path]:
    """The layer images and masks a chunk's rows name."""
    return row_files(parameters["workspace"], result)


def _manifest_files(parameters: dict, result: dict) -> list[Path]:
    ws = Workspace(parameters["workspace"])
    return [
        ws.episode_layers_manifest(parameters["episode_id"]),
        ws.layers_manifest(parameters["episode_id"]),
    ]


@task(
    name="segment-layers",
    tags=["gpu"],
    retries=1,
    retry_delay_seconds=5,
    cache_policy=content_cache(
        "rows", modules=(layering, detection), root_param="workspace", outputs=_chunk_files
    ),
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
    """Detect the instances of one chunk of frames and cut them into layers on the leased device.

    Returns the chunk's layer manifest rows.
    """
    uses_gpu = cfg.backend != "offline" or (detection_cfg is not None and detection_cfg.backend == "yolo")
    with stage_lease(cfg.device, uses_gpu=uses_gpu) as lease:
        if detection_cfg is not None:
            detection_cfg = detection_cfg.model_copy(update={"device": lease.resolve(detection_cfg.device)})
        out = layering.segment_layers(
            rows,
            Workspace(workspace),
            cfg.model_copy(update={"device": lease.resolve(cfg.device)}),
            detection_cfg,
        )
    get_run_logger().info(f"{episode_id} chunk {chunk_id}: {len(rows)} frames -> {len(out)} layers")
    return out


@task(
    name="write-layer-manifest",
    persist_result=True,
    cache_policy=content_cache(modules=(layering,), outputs=_manifest_files),
)
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
