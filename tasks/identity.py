"""Embedding and clustering tasks."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.common import content_cache, stage_lease
from yokai_pipeline import clustering, embedding
from yokai_pipeline.config import ClusteringConfig, EmbeddingConfig
from yokai_pipeline.workspace import Workspace


def _embedding_files(parameters: dict, result: dict) -> list[Path]:
    """The episode's embeddings and their sidecar."""
    ws = Workspace(parameters["workspace"])
    return [
        ws.embeddings_path(parameters["episode_id"]),
        embedding.sidecar_path(ws, parameters["episode_id"]),
    ]


@task(
    name="embed-layers",
    tags=["gpu"],
    retries=1,
    retry_delay_seconds=5,
    cache_policy=content_cache("manifest", modules=(embedding,), outputs=_embedding_files),
    persist_result=True,
    task_run_name="embed-{episode_id}",
)
def embed_task(workspace: str, episode_id: str, manifest: str, cfg: EmbeddingConfig) -> dict:
    """Embed one episode's character layers (npy aligned with the layer manifest)."""
    with stage_lease(cfg.device, uses_gpu=cfg.backend != "offline") as lease:
        leased = cfg.model_copy(update={"device": lease.resolve(cfg.device)})
        stats = embedding.embed_layers(Workspace(workspace), episode_id, leased)
    get_run_logger().info(f"{episode_id}: {stats.get('n')} embeddings, dim {stats.get('dim')}")
    return stats


@task(name="cluster-characters", persist_result=True)
def cluster_task(
    workspace: str, episode_ids: list[str], cfg: ClusteringConfig, full_recluster: bool = False
) -> dict:
    """Cluster all processed episodes; new episodes join existing clusters without renumbering."""
    ws = Workspace(workspace)
    log = get_run_logger()
    existing = clustering.read_clusters(ws)
    if existing is None:
        mode, stats = "full", clustering.cluster_layers(ws, episode_ids, cfg)
    elif full_recluster:
        mode, stats = "recluster", clustering.recluster(ws, episode_ids, cfg)
    else:
        known = {m["episode_id"] for m in existing["members"]}
        # and episodes whose layers changed since (a video replaced under the same name)
        changed = set(clustering.changed_episodes(ws, existing, episode_ids))
        new = [e for e in episode_ids if e not in known or e in changed]
        mode, stats = (
            ("incremental", clustering.assign_incremental(ws, new, cfg)) if new else ("unchanged", {})
        )
        if not new:
            stats = {"n_clusters": len(existing["clusters"]), "n_layers": len(existing["members"])}
    log.info(f"clustering ({mode}): {stats.get('n_clusters')} clusters over {stats.get('n_layers')} layers")
    return {"mode": mode, **{k: v for k, v in stats.items() if not isinstance(v, dict | list)}}
