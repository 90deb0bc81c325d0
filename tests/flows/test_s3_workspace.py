"""The pipeline on an s3:// workspace (SeaweedFS): the local run's datasets, and a re-run on another
machine resumes from what the failed run had published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yokai_pipeline import synthetic
from yokai_pipeline.config import PipelineConfig


def _config(endpoint: str) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "seed": 0,
            # every tier, so augmentation, captions and packaging run on the short series; its
            # layers are far below the guide's 512 px minimum: packaged as they are (upscaling them
            # was the slowest stage here and is the same on a local and an s3:// workspace)
            "selection": {"tiers": ["S", "A", "B", "C", "D"]},
            "packaging": {"min_resolution": 0},
            # kept short for a 2-core CI machine: no layering worker processes, no background set
            "layering": {"worker_processes": False},
            "backgrounds": {"enabled": False},
            "storage": {"endpoint_url": endpoint, "region": "us-east-1", "max_attempts": 2},
        }
    )


def _members(clusters: dict) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for m in clusters["members"]:
        out.setdefault(int(m["cluster"]), []).append(m["path"])
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.slow
def test_s3_workspace_builds_the_local_datasets_and_resumes_elsewhere(
    prefect_harness, s3_server, tmp_path, monkeypatch
):
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    import flows.dataset
    from flows.pipeline import pipeline_flow

    series = synthetic.generate_series(tmp_path / "series", seed=0, episodes=2, seconds=6.0)
    episodes = str(Path(series.episodes[0]).parent)
    cfg = _config(s3_server.endpoint_url)
    local_ws = tmp_path / "local"
    pipeline_flow(episodes, str(local_ws), cfg)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    bucket = s3_server.new_bucket("run")
    url = f"s3://{bucket}/shows/sample"
    store = s3_server.storage(bucket, "shows/sample")

    # machine A: the dataset flow dies after clustering (the review step fails)
    def broken_review(*args, **kwargs):
        raise RuntimeError("injected: machine A lost mid dataset flow")

    monkeypatch.setenv("YOKAI_SCRATCH", str(tmp_path / "machine-a"))
    with monkeypatch.context() as m:
        m.setattr(flows.dataset, "review_task", broken_review)
        state = pipeline_flow(episodes, url, cfg, return_state=True)
    assert not state.is_completed()
    first = {i.key: i for i in store.list()}
    assert "character_clusters/clusters.json" in first, "clustering finished before the fault: published"
    assert "layered_frames/manifests/ep01.jsonl" in first and "layered_frames/manifests/ep02.jsonl" in first
    assert not any(k.startswith("training_data/") for k in first)
    assert not any(k.startswith((".locks/", ".yokai-sync/", ".prefect/")) or "/.tmp-" in k for k in first)

    # machine B: an empty scratch folder; Prefect's task cache is bypassed, so only the pulled
    # outputs can tell the stages they are done
    monkeypatch.setenv("YOKAI_SCRATCH", str(tmp_path / "machine-b"))
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
        summary = pipeline_flow(episodes, url, cfg)
    assert all(ep["frames"]["skipped"] for ep in summary["per_episode"]), summary["per_episode"]
    # the published clusters were found (a fresh workspace clusters in "full" mode)
    assert summary["stages"]["clustering"]["mode"] in ("unchanged", "incremental")
    final = {i.key: i for i in store.list()}
    episode_keys = [k for k in first if k.startswith("episodes/")]
    assert episode_keys and all(final[k].etag == first[k].etag for k in episode_keys)
    assert all(final[k].mtime == first[k].mtime for k in episode_keys), "frames were not uploaded again"

    # the same datasets as the local workspace: kohya folders and cluster members
    local_files = sorted(
        p.relative_to(local_ws).as_posix() for p in (local_ws / "training_data").rglob("*") if p.is_file()
    )
    s3_files = sorted(k for k in final if k.startswith("training_data/"))
    assert s3_files == local_files and any(k.endswith(".txt") for k in s3_files)
    local_clusters = json.loads((local_ws / "character_clusters" / "clusters.json").read_text())
    s3_clusters = json.loads(store.get_bytes("character_clusters/clusters.json"))
    assert _members(s3_clusters) == _members(local_clusters)
    assert json.loads(store.get_bytes("summary.json"))["episodes"]["failed"] == []
