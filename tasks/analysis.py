"""Cluster analysis and selection tasks."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from yokai_pipeline import analysis, augmentation, edits, selection, tagging
from yokai_pipeline.config import AnalysisConfig, EmbeddingConfig, SelectionConfig
from yokai_pipeline.workspace import Workspace


@task(name="analyze-clusters", tags=["cpu"])
def analyze_task(workspace: str, cfg: AnalysisConfig, embedding: EmbeddingConfig) -> dict:
    """Quality, tiers and types per cluster; JSON + HTML report + a Prefect artifact."""
    ws = Workspace(workspace)
    type_backend = "clip" if embedding.backend == "clip" else "offline"
    result = analysis.analyze_clusters(
        edits.dataset_clusters(ws), cfg, type_backend=type_backend, clip_cfg=embedding
    )
    attrs = edits.review_attributes(ws)
    result = edits.apply_to_analysis(result, attrs)
    json_path, html_path = analysis.write_analysis(
        result,
        ws.analysis_dir / "cluster_analysis.json",
        ws.analysis_dir / "cluster_analysis.html",
        names=edits.display_names(attrs),
    )
    log = get_run_logger()
    log.info("\n" + analysis.format_summary(result))
    create_markdown_artifact(
        analysis.analysis_markdown(result, html_path.as_uri() if html_path else ""),
        key="cluster-analysis",
        description="Clusters by tier, with a link to the HTML report",
    )
    return {"summary": result["summary"], "json": str(json_path), "html": str(html_path)}


@task(name="report-tags")
def report_tags_task(workspace: str) -> dict:
    """Re-render the cluster report with each tagged character's top and core tags."""
    ws = Workspace(workspace)
    tags = tagging.cluster_tag_summaries(ws.augmented_clusters)
    json_path = ws.analysis_dir / "cluster_analysis.json"
    if not tags or not json_path.is_file():
        return {"clusters": 0}
    sel = augmentation.read_selection(ws.selection_file) if ws.selection_file.is_file() else {}
    result = analysis.read_analysis(json_path)
    names = {cid: c.get("name") for cid, c in sel.items() if c.get("name")}
    # The analysis keeps the display name a reviewer gave; selection.json holds its folder-safe form.
    names.update({c["id"]: c["name"] for c in result.get("clusters", []) if c.get("name")})
    analysis.write_analysis(result, json_path, ws.analysis_dir / "cluster_analysis.html", names, tags)
    return {"clusters": len(tags)}


@task(name="apply-review-edits")
def review_task(workspace: str, link_mode: str = "hardlink") -> dict:
    """Apply the review edit log to the clusters: reviewed_clusters/ for the dataset stages."""
    stats = edits.write_reviewed_clusters(Workspace(workspace), link_mode)
    log = get_run_logger()
    log.info(f"review: {stats['edits']} edits applied over {stats['clusters']} clusters")
    if stats["skipped_edits"]:
        log.warning(f"review: {stats['skipped_edits']} edits no longer fit the clusters and were skipped")
    return stats


@task(name="select-characters")
def select_task(workspace: str, cfg: SelectionConfig) -> dict:
    """Pick the clusters to train from the analysis and the review edits; save selection.json."""
    ws = Workspace(workspace)
    result = analysis.read_analysis(ws.analysis_dir / "cluster_analysis.json")
    sel = edits.select_with_edits(result, cfg, edits.review_attributes(ws))
    selection.write_selection(ws.selection_file, sel)
    names = ", ".join(f"{c['name']} ({c['tier']}, {c['images']})" for c in sel["characters"])
    get_run_logger().info(f"selected {len(sel['characters'])} characters: {names}")
    return sel
