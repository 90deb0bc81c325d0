"""The pipeline on a real Prefect server: pools from deployments/setup.py, `prefect deploy` from
prefect.yaml, process workers on yokai-cpu and yokai-gpu, a deployment run with a GPU-pool
sub-deployment, and the UI's custom-run form seen through headless Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from yokai_pipeline import synthetic
from yokai_pipeline.config import FramesConfig, LayeringConfig

if TYPE_CHECKING:
    from tests.flows.server_fixtures import PrefectServer

pytestmark = pytest.mark.slow
# The real server, pools, deployments and workers (session-scoped fixtures). The module is
# imported only through this line, so pytest rewrites its asserts.
pytest_plugins = ["tests.flows.server_fixtures"]
CPU_POOL, GPU_POOL = "yokai-cpu", "yokai-gpu"


@pytest.fixture(scope="module")
def tiny_series(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("server_series")
    synthetic.generate_series(out, seed=0, episodes=2, seconds=6.0)
    return out


@contextlib.contextmanager
def _client(server: PrefectServer):
    """A sync client of the test server (also when a test harness of this session is active)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    with temporary_settings(updates=server.settings()), get_client(sync_client=True) as client:
        yield client


def test_setup_script_is_idempotent(deployed):
    assert "work pool yokai-cpu: created" in deployed["setup_first"]
    assert "work pool yokai-gpu: created" in deployed["setup_first"]
    assert "created" not in deployed["setup_second"], deployed["setup_second"]
    assert "concurrency limit gpu: exists with 1 slot(s)" in deployed["setup_second"]


def test_every_prefect_yaml_deployment_is_registered_on_its_pool(prefect_server, deployed):
    import yaml

    from tests.flows.server_fixtures import REPO

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert len(spec) >= 8
    with _client(prefect_server) as client:
        registered = {d.name: d for d in client.read_deployments()}
    for entry in spec:
        dep = registered.get(entry["name"])
        assert dep is not None, f"{entry['name']} not deployed:\n{deployed['deploy'][-3000:]}"
        assert dep.work_pool_name == entry["work_pool"]["name"]
        assert dep.enforce_parameter_schema and dep.parameter_openapi_schema["properties"]
    gpu = {d.name for d in registered.values() if d.work_pool_name == GPU_POOL}
    assert {"yokai-layering", "yokai-embedding", "yokai-caption", "yokai-training"} <= gpu


def test_ui_custom_run_form_shows_parameter_descriptions(prefect_server, deployed, tmp_path):
    """What a user sees after Deployments -> yokai-pipeline -> Run -> Custom run."""
    from tests.flows.server_fixtures import capture_page

    with _client(prefect_server) as client:
        dep = client.read_deployment_by_name("yokai-pipeline/yokai-pipeline")
    schema = dep.parameter_openapi_schema
    top = [p["description"].splitlines()[0] for p in schema["properties"].values() if p.get("description")]
    expect = (
        "Parameters",
        "episodes_dir",
        "workspace",
        # the pydantic config: a stage's docstring and fields' descriptions (the config parameter's
        # own description comes from the flow docstring's Args, in `top`)
        (FramesConfig.__doc__ or "").strip(),
        FramesConfig.model_fields["analysis_width"].description,
        LayeringConfig.model_fields["backend"].description,
        *top,
    )
    png = tmp_path / "prefect-run-form.png"
    url = f"{prefect_server.ui_url}/deployments/deployment/{dep.id}/run"
    text = capture_page(url, png, expect, timeout=120)
    print(f"\nscreenshot of the custom-run form: {png}")
    if os.environ.get("YOKAI_UI_SCREENSHOT"):
        shutil.copy(png, os.environ["YOKAI_UI_SCREENSHOT"])
    missing = [e for e in expect if e not in text]
    assert not missing, f"not on the form ({png}): {missing}\n--- page text ---\n{text[:3000]}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.fixture(scope="module")
def episode_run(prefect_server, workers, tiny_series, tmp_path_factory):
    """One yokai-episode deployment run, distributed: its layering runs as yokai-layering."""
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    workspace = tmp_path_factory.mktemp("server_ws")
    params = {
        "video": str(tiny_series / "episodes" / "ep01.mp4"),
        "workspace": str(workspace),
        "config": {
            "layering": {"chunk_size": 8},
            "orchestration": {"distributed": True, "timeout_seconds": 240},
        },
    }
    with temporary_settings(updates=prefect_server.settings()):
        run = run_deployment("episode/yokai-episode", parameters=params, timeout=300, poll_interval=1)
        result = run.state.result() if run.state.is_completed() else None
        with _client(prefect_server) as client:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
            )
            flows = {c.id: client.read_flow(c.flow_id).name for c in children}
    return {"run": run, "result": result, "children": children, "flows": flows, "workspace": workspace}


def _worker_logs(server: PrefectServer) -> str:
    return "\n".join(
        f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted(server.home.glob("worker-*.log"))
    )


def test_episode_deployment_run_completes_on_cpu_worker(episode_run, prefect_server):
    run = episode_run["run"]
    assert run.state.is_completed(), f"{run.state}\n{_worker_logs(prefect_server)}"
    assert run.work_pool_name == CPU_POOL
    out = episode_run["result"]
    assert out["episode_id"] == "ep01" and out["frames"]["kept"] > 0
    assert (episode_run["workspace"] / "layered_frames" / "manifests" / "ep01.jsonl").is_file()


