"""Run summary and quality evaluation against ground truth."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from yokai_pipeline import summary as summary_lib
from yokai_pipeline.workspace import Workspace


@task(name="evaluate-quality")
def evaluate_task(workspace: str, episode_ids: list[str], ground_truth_dir: str) -> dict:
    """Quality figures against the sample series' ground truth."""
    return summary_lib.evaluate_quality(Workspace(workspace), episode_ids, Path(ground_truth_dir))


@task(name="write-summary")
def write_summary_task(
    workspace: str,
    episodes: list[dict],
    failed: list[dict],
    quality: dict,
    seconds: float,
    stages: dict | None = None,
    problems: list[str] | None = None,
    reuse: dict | None = None,
) -> dict:
    """Write summary.json and publish it as a Prefect artifact."""
    summary = summary_lib.build_summary(episodes, failed, quality, seconds, stages)
    summary["problems"] = problems or []
    summary["reuse"] = reuse or {"reused": [], "recomputed": []}
    summary_lib.write_summary(Workspace(workspace), summary)
    create_markdown_artifact(
        summary_lib.summary_markdown(summary), key="yokai-summary", description="Pipeline run summary"
    )
    return summary
