"""Training flow: one mapped LoRA training task per selected character, queued on the GPU slots."""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks.common import run_bounded, synced_flow
from tasks.training import evidence_task, train_task
from yokai_pipeline import validation
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.errors import YokaiError
from yokai_pipeline.fsio import read_json
from yokai_pipeline.runtime import device_slots
from yokai_pipeline.workspace import Workspace


def packaged_characters(workspace: str, only: list[str] | None = None) -> list[dict]:
    """(name, config) of every character packaged by the dataset flow."""
    path = Workspace(workspace).training_data / "characters" / "configs" / "preparation_summary.json"
    if not path.exists():
        raise YokaiError(f"{path}: no packaged characters; run the dataset flow first")
    chars = [{"name": c["name"], "config": c["config"]} for c in read_json(path)["characters"]]
    if only:
        missing = sorted(set(only) - {c["name"] for c in chars})
        if missing:
            raise YokaiError(f"characters not packaged: {', '.join(missing)}")
        chars = [c for c in chars if c["name"] in only]
    return chars


@flow(name="training", persist_result=True)
@synced_flow()
def training_flow(
    workspace: str,
    config: PipelineConfig = PipelineConfig(),  # noqa: B008
    evidence_steps: int | None = None,
) -> dict:
    """Train a LoRA for every packaged character; a failing character fails alone.

    On a host, at most one training per device lease runs (the task runner is sized to the
    host's GPUs over ``training.gpus_per_run``, one on the CPU); cluster-wide the `gpu` tag's
    concurrency limit (one slot per GPU) queues the characters on the GPUs.
    """
    ws = Workspace(workspace)
    # the guide: validate to 100% first; raises naming the report when it failed or is missing
    validation.require_passed(ws.validation_report, ws.training_data / "characters")
    log = get_run_logger()
    cfg = config.training
    chars = packaged_characters(workspace, cfg.characters)
    slots = device_slots(cfg.gpus_per_run if cfg.backend == "kohya" else 1)
    calls = [{"config_file": c["config"], "name": c["name"], "cfg": cfg} for c in chars]
    futures = run_bounded(train_task, calls, slots)
    results, failed = {}, {}
    for char, fut in zip(chars, futures, strict=True):
        state = fut.state
        if state.is_completed():
            results[char["name"]] = fut.result()
        else:
            failed[char["name"]] = state.message or "failed"
            log.error(f"{char['name']}: training failed: {failed[char['name']]}")
    evidence = {}
    if cfg.evidence:
        done = [c for c in chars if c["name"] in results and results[c["name"]].get("status") != "stopped"]
        ev_calls = [
            {"config_file": c["config"], "name": c["name"], "cfg": cfg, "num_inference_steps": evidence_steps}
            for c in done
        ]
        ev = run_bounded(evidence_task, ev_calls, device_slots())
        evidence = {c["name"]: f.result()["html"] for c, f in zip(done, ev, strict=True)}
    summary = {
        "characters": len(chars),
        "finished": sum(r.get("status") in ("finished", "skipped") for r in results.values()),
        "stopped": sum(r.get("status") == "stopped" for r in results.values()),
        "failed": len(failed),
        "backend": cfg.backend,
        "evidence": evidence,
        "errors": failed,
        "runs": {n: r["run"] for n, r in results.items() if "run" in r},
    }
    if failed:
        raise YokaiError(f"training failed for {', '.join(sorted(failed))}: " + "; ".join(failed.values()))
    return summary
