"""Frame extraction task."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.common import IO_RETRIES, IO_RETRY_DELAYS, content_cache
from yokai_pipeline import frames, layering
from yokai_pipeline.config import FramesConfig
from yokai_pipeline.fsio import atomic_write_json
from yokai_pipeline.progress import reporter
from yokai_pipeline.workspace import Workspace


@task(
    name="extract-frames",
    tags=["io"],
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=lambda task, run, state: not _is_bad_input(state),
    cache_policy=content_cache("video", modules=(frames,)),
    persist_result=True,
    task_run_name="extract-frames-{episode_id}",
)
def extract_frames_task(video: str, workspace: str, cfg: FramesConfig, episode_id: str) -> dict:
    """Decode one episode, detect shots, keep sharp frames that are not duplicates within it."""
    log = get_run_logger()
    stats = frames.extract_frames(
        Path(video), Workspace(workspace), cfg, progress=reporter(f"frames {episode_id}", log.info)
    )
    if stats.get("decoder_note"):
        log.warning(stats["decoder_note"])
    log.info(
        f"{episode_id}: kept {stats.get('kept')} frames from {stats.get('decoded')} decoded, {stats.get('shots')} shots"
    )
    return stats


def _is_bad_input(state) -> bool:
    """Don't retry input that is bad: retrying a corrupt file cannot help."""
    from yokai_pipeline.errors import BadInputError

    try:
        state.result()
    except BadInputError:
        return True
    except Exception:
        return False
    return False


# No cache: it reads every episode's manifest and is cheap (hash comparisons only).
@task(name="series-dedup")
def series_dedup_task(workspace: str, episode_ids: list[str], cfg: FramesConfig) -> dict:
    """Drop the frames (and their layers) that repeat a frame of an earlier episode (the opening)."""
    ws = Workspace(workspace)
    res = frames.dedup_series(ws, episode_ids, cfg.dedup_hamming)
    layers = [layering.apply_series_dedup(ws, ep, res["dropped"][ep]) for ep in res["order"]]
    atomic_write_json(ws.series_dedup_file, res)
    out = {
        "episodes": len(res["order"]),
        "kept_frames": res["kept"],
        "dropped_frames": res["dropped_frames"],
        "dropped_layers": sum(x["dropped_layers"] for x in layers),
    }
    get_run_logger().info(
        f"series dedup: {out['dropped_frames']} repeated frames ({out['dropped_layers']} layers) "
        f"dropped over {out['episodes']} episodes"
    )
    return out
