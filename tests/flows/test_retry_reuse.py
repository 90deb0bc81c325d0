"""Retrying a failed pipeline run through the deployments re-runs what changed (issue 21).

One real Prefect server, the deployments of prefect.yaml and one process worker on yokai-cpu
for every scenario: a run with a truncated episode fails, the episode is fixed, the run is
retried (what `prefect flow-run retry` and the UI's Retry button do: the same flow run set
back to Scheduled) and its datasets must equal those of a fresh run on the good episodes;
a workspace deleted and run again into the same path must come back whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from yokai_pipeline import synthetic

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.flows.server_fixtures"]
DEPLOYMENT = "yokai-pipeline/yokai-pipeline"
# Small synthetic layers: package them as they are (the guide's 512 px floor would drop them all),
# and every cluster of 5 or more, so that a few seconds of video give kohya folders to compare.
CONFIG = {
    "packaging": {"min_resolution": 0},
    "selection": {"tiers": ["S", "A", "B", "C", "D"], "min_images": 5},
    "orchestration": {"distributed": False},
}


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reuse_series")
    synthetic.generate_series(out, seed=0, episodes=3, seconds=5.0)
    return out / "episodes"


@pytest.fixture(scope="module")
def cpu_worker(prefect_server, deployed):
    from tests.flows.server_fixtures import CPU_POOL, start_worker

    if CPU_POOL not in prefect_server.workers:
        start_worker(prefect_server, CPU_POOL)
    return prefect_server


def _client(server):
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait(server, run_id, timeout: float = 420):
    """The flow run once it is in a final state."""
    from prefect.settings import temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings(updates=server.settings()), _client(server) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final() and run.state.name != "AwaitingRetry":
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {run_id} still {run.state} after {timeout} s")
            time.sleep(0.5)


def _start(server, episodes_dir: Path, workspace: Path):
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    params = {"episodes_dir": str(episodes_dir), "workspace": str(workspace), "config": CONFIG}
    with temporary_settings(updates=server.settings()):
        run = run_deployment(DEPLOYMENT, parameters=params, timeout=0)
    return _wait(server, run.id)


def _retry(server, run_id):
    """What `prefect flow-run retry <id>` does for a deployment's run (prefect/cli/flow_run.py)."""
    from prefect.settings import temporary_settings
    from prefect.states import Scheduled

    with temporary_settings(updates=server.settings()), _client(server) as client:
        client.set_flow_run_state(run_id, Scheduled(message="Retried via CLI"), force=True)
    return _wait(server, run_id)