def test_layering_runs_as_gpu_pool_sub_deployment(episode_run, prefect_server):
    layering = [c for c in episode_run["children"] if episode_run["flows"][c.id] == "layering"]
    assert len(layering) == 1, f"{episode_run['children']}\n{_worker_logs(prefect_server)}"
    (child,) = layering
    assert child.work_pool_name == GPU_POOL, child.work_pool_name
    assert child.deployment_id is not None and child.state.is_completed(), child.state
    # The parent read the child's persisted result back through run_deployment.
    assert episode_run["result"]["layers"]["character_layers"] > 0
    assert "gpu" in child.tags
    # the parent's workspace-sharing token reached the GPU-pool run, which found it; then it was removed
    assert child.parameters["share_token"].endswith("@" + socket.gethostname())
    assert not list((episode_run["workspace"] / ".yokai-share").iterdir())


def _run_ingest(server: PrefectServer, s3, inbox: str, workspace: Path):
    """Trigger the yokai-ingest deployment (as its schedule would) and wait for it."""
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    params = {
        "inbox": inbox,
        "workspace": str(workspace),
        "config": {"storage": {"endpoint_url": s3.endpoint_url, "region": s3.region}},
        "stable_seconds": 0,
    }
    # Keys reach the flow-run process through its environment, as on a configured worker.
    env = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    with temporary_settings(updates=server.settings()):
        run = run_deployment(
            "ingest/yokai-ingest", parameters=params, job_variables={"env": env}, timeout=300, poll_interval=1
        )
        result = run.state.result() if run.state.is_completed() else None
        with _client(server) as client:
            from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter
            from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId as Parent

            episodes = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["episode"])),
                flow_run_filter=FlowRunFilter(parent_flow_run_id=Parent(any_=[run.id])),
            )
    return run, result, episodes


def test_ingest_deployment_runs_new_s3_episodes_once(
    prefect_server, workers, tiny_series, s3_server, tmp_path
):
    """Episodes uploaded to an S3 inbox: 2 new -> 2 episode runs; again -> 0; a half upload waits."""
    with _client(prefect_server) as client:
        dep = client.read_deployment_by_name("ingest/yokai-ingest")
    assert [s.schedule.interval.total_seconds() for s in dep.schedules] == [900]

    bucket = s3_server.new_bucket("inbox")
    s3 = s3_server.client()
    for name in ("ep01.mp4", "ep02.mp4"):
        s3.upload_file(str(tiny_series / "episodes" / name), bucket, f"new/{name}")
    mp = s3.create_multipart_upload(Bucket=bucket, Key="new/ep03.mp4")  # still uploading
    s3.upload_part(Bucket=bucket, Key="new/ep03.mp4", UploadId=mp["UploadId"], PartNumber=1, Body=b"x" * 4096)
    inbox, ws = f"s3://{bucket}/new", tmp_path / "ws"

    run, result, episodes = _run_ingest(prefect_server, s3_server, inbox, ws)
    assert run.state.is_completed(), f"{run.state}\n{_worker_logs(prefect_server)}"
    assert run.work_pool_name == CPU_POOL
    assert sorted(result["done"]) == ["ep01", "ep02"]
    assert sorted((e.name, e.state.name) for e in episodes) == [
        ("episode-ep01.mp4", "Completed"),
        ("episode-ep02.mp4", "Completed"),
    ]
    assert sorted(p.stem for p in (ws / "layered_frames" / "manifests").glob("*.jsonl")) == ["ep01", "ep02"]

    run, result, episodes = _run_ingest(prefect_server, s3_server, inbox, ws)
    assert run.state.is_completed(), f"{run.state}\n{_worker_logs(prefect_server)}"
    assert result["new"] == [] and episodes == []


def test_two_process_workers_run_three_episodes_at_once(prefect_server, workers, tmp_path):
    """Three yokai-episode runs submitted together on two CPU workers overlap in time."""
    import time

    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    from tests.flows.server_fixtures import start_worker

    if "yokai-cpu-2" not in prefect_server.workers:
        start_worker(prefect_server, CPU_POOL, name="yokai-cpu-2")
    series = synthetic.generate_series(tmp_path / "series", seed=6, episodes=3, seconds=5.0)
    # one layering chunk per episode: few API writes, so the SQLite server keeps up
    cfg = {"layering": {"chunk_size": 256}, "orchestration": {"distributed": False}}
    with temporary_settings(updates=prefect_server.settings()):
        ids = [
            run_deployment(
                "episode/yokai-episode",
                parameters={"video": str(v), "workspace": str(tmp_path / "ws"), "config": cfg},
                timeout=0,
            ).id
            for v in series.episodes
        ]
    deadline = time.monotonic() + 600
    with _client(prefect_server) as client:
        while True:
            runs = [client.read_flow_run(i) for i in ids]
            if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert all(r.state.is_completed() for r in runs), (
        f"{[(r.name, r.state) for r in runs]}\n{_worker_logs(prefect_server)}"
    )
    # A run is held by a worker from Pending (the worker claimed it and starts its process) to its
    # end. On a loaded 2-core machine starting three Python processes takes longer than a 5 s
    # episode, so Running intervals need not overlap; the claims must: no run waited for another.
    with _client(prefect_server) as client:
        claimed = [
            min(s.timestamp for s in client.read_flow_run_states(i) if s.type.value == "PENDING") for i in ids
        ]
    ends = [r.end_time for r in runs]
    assert max(claimed) < min(ends), f"episode runs did not overlap: {list(zip(claimed, ends, strict=True))}"
