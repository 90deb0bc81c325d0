"""Dataset flow: identity clustering, analysis, selection, augmentation, captions, kohya packaging."""

from __future__ import annotations

import shutil
import time
from typing import Any

from prefect import flow, get_run_logger, unmapped

from flows.gpu import caption_flow, embedding_flow
from flows.heavy import run_heavy, step_record
from tasks.analysis import analyze_task, report_tags_task, review_task, select_task
from tasks.common import synced_flow
from tasks.dataset import augment_task, backgrounds_task, package_task, selected_folders, validate_task
from tasks.frames import series_dedup_task
from tasks.identity import cluster_task
from yokai_pipeline import augmentation, clustering
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.fsio import file_lock
from yokai_pipeline.workspace import Workspace


def scalars(figs: dict) -> dict:
    """The numbers and strings of a stage result (what summary.json keeps)."""
    return {k: v for k, v in figs.items() if not isinstance(v, dict | list)}


def processed_episodes(workspace: str) -> list[str]:
    """Episode ids that have a layer manifest, sorted."""
    folder = Workspace(workspace).layered_frames / "manifests"
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


@flow(name="dataset", persist_result=True)
@synced_flow()
def dataset_flow(
    workspace: str,
    config: PipelineConfig = PipelineConfig(),  # noqa: B008
    episode_ids: list[str] | None = None,
    full_recluster: bool = False,
    rebuild_clusters: bool = False,
) -> dict:
    """Build the training datasets from the processed episodes of ``workspace``.

    Args:
        workspace: run workspace folder.
        config: pipeline configuration.
        episode_ids: episodes to include (default: every processed episode).
        full_recluster: re-cluster everything (ids kept stable) instead of assigning new
            episodes to the existing clusters.
        rebuild_clusters: when the existing clusters cover other episodes, remove them and what
            was built from them, and build afresh (the pipeline sets it when the clusters are
            its own earlier attempt's, so a retry's datasets equal a fresh run's).
    """
    # one dataset build at a time per workspace: a concurrent run waits instead of racing
    with file_lock(Workspace(workspace).root / ".locks" / "dataset.lock"):
        return _build_datasets(
            workspace,
            config,
            episode_ids or processed_episodes(workspace),
            full_recluster,
            rebuild_clusters,
        )


def _build_datasets(
    workspace: str,
    config: PipelineConfig,
    episode_ids: list[str],
    full_recluster: bool,
    rebuild_clusters: bool = False,
) -> dict:
    log = get_run_logger()
    stages: dict[str, Any] = {}

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        stages[name] = {
            **(out if isinstance(out, dict) else {}),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return out

    if rebuild_clusters and discard_other_build(Workspace(workspace), episode_ids):
        log.info("the clusters and what was built from them came from other episodes: building them afresh")
    timed("series_dedup", series_dedup_task, workspace, episode_ids, config.frames)
    params = {"workspace": workspace, "episode_ids": episode_ids, "config": config}
    timed("embedding", run_heavy, embedding_flow, "embedding", params, config)
    steps = stages["embedding"].pop("steps", [])
    timed("clustering", cluster_task, workspace, episode_ids, config.clustering, full_recluster)
    timed("review", review_task, workspace, config.clustering.link_mode)
    ana = timed("analysis", analyze_task, workspace, config.analysis, config.embedding)
    stages["analysis"].update({f"tier_{k}": v for k, v in ana["summary"]["by_tier"].items()})
    stages["analysis"].update({f"type_{k}": v for k, v in ana["summary"]["by_type"].items()})
    sel = timed("selection", select_task, workspace, config.selection)
    stages["selection"]["characters"] = len(sel["characters"])
    if not sel["characters"]:
        log.warning("no cluster matches the selection; nothing to augment, caption or package")
        return {**stages, "steps": _rerun_steps(stages, steps)}

    chars = selected_folders(workspace)
    t0 = time.perf_counter()
    # flips only for characters the config marks symmetric (the guide: "for symmetric characters")
    futures = augment_task.map(
        unmapped(workspace),
        [c["folder"] for c in chars],
        unmapped(config.augment),
        [augmentation.is_symmetric(config.augment, c["cluster"], c["name"]) for c in chars],
        unmapped(config.crops),
    )
    aug = [f.result() for f in futures]
    stages["augmentation"] = {
        "clusters": len(aug),
        "augmented_clusters": sum(a["status"] == "augmented" for a in aug),
        "originals": sum(a["originals"] for a in aug),
        "total": sum(a["total"] for a in aug),
        **{f"crops_{k}": sum(a.get("crops", {}).get(k, 0) for a in aug) for k in config.crops.kinds},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    timed("captions", run_heavy, caption_flow, "caption", {"workspace": workspace, "config": config}, config)
    if config.tags.uses_tags:
        report_tags_task(workspace)  # the cluster report gains each character's top and core tags
    pkg = timed("packaging", package_task, workspace, config.packaging, config.training)
    stages["packaging"]["low_resolution"] = len(pkg.get("low_resolution", []))
    for item in pkg.get("low_resolution", []):
        log.warning(f"left out of the training data: {item['path']}: {item['problem']}")
    report = timed("validation", validate_task, workspace, config.packaging.min_resolution)
    stages["validation"]["resolution_too_low"] = report.get("issue_counts", {}).get("Resolution too low", 0)
    if config.backgrounds.enabled:
        timed(
            "backgrounds", backgrounds_task, workspace, config.backgrounds, config.packaging, config.embedding
        )
    if not report.get("passed", False):
        log.error(f"training data did not validate; training will not start. Report: {report['report']}")
    stages = {name: scalars(figs) for name, figs in stages.items()}
    stages["packaging"]["commands"] = pkg.get("commands", [])
    return {**stages, "steps": _rerun_steps(stages, steps)}


def discard_other_build(ws: Workspace, episode_ids: list[str]) -> bool:
    """Remove the clusters and everything built from them when they cover other episodes.

    What a retry calls when an earlier attempt of the same run built them (``rebuild_clusters``):
    assigning the new episodes to those clusters, or resuming augmentation and packaging from
    them, would not give what a fresh run gives. Review edits (``review/edits.jsonl``) are kept.

    Returns:
        Whether anything was removed.
    """
    doc = clustering.read_clusters(ws)
    if doc is None or {m["episode_id"] for m in doc["members"]} == set(episode_ids):
        return False
    built = (
        ws.character_clusters,
        ws.reviewed_clusters,
        ws.analysis_dir,
        ws.augmented_clusters,
        ws.training_data,
    )
    for path in built:
        shutil.rmtree(path, ignore_errors=True)
    ws.selection_file.unlink(missing_ok=True)
    return True


def _rerun_steps(stages: dict[str, Any], cached_steps: list[dict]) -> list[dict]:
    """The reuse record of a dataset build: the content-keyed steps as they came back, then every
    stage that ran again (each skips the work its outputs already show done)."""
    mode = stages.get("clustering", {}).get("mode")
    again = [
        step_record(name, None, False, f"mode {mode}" if name == "clustering" else "skips what is on disk")
        for name in stages
        if name != "embedding"
    ]
    return [*cached_steps, *again]
