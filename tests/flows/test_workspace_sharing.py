"""A distributed run hands a heavy step to a worker that must see the same workspace folder.

The worker is simulated in this process (``run_deployment`` replaced): "on a shared mount" it runs
the deployment's flow on the workspace as it is; "on another host" the same path holds another
folder (the parent's one is moved aside while the child runs), as a worker with its own local
disk would see it.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from prefect import flow

import flows.heavy
from flows.dataset import dataset_flow
from flows.episode import episode_flow
from flows.gpu import caption_flow, embedding_flow, layering_flow
from flows.heavy import run_heavy
from flows.training import training_flow
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.errors import YokaiError
from yokai_pipeline.workspace import Workspace

pytestmark = pytest.mark.usefixtures("prefect_harness")

CONFIG = PipelineConfig(orchestration={"distributed": True})
HANDED_OVER = [episode_flow, dataset_flow, layering_flow, embedding_flow, caption_flow, training_flow]


def _no_characters(ws: Workspace) -> None:
    ws.selection_file.parent.mkdir(parents=True, exist_ok=True)
    ws.selection_file.write_text(json.dumps({"characters": []}))


@flow(name="parent")
def _parent(workspace: str) -> dict:
    """The CPU-pool flow that hands its caption step to the GPU pool."""
    return run_heavy(caption_flow, "caption", {"workspace": workspace, "config": CONFIG}, CONFIG)


def _fake_worker(ws: Workspace, other_host: bool, seen: list[dict]):
    def run_deployment(name: str, parameters: dict, timeout=None):
        seen.append(
            {"name": name, "parameters": parameters, "tokens": sorted(ws.root.glob(".yokai-share/*"))}
        )
        aside = ws.root.with_name(ws.root.name + "-parent-host")
        if other_host:
            ws.root.rename(aside)
            ws.root.mkdir()
            _no_characters(ws)  # even a folder with a workspace in it: it is not the parent's
        try:
            state = caption_flow(**parameters, return_state=True)
        finally:
            if other_host:
                shutil.rmtree(ws.root)
                aside.rename(ws.root)
        return SimpleNamespace(state=state, name="fake-run")

    return run_deployment


def test_every_handed_over_flow_takes_the_token_parameter():
    # deployments enforce their schema: a parameter the flow does not declare would be refused
    for fl in HANDED_OVER:
        props = fl.parameters.properties
        assert "share_token" in props, fl.name
        assert props["share_token"].get("default") is None
        # the wrapper keeps the config's type: its schema is PipelineConfig's, which the UI's
        # custom-run form renders field by field (an untyped one becomes a raw JSON box)
        assert "PipelineConfig" in json.dumps(props["config"]), (fl.name, props["config"].keys())
        assert "PipelineConfig" in fl.parameters.definitions, fl.name


def test_a_shared_folder_runs_the_step_and_leaves_no_token(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    _no_characters(ws)
    seen: list[dict] = []
    monkeypatch.setattr(flows.heavy, "run_deployment", _fake_worker(ws, other_host=False, seen=seen))
    out = _parent(str(ws.root))
    assert out["characters"] == 0
    (call,) = seen
    assert call["name"] == "caption/yokai-caption"
    token = call["parameters"]["share_token"]
    assert [p.stem for p in call["tokens"]] == [token.partition("@")[0]]  # written before submitting
    assert list((ws.root / ".yokai-share").iterdir()) == []  # and removed when the child returned


def test_a_worker_on_another_host_fails_at_start_naming_the_workspace_and_the_fix(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    _no_characters(ws)
    seen: list[dict] = []
    monkeypatch.setattr(flows.heavy, "run_deployment", _fake_worker(ws, other_host=True, seen=seen))
    with pytest.raises(YokaiError) as err:
        _parent(str(ws.root))
    msg = str(err.value)
    assert "caption/yokai-caption" in msg and "Failed" in msg
    assert f"workspace {ws.root} is not shared" in msg
    assert "use an s3:// workspace, or mount the same folder" in msg
    assert list((ws.root / ".yokai-share").iterdir()) == []  # the parent's folder is left clean


@flow(name="parent-of-two")
def _parent_of_two(workspace: str) -> list[str]:
    """Two hand-overs in one run, as two episodes' layering steps would be."""
    errors = []
    for _ in range(2):
        try:
            run_heavy(caption_flow, "caption", {"workspace": workspace, "config": CONFIG}, CONFIG)
        except YokaiError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


def test_after_one_worker_cannot_see_the_workspace_the_run_hands_nothing_more_over(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    _no_characters(ws)
    seen: list[dict] = []
    monkeypatch.setattr(flows.heavy, "run_deployment", _fake_worker(ws, other_host=True, seen=seen))
    first, second = _parent_of_two(str(ws.root))
    assert len(seen) == 1  # the second step started no flow run on the worker
    assert first.startswith("WorkspaceNotShared: deployment caption/yokai-caption")
    assert second.startswith("WorkspaceNotShared: caption/yokai-caption not handed over")
    assert f"workspace {ws.root} is not shared" in second  # the same reason, and the fix
    assert "use an s3:// workspace" in second
    # another run on the same workspace (the folder fixed) tries again
    seen.clear()
    monkeypatch.setattr(flows.heavy, "run_deployment", _fake_worker(ws, other_host=False, seen=seen))
    assert _parent_of_two(str(ws.root)) == [] and len(seen) == 2
