"""Frame extraction task."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.common import IO_RETRIES, IO_RETRY_DELAYS, content_cache
from yokai_pipeline import frames
from yokai_pipeline.config import FramesConfig
from yokai_pipeline.progress import reporter
from yokai_pipeline.workspace import Workspace


@task(
    name="extract-frames",
    tags=["io"],
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=lambda task, run, state: not _is_bad_input(state),
    cache_policy=content_cache("video", "reference_manifests", modules=(frames,)),
    persist_result=True,
    task_run_name="extract-frames-{episode_id}",
)
def extract_frames_task(
    video: str, workspace: str, cfg: FramesConfig, reference_manifests: list[str], episode_id: str
) -> dict:
    """Decode one episode, detect shots, keep sharp non-duplicate frames."""
    log = get_run_logger()
    refs: list[str] = []
    for m in reference_manifests:
        refs.extend(frames.read_frame_hashes(m))
    stats = frames.extract_frames(
        Path(video),
        Workspace(workspace),
        cfg,
        reference_hashes=refs,
        progress=reporter(f"frames {episode_id}", log.info),
    )
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
