"""Heavy steps as flows of their own, so they can be deployed on the GPU work pool.

Each is called in-process (as a subflow) when running locally, or through
``flows.heavy.run_heavy`` -> ``run_deployment`` when ``orchestration.distributed`` is on.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from flows.heavy import gpu_flow_lease, step_record
from tasks.common import call_checked, reused, run_bounded, synced_flow
from tasks.dataset import caption_task, selected_folders, tag_task
from tasks.identity import embed_task
from tasks.layering import read_frame_rows, segment_chunk_task, write_layer_manifest_task
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.remote import episode_prefixes
from yokai_pipeline.runtime import stage_workers
from yokai_pipeline.workspace import Workspace


@flow(name="layering", persist_result=True)
@synced_flow(lambda a: episode_prefixes(a["episode_id"]))
def layering_flow(workspace: str, episode_id: str, config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """Segment an episode's extracted frames into layers on one leased device, chunk by chunk.

    At most ``orchestration.chunk_concurrency`` chunks run at once (each has its own worker
    pool and buffers); all of them use the flow run's device.
    """
    rows = read_frame_rows(workspace, episode_id)
    cfg = config.layering
    n = cfg.chunk_size
    chunks = [rows[i : i + n] for i in range(0, len(rows), n)]
    t0 = time.perf_counter()
    uses_gpu = cfg.backend != "offline" or config.detection.backend == "yolo"
    with gpu_flow_lease(config, cfg.device, uses_gpu=uses_gpu) as lease:
        calls = [
            {
                "rows": c,
                "workspace": workspace,
                "cfg": cfg,
                "episode_id": episode_id,
                "chunk_id": i,
                "detection_cfg": config.detection,
            }
            for i, c in enumerate(chunks)
        ]
        futures = run_bounded(segment_chunk_task, calls, config.orchestration.chunk_concurrency)
        manifest = call_checked(
            write_layer_manifest_task,
            workspace=workspace,
            episode_id=episode_id,
            chunk_rows=[f.result() for f in futures],
        )
        layers = manifest.result()
    seconds = time.perf_counter() - t0
    get_run_logger().info(
        f"{episode_id}: {layers['character_layers']} character layers, {layers['background_layers']} "
        f"backgrounds on {lease.label}"
    )
    cached = sum(reused(f.state) for f in futures)
    steps = [
        step_record(
            "segment-layers", episode_id, cached == len(futures), f"{cached} of {len(futures)} chunks cached"
        ),
        step_record("write-layer-manifest", episode_id, reused(manifest)),
    ]
    return {
        **layers,
        "chunks": len(chunks),
        "seconds": round(seconds, 3),
        "device": lease.label,
        "steps": steps,
    }


@flow(name="embedding", persist_result=True)
@synced_flow()
def embedding_flow(workspace: str, episode_ids: list[str], config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """Embed the character layers of each episode, one mapped task per episode."""
    ws = Workspace(workspace)
    manifests = [str(ws.layers_manifest(e)) for e in episode_ids]
    t0 = time.perf_counter()
    cfg = config.embedding
    calls = [
        {"workspace": workspace, "episode_id": e, "manifest": m, "cfg": cfg}
        for e, m in zip(episode_ids, manifests, strict=True)
    ]
    workers = stage_workers(cfg.backend != "offline", len(calls))
    futures = run_bounded(embed_task, calls, workers)
    per_episode = [f.result() for f in futures]
    n = sum(s.get("n", 0) for s in per_episode)
    seconds = time.perf_counter() - t0
    return {
        "embeddings": n,
        "episodes": len(per_episode),
        "backend": config.embedding.backend,
        "seconds": round(seconds, 3),
        "steps": [
            step_record("embed-layers", e, reused(f.state)) for e, f in zip(episode_ids, futures, strict=True)
        ],
    }


@flow(name="caption", persist_result=True)
@synced_flow()
def caption_flow(workspace: str, config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """Tag (when captions use tags), then caption every selected cluster folder, one mapped task per character."""
    chars = selected_folders(workspace)
    t0 = time.perf_counter()
    folders = [c["folder"] for c in chars]
    tagged = []
    if config.tags.uses_tags:
        tag_calls = [{"workspace": workspace, "folder": f, "cfg": config.tags} for f in folders]
        tag_workers = stage_workers(config.tags.backend != "offline", len(tag_calls))
        tagged = [f.result() for f in run_bounded(tag_task, tag_calls, tag_workers)]
    cfg = config.caption
    calls = [
        {
            "workspace": workspace,
            "folder": c["folder"],
            "cfg": cfg,
            "trigger": c["trigger"],
            "char_type": c["type"],
            "tags": config.tags,
        }
        for c in chars
    ]
    workers = stage_workers(cfg.backend != "offline", len(calls))
    res = [f.result() for f in run_bounded(caption_task, calls, workers)]
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
