"""The full pipeline over a folder of episodes: episode flows, then the dataset flow."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dataset import dataset_flow
from flows.episode import episode_flow
from flows.heavy import run_heavy_state, run_subflow, step_record
from flows.training import training_flow
from tasks.common import run_bounded, synced_flow
from tasks.report import evaluate_task, write_summary_task
from yokai_pipeline import clustering
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.errors import YokaiError
from yokai_pipeline.frames import episode_id_for
from yokai_pipeline.fsio import atomic_write_json, read_json, remove_stale_temps
from yokai_pipeline.workspace import Workspace

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".ts"}


class EpisodesFailed(YokaiError):
    """Some episodes failed; the others finished and the summary lists both."""


def list_episodes(episodes_dir: str | Path) -> list[Path]:
    """Video files directly inside ``episodes_dir``, sorted by name.

    Raises:
        YokaiError: the folder is missing, or two videos would share one episode id (``ep01.mp4``
            and ``ep01.mkv``: one workspace folder, the second deduplicated against the first).
    """
    folder = Path(episodes_dir)
    if not folder.is_dir():
        raise YokaiError(f"{folder}: episodes folder does not exist")
    videos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    by_id: dict[str, list[str]] = {}
    for video in videos:
        by_id.setdefault(episode_id_for(video), []).append(video.name)
    clashes = {ep: names for ep, names in by_id.items() if len(names) > 1}
    if clashes:
        detail = "; ".join(f"{' and '.join(names)} -> {ep!r}" for ep, names in sorted(clashes.items()))
        raise YokaiError(f"{folder}: videos would share an episode id ({detail}); rename or move one of each")
    return videos


def _state_error(state) -> str:
    """The error a failed flow state carries (the episode's own message, naming the file)."""
    try:
        state.result()
    except Exception as exc:
        return str(exc)
    return state.message or "failed"


# No cache: the episode flow runs on every call and every retry; its content-keyed tasks decide
# what is reused (a completed run-episode taken back on a retry would skip a changed video).
def clusters_are_this_runs(ws: Workspace) -> bool:
    """Whether clusters.json was written by an earlier attempt of this flow run (then a retry
    clusters from scratch, so its clusters equal a fresh run's on the episodes it now has).

    The first attempt records whether clusters existed before it; a later run of the pipeline
    (another flow run) keeps adding episodes to the existing clusters, as documented.
    """
    from prefect.runtime import flow_run

    record_path = ws.root / "dataset_run.json"
    record = read_json(record_path) if record_path.is_file() else {}
    if record.get("flow_run_id") != str(flow_run.id):
        record = {"flow_run_id": str(flow_run.id), "clusters_before": clustering.clusters_file(ws).is_file()}
        atomic_write_json(record_path, record)
    return not record["clusters_before"]


def reuse_lists(steps: list[dict]) -> dict[str, list[str]]:
    """The summary's ``reuse``: steps taken from the cache (an earlier run or attempt) vs computed."""
    out: dict[str, list[str]] = {"reused": [], "recomputed": []}
    for s in steps:
        label = " ".join(filter(None, [s["step"], s.get("episode")])) + (
            f" ({s['detail']})" if s.get("detail") else ""
        )
        out["reused" if s["reused"] else "recomputed"].append(label)
    return out


@task(name="run-episode", task_run_name="run-episode-{episode_name}", cache_policy=NO_CACHE)
def episode_task(video: str, workspace: str, config: PipelineConfig, episode_name: str = "") -> dict:
    """One episode flow run; a task so that several run at once under a bounded runner."""
    return run_subflow(episode_flow, "episode", {"video": video, "workspace": workspace, "config": config})


def build_and_train(
    workspace: str, config: PipelineConfig, episode_ids: list[str], evidence_steps: int | None
) -> tuple[dict, list[dict], list[str]]:
    """The dataset flow over the finished episodes, then training if enabled and validated.

    Returns:
        The stage figures, the steps for the summary's reuse lists, and the problems found.
    """
    ws = Workspace(workspace)
    stages: dict = {}
    steps: list[dict] = []  # the dataset and training steps, for the summary's reuse lists
    problems: list[str] = []
    if episode_ids:
        params = {
            "workspace": workspace,
            "config": config,
            "episode_ids": episode_ids,
            "rebuild_clusters": clusters_are_this_runs(ws),
        }
        try:
            stages = run_subflow(dataset_flow, "dataset", params)
            steps = stages.pop("steps", [])
        except Exception as exc:  # the dataset's own error, shown in the summary
            problems.append(f"dataset flow: {exc}")
    validated = stages.get("validation", {}).get("passed", False)
    if config.training.enabled and "packaging" in stages and not validated:
        # the guide: validate to 100% first; training on invalid data wastes GPU hours
        problems.append(
            f"training not started: the training data failed validation. Report: {ws.validation_report}"
        )
    elif config.training.enabled and "packaging" in stages:
        params = {"workspace": workspace, "config": config, "evidence_steps": evidence_steps}
        tr = run_heavy_state(training_flow, "training", params, config)
        steps.append(step_record("training", None, False, "finished characters skipped"))
        if tr["ok"]:
            stages["training"] = tr["result"]
        else:
            problems.append(f"training: {tr['error']}")
    return stages, steps, problems


@flow(name="yokai-pipeline", persist_result=True)
@synced_flow()  # an s3:// workspace: pulled first, published at the end
def pipeline_flow(
    episodes_dir: str,
    workspace: str,
    config: PipelineConfig = PipelineConfig(),  # noqa: B008
    ground_truth_dir: str | None = None,
    evidence_steps: int | None = None,
) -> dict:
    """Run every episode in ``episodes_dir`` through the pipeline into ``workspace``.

    A bad episode fails alone: the others finish, then the run reports the failures.

    Args:
        episodes_dir: folder of episode videos (mp4, mkv, webm, mov, avi, ...).
            The orchestration settings' episode concurrency says how many run at a time.
        workspace: run workspace folder (outputs, manifests, caches); created if missing.
        config: pipeline configuration (backends, stage settings, orchestration).
        ground_truth_dir: ground-truth folder of the built-in sample series, for quality figures.
        evidence_steps: sampling steps for the checkpoint evidence images (None: each prompt's own).
    """
    log = get_run_logger()
    ws = Workspace(workspace)
    ws.root.mkdir(parents=True, exist_ok=True)
    swept = remove_stale_temps(ws.root)  # temporaries of killed writers only; live runs' are kept
    if swept:
        log.info(f"removed {swept} temporary files left by an interrupted run")
    atomic_write_json(ws.root / "config.json", config.model_dump(mode="json"))
    videos = list_episodes(episodes_dir)
    log.info(f"{len(videos)} episodes in {episodes_dir}")
    t0 = time.perf_counter()

    done: list[dict] = []
    failed: list[dict] = []
    at_once = config.orchestration.episodes_at_once()
    log.info(f"processing {min(at_once, len(videos))} episode(s) at a time")
    calls = [
        {"video": str(v), "workspace": workspace, "config": config, "episode_name": v.name} for v in videos
    ]
    for video, fut in zip(videos, run_bounded(episode_task, calls, at_once), strict=True):
        if fut.state.is_completed():
            done.append(fut.result())
        else:
            message = _state_error(fut.state)
            log.error(f"episode {video.name} failed: {message}")
            failed.append({"episode": video.name, "error": message})

    stages, steps, problems = build_and_train(
        workspace, config, [d["episode_id"] for d in done], evidence_steps
    )
    quality = (
        evaluate_task(workspace, [d["episode_id"] for d in done], ground_truth_dir)
        if ground_truth_dir
        else {}
    )
    seconds = round(time.perf_counter() - t0, 3)
    reuse = reuse_lists([s for d in done for s in d.get("steps", [])] + steps)
    summary = write_summary_task(workspace, done, failed, quality, seconds, stages, problems, reuse)
    if failed or problems:
        raise EpisodesFailed(
            "; ".join([f"{f['episode']}: {f['error']}" for f in failed] + problems)
            + f" ({len(failed)} of {len(videos)} episodes failed)"
        )
    return summary
