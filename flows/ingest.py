"""Scheduled ingest: new episodes in the inbox -> one episode run each -> incremental dataset update.

The inbox is a folder or an ``s3://bucket/prefix``; the workspace is a local (or shared) folder
that also keeps the ingest registry and the claim files (``yokai_pipeline.ingest``). Episodes
are identified by content hash and claimed exclusively before their run, so two overlapping
ingest runs never process one twice; a failed episode run gives its claim back, so the next
scheduled run offers it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.dataset import dataset_flow, processed_episodes
from flows.episode import episode_flow
from flows.heavy import run_heavy
from flows.pipeline import EpisodesFailed
from tasks.common import IO_RETRIES, IO_RETRY_DELAYS, run_bounded
from yokai_pipeline import ingest
from yokai_pipeline.config import PipelineConfig, StorageConfig
from yokai_pipeline.errors import ConfigError
from yokai_pipeline.storage import Storage, open_storage
from yokai_pipeline.workspace import Workspace


def open_inbox(inbox: str, cfg: StorageConfig) -> Storage:
    """The inbox as a Storage; S3 keys from the configured Prefect block, else the environment."""
    credentials = None
    if inbox.startswith("s3://") and cfg.credentials_block:
        from prefect.blocks.core import Block

        credentials = Block.load(f"aws-credentials/{cfg.credentials_block}")
    return (
        open_storage(inbox, cfg, credentials=credentials)
        if inbox.startswith("s3://")
        else open_storage(inbox)
    )


# No cache: every scan must look at the inbox as it is now.
@task(name="scan-inbox", tags=["io"], retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def scan_inbox_task(inbox: str, workspace: str, storage: StorageConfig, stable_seconds: float) -> list[dict]:
    """List the inbox's complete videos that no run has taken yet."""
    found = ingest.scan_inbox(open_inbox(inbox, storage), state=workspace, stable_seconds=stable_seconds)
    return [ep.to_dict() for ep in found]


@task(name="claim-episode", tags=["io"], retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def claim_episode_task(workspace: str, episode: dict) -> bool:
    """Take one episode for this run (False: another run already has it)."""
    return ingest.claim_episode(
        workspace, episode["sha256"], episode_id=episode["episode_id"], source=episode["source"]
    )


@task(name="fetch-episode", tags=["io"], retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def fetch_episode_task(inbox: str, workspace: str, storage: StorageConfig, episode: dict) -> str:
    """A local video for the episode, named by its episode id."""
    new = ingest.NewEpisode(**episode)
    return str(ingest.fetch_episode(new, open_inbox(inbox, storage), Path(workspace) / "ingest" / "videos"))


@task(name="finish-episode", tags=["io"], retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def finish_episode_task(workspace: str, episode: dict, ok: bool) -> None:
    """Mark the episode done, or give its claim back so the next scan retries it."""
    if ok:
        ingest.mark_done(workspace, episode["sha256"], episode["episode_id"])
    else:
        ingest.release_claim(workspace, episode["sha256"])


@task(name="ingest-episode")
def ingest_episode_task(inbox: str, workspace: str, config: PipelineConfig, episode: dict) -> dict[str, Any]:
    """Claim, fetch and process one new episode; ``status`` done, skipped or failed (never raises)."""
    if not claim_episode_task(workspace, episode):
        # An overlapping ingest run took it between our scan and our claim.
        return {"status": "skipped", "episode_id": episode["episode_id"]}
    ok = False
    try:
        video = fetch_episode_task(inbox, workspace, config.storage, episode)
        run_heavy(episode_flow, "episode", {"video": video, "workspace": workspace, "config": config}, config)
        ok = True
        return {"status": "done", "episode_id": episode["episode_id"]}
    except Exception as exc:  # one bad episode must not stop the others
        get_run_logger().error(f"episode {episode['key']} failed: {exc}")
        return {
            "status": "failed",
            "episode": episode["key"],
            "episode_id": episode["episode_id"],
            "error": str(exc),
        }
    finally:
        finish_episode_task(workspace, episode, ok)


@flow(name="ingest", persist_result=True)
def ingest_flow(
    inbox: str,
    workspace: str,
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - pydantic default renders as the UI form
    stable_seconds: float = 30.0,
) -> dict:
    """Process each new, completely written inbox episode once, then update the dataset.

    Args:
        inbox: folder or s3://bucket/prefix where new episode videos are dropped.
        workspace: run workspace folder (also keeps the ingest registry and claims).
        config: pipeline configuration.
        stable_seconds: a video is taken only once its size and mtime/ETag have not changed for
            this long (files still being copied or uploaded are left for a later run).
    """
    log = get_run_logger()
    if Workspace(workspace).remote is not None:
        # the registry and claims are local files with O_EXCL / flock semantics, not S3 objects
        raise ConfigError(
            f"workspace {workspace}: the ingest flow needs a local or shared-file-system workspace; "
            "run `yokai run` / the pipeline flow for an s3:// workspace"
        )
    Path(workspace).mkdir(parents=True, exist_ok=True)
    new = scan_inbox_task(inbox, workspace, config.storage, stable_seconds)
    log.info(f"{len(new)} new complete episode(s) in {inbox}")

    calls = [{"inbox": inbox, "workspace": workspace, "config": config, "episode": e} for e in new]
    outcomes = [
        f.result() for f in run_bounded(ingest_episode_task, calls, config.orchestration.episodes_at_once())
    ]
    done = [o["episode_id"] for o in outcomes if o["status"] == "done"]
    skipped = [o["episode_id"] for o in outcomes if o["status"] == "skipped"]
    failed = [
        {"episode": o["episode"], "episode_id": o["episode_id"], "error": o["error"]}
        for o in outcomes
        if o["status"] == "failed"
    ]

    dataset: dict = {}
    if done:
        episode_ids = sorted(set(processed_episodes(workspace)) | set(done))
        log.info(f"updating the dataset with {len(done)} new episode(s) ({len(episode_ids)} in all)")
        params = {
            "workspace": workspace,
            "config": config,
            "episode_ids": episode_ids,
            "full_recluster": False,
        }
        dataset = run_heavy(dataset_flow, "dataset", params, config)
    if failed:
        # After the dataset update, so the good episodes are not held back by a bad one.
        raise EpisodesFailed(
            f"{len(failed)} of {len(new)} new episodes failed (claims released for the next run): "
            + "; ".join(f"{f['episode']}: {f['error']}" for f in failed)
        )
    return {"new": [e["episode_id"] for e in new], "done": done, "skipped": skipped, "dataset": dataset}
