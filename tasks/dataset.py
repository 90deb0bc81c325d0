"""Dataset tasks: augmentation, captions, kohya packaging, validation, backgrounds."""

from __future__ import annotations

from prefect import get_run_logger, task

from tasks.common import IO_RETRIES, IO_RETRY_DELAYS, stage_lease
from yokai_pipeline import (
    augmentation,
    backgrounds,
    captioning,
    clustering,
    crops,
    edits,
    kohya,
    tagging,
    validation,
)
from yokai_pipeline.config import (
    AugmentConfig,
    BackgroundConfig,
    CaptionConfig,
    CropConfig,
    EmbeddingConfig,
    PackagingConfig,
    TagConfig,
    TrainingConfig,
)
from yokai_pipeline.fsio import read_json
from yokai_pipeline.workspace import Workspace


@task(
    name="augment-cluster",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    task_run_name="augment-{folder}",
)
def augment_task(
    workspace: str, folder: str, cfg: AugmentConfig, symmetric: bool, crop: CropConfig | None = None
) -> dict:
    """Augment one small cluster (or copy it unchanged when outside min/max), then add its 3-stage crops."""
    ws = Workspace(workspace)
    src, dest = edits.dataset_clusters(ws) / folder, ws.augmented_clusters / folder
    res = augmentation.augment_cluster(src, dest, cfg, symmetric=symmetric)
    made = None
    if crop is not None and crop.enabled:
        made = crops.crop_cluster(src, dest, crops.layer_rows(ws.layered_frames / "manifests"), crop)
        for f in made["failed"]:
            get_run_logger().warning(f"{folder}: no crop of {f['name']}: {f['problem']}")
    get_run_logger().info(
        f"{folder}: {res['originals']} originals -> {res['total']} images ({res['status']})"
        + (f"; crops {made['counts']}" if made else "")
    )
    out = {k: v for k, v in res.items() if k != "config"}
    return {**out, "crops": made["counts"]} if made else out


@task(name="tag-cluster", tags=["gpu"], retries=1, retry_delay_seconds=5, task_run_name="tag-{folder}")
def tag_task(workspace: str, folder: str, cfg: TagConfig) -> dict:
    """Tag one cluster folder (a sidecar per image); images with current tags are skipped."""
    ws = Workspace(workspace)
    meta = tagging.layer_meta(ws.layered_frames / "manifests") if cfg.backend == "offline" else None
    with stage_lease(cfg.device, uses_gpu=cfg.backend != "offline") as lease:
        leased = cfg.model_copy(update={"device": lease.resolve(cfg.device)})
        res = tagging.tag_folder(ws.augmented_clusters / folder, leased, meta=meta)
    get_run_logger().info(
        f"{folder}: {res['tagged']} tagged, {res['skipped']} already had tags; core tags: "
        + (", ".join(res["core_tags"]) or "none")
    )
    return res


@task(
    name="caption-cluster", tags=["gpu"], retries=1, retry_delay_seconds=5, task_run_name="caption-{folder}"
)
def caption_task(
    workspace: str,
    folder: str,
    cfg: CaptionConfig,
    trigger: str,
    char_type: str,
    tags: TagConfig | None = None,
) -> dict:
    """Caption one cluster folder; images that already have a caption are skipped."""
    ws = Workspace(workspace)
    with stage_lease(cfg.device, uses_gpu=cfg.backend != "offline") as lease:
        leased = cfg.model_copy(update={"device": lease.resolve(cfg.device)})
        res = captioning.caption_folder(
            ws.augmented_clusters / folder, leased, trigger=trigger, char_type=char_type, tags=tags
        )
    get_run_logger().info(f"{folder}: {res['captioned']} captioned, {res['skipped']} already had one")
    return res


@task(name="package-kohya", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def package_task(workspace: str, cfg: PackagingConfig, training: TrainingConfig | None = None) -> dict:
    """Lay out kohya folders, dataset and training TOMLs and sample prompts per character."""
    ws = Workspace(workspace)
    sel = read_json(ws.selection_file)
    ana_path = ws.analysis_dir / "cluster_analysis.json"
    summary = kohya.prepare_training_data(
        ws.augmented_clusters,
        ws.training_data / "characters",
        sel,
        cfg,
        analysis=read_json(ana_path) if ana_path.exists() else None,
        models_dir=ws.trained_models,
        training=training,
    )
    get_run_logger().info("\n" + kohya.format_preparation_summary(summary))
    return summary


@task(name="validate-kohya")
def validate_task(workspace: str, min_resolution: int) -> dict:
    """Check every image/caption pair and config; the report lands in logs/validation_report.json."""
    ws = Workspace(workspace)
    report = validation.validate_training_data(
        ws.training_data / "characters",
        min_resolution=min_resolution,
        report_path=ws.validation_report,
    )
    get_run_logger().info("\n" + validation.format_validation_summary(report))
    return {**report, "report": str(ws.validation_report)}


@task(name="prepare-backgrounds", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def backgrounds_task(
    workspace: str, cfg: BackgroundConfig, packaging: PackagingConfig, embedding: EmbeddingConfig
) -> dict:
    """Deduplicate (with the configured embedder: CLIP where configured) and package background layers."""
    ws = Workspace(workspace)
    summary = backgrounds.prepare_backgrounds(
        ws.layered_frames / "background",
        ws.training_data / "backgrounds",
        cfg,
        embed_fn=backgrounds.configured_embed_fn(embedding),
        packaging=packaging,
        models_dir=ws.trained_models,
    )
    get_run_logger().info("\n" + backgrounds.format_background_summary(summary))
    return summary


def selected_folders(workspace: str) -> list[dict]:
    """(folder, cluster, name, trigger, type) of each selected cluster, from selection.json."""
    sel = read_json(Workspace(workspace).selection_file)
    return [
        {
            "folder": clustering.folder_name(c["cluster"]),
            "cluster": c["cluster"],
            "name": c["name"],
            "trigger": c["trigger"],
            "type": c.get("type", "unknown"),
        }
        for c in sel["characters"]
    ]