def _logs(server) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in server.home.glob("worker-*.log"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def datasets(ws: Path) -> dict:
    """What the datasets consist of, independent of the workspace's path."""
    doc = json.loads((ws / "character_clusters" / "clusters.json").read_text())
    chars = ws / "training_data" / "characters"
    return {
        "members": sorted((m["episode_id"], m["layer_id"], m["cluster"]) for m in doc["members"]),
        "embeddings": {p.name: _sha(p) for p in sorted((ws / "embeddings").glob("*.npy"))},
        "kohya_files": sorted(
            str(p.relative_to(chars)) for p in chars.rglob("*") if p.is_file() and "configs" not in p.parts
        ),
        "captions": {str(p.relative_to(chars)): p.read_text() for p in sorted(chars.rglob("*.txt"))},
    }


def episode_files(ws: Path, episode_id: str) -> dict[str, int]:
    """mtime (ns) of every frame and layer file of one episode."""
    roots = [
        ws / "episodes" / episode_id,
        *(ws / "layered_frames" / k / episode_id for k in ("character", "background", "masks")),
    ]
    roots.append(ws / "layered_frames" / "episode_manifests" / f"{episode_id}.jsonl")
    files = [p for r in roots for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file()]
    return {str(p.relative_to(ws)): p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def fresh(cpu_worker, series, tmp_path_factory) -> tuple[Path, dict]:
    """A clean run on the three good episodes: the reference."""
    ws = tmp_path_factory.mktemp("reuse_fresh") / "ws"
    run = _start(cpu_worker, series, ws)
    assert run.state.is_completed(), f"{run.state}\n{_logs(cpu_worker)}"
    want = datasets(ws)
    assert all(want.values()), {k: len(v) for k, v in want.items()}  # something to compare
    return ws, want


def test_retry_after_fixing_an_episode_equals_a_fresh_run(cpu_worker, series, fresh, tmp_path):
    folder, ws = tmp_path / "episodes", tmp_path / "ws"
    folder.mkdir()
    for name in ("ep01.mp4", "ep03.mp4"):
        shutil.copy(series / name, folder / name)
    (folder / "ep02.mp4").write_bytes((series / "ep02.mp4").read_bytes()[:3000])  # cut short

    run = _start(cpu_worker, folder, ws)
    assert run.state.is_failed(), f"{run.state}\n{_logs(cpu_worker)}"
    assert "ep02.mp4" in run.state.message
    partial = datasets(ws)
    assert {m[0] for m in partial["members"]} == {"ep01", "ep03"}
    before = {e: episode_files(ws, e) for e in ("ep01", "ep03")}
    assert all(before.values())

    shutil.copy(series / "ep02.mp4", folder / "ep02.mp4")
    run = _retry(cpu_worker, run.id)
    assert run.state.is_completed() and run.run_count == 2, f"{run.state}\n{_logs(cpu_worker)}"

    got, want = datasets(ws), fresh[1]
    assert {m[0] for m in got["members"]} == {"ep01", "ep02", "ep03"}
    for key in ("members", "embeddings", "kohya_files", "captions"):
        assert got[key] == want[key], key
    # ep01 and ep03 were not recomputed: the same files, untouched
    for e in ("ep01", "ep03"):
        assert episode_files(ws, e) == before[e], e
    reuse = json.loads((ws / "summary.json").read_text())["reuse"]
    for e in ("ep01", "ep03"):
        assert f"extract-frames {e}" in reuse["reused"], reuse
        assert f"write-layer-manifest {e}" in reuse["reused"], reuse
        assert f"embed-layers {e}" in reuse["reused"], reuse
    assert "extract-frames ep02" in reuse["recomputed"] and "embed-layers ep02" in reuse["recomputed"], reuse
    assert any(r.startswith("clustering (mode full)") for r in reuse["recomputed"]), reuse


def test_deleted_workspace_run_again_recomputes_and_matches(cpu_worker, series, fresh):
    """The Prefect results live in the worker's store, outside the workspace: the cached
    steps' files are gone, and the run must compute them again rather than come back Cached."""
    ws, want = fresh
    shutil.rmtree(ws)
    run = _start(cpu_worker, series, ws)
    assert run.state.is_completed(), f"{run.state}\n{_logs(cpu_worker)}"
    assert datasets(ws) == want
    reuse = json.loads((ws / "summary.json").read_text())["reuse"]
    for e in ("ep01", "ep02", "ep03"):
        assert f"extract-frames {e}" in reuse["recomputed"], reuse
        assert f"embed-layers {e}" in reuse["recomputed"], reuse


def _start_ingest(server, inbox: Path, workspace: Path):
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    params = {"inbox": str(inbox), "workspace": str(workspace), "config": CONFIG, "stable_seconds": 0}
    with temporary_settings(updates=server.settings()):
        run = run_deployment("ingest/yokai-ingest", parameters=params, timeout=0)
    return _wait(server, run.id)


def test_ingest_takes_an_episode_fixed_in_the_inbox(cpu_worker, series, tmp_path):
    """An episode that failed in one ingest run and was fixed in the inbox joins the dataset
    in a later run (a new content hash: a new episode for the registry)."""
    from yokai_pipeline.ingest import load_registry

    inbox, ws = tmp_path / "inbox", tmp_path / "ws"
    inbox.mkdir()
    shutil.copy(series / "ep01.mp4", inbox / "ep01.mp4")
    (inbox / "ep02.mp4").write_bytes((series / "ep02.mp4").read_bytes()[:3000])
    run = _start_ingest(cpu_worker, inbox, ws)
    assert run.state.is_failed() and "ep02" in run.state.message, f"{run.state}\n{_logs(cpu_worker)}"
    assert {m[0] for m in datasets(ws)["members"]} == {"ep01"}

    shutil.copy(series / "ep02.mp4", inbox / "ep02.mp4")
    run = _start_ingest(cpu_worker, inbox, ws)
    assert run.state.is_completed(), f"{run.state}\n{_logs(cpu_worker)}"
    episodes = load_registry(ws)["episodes"]
    fixed = episodes[_sha(series / "ep02.mp4")]  # the fixed file, by its content
    # its id differs from the failed upload's (``ep02`` stays with that content hash)
    assert fixed["status"] == "done" and fixed["episode_id"].startswith("ep02"), episodes
    ep = fixed["episode_id"]
    got = datasets(ws)
    assert {m[0] for m in got["members"]} == {"ep01", ep}
    assert f"{ep}.npy" in got["embeddings"]
    assert any(f"_{ep}_" in f for f in got["kohya_files"]), got["kohya_files"]
    assert sorted(r["status"] for r in episodes.values()) == ["done", "done", "released"], episodes


def _flow_run_pids(flow_run_id) -> list[int]:
    """The process running a flow run (found by the flow-run id in its environment) and its children."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _wait_for_worker_report(log: Path, offset: int, timeout: float = 120) -> None:
    """Until the worker logs about the killed run (its lines written after ``offset``).

    The worker proposes Crashed after the runner did; Prefect refuses a crash report for a run
    already in a final state and says nothing of it, so "Reported flow run ... as crashed" comes
    from the worker only when it won the race. Either way it then logs the exit code's advice
    (prefect.workers.base): the first worker line since the kill means it is done with the run.
    Waiting for the "Reported" line alone ran into the timeout on every run (120 s).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with log.open("rb") as f:
            f.seek(offset)
            if b"prefect.flow_runs.worker - " in f.read():
                return
        time.sleep(0.5)
    print(f"the worker logged nothing about the killed run in {timeout} s")


def test_killed_mid_episode_crashes_and_the_retry_equals_a_clean_run(cpu_worker, series, fresh, tmp_path):
    import os
    import signal

    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    from tests.flows.server_fixtures import CPU_POOL
    from tests.reliability.conftest import leftovers

    ws = tmp_path / "ws"
    params = {"episodes_dir": str(series), "workspace": str(ws), "config": CONFIG}
    with temporary_settings(updates=cpu_worker.settings()):
        run = run_deployment(DEPLOYMENT, parameters=params, timeout=0)
    deadline = time.monotonic() + 300
    while not list((ws / "layered_frames" / "masks").glob("*/*.png")):  # mid layering
        assert time.monotonic() < deadline, f"no layer written in 300 s\n{_logs(cpu_worker)}"
        time.sleep(0.2)
    pids = _flow_run_pids(run.id)
    assert pids, "the flow-run process was not found"
    worker_log = cpu_worker.home / f"worker-{CPU_POOL}.log"
    mark = worker_log.stat().st_size
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    crashed = _wait(cpu_worker, run.id)
    assert crashed.state.name == "Crashed", crashed.state
    # The run's own runner (prefect.runner.state_proposer) reports the crash first; retry once the
    # worker has seen its process end too, or its late report would mark the retried attempt
    # Crashed (as it would in the UI).
    _wait_for_worker_report(worker_log, mark)

    run = _retry(cpu_worker, run.id)
    assert run.state.is_completed(), f"{run.state}\n{_logs(cpu_worker)}"
    assert datasets(ws) == fresh[1]
    assert leftovers(ws) == []
