"""Content-keyed tasks whose files are gone run again; a child flow's finished tasks stay cached
when a sibling fails (real Prefect, the session's ephemeral API)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow, task

from flows.heavy import run_subflow
from tasks.common import call_checked, content_cache, run_bounded

pytestmark = pytest.mark.usefixtures("prefect_harness")
CALLS: list[str] = []


def _written(parameters: dict, result: str) -> list[Path]:
    return [Path(result)]


@task(cache_policy=content_cache("source", outputs=_written), persist_result=True)
def copy_upper(source: str, dest: str) -> str:
    """Write ``dest`` from ``source`` (upper-cased); the result names the file written."""
    CALLS.append(dest)
    Path(dest).write_text(Path(source).read_text().upper())
    return dest


@flow
def call_once(source: str, dest: str) -> str:
    return call_checked(copy_upper, source=source, dest=dest).name


@flow
def call_mapped(source: str, dests: list[str]) -> list[str]:
    futures = run_bounded(copy_upper, [{"source": source, "dest": d} for d in dests], 2)
    return [f.state.name for f in futures]


def test_cached_result_with_its_file_gone_runs_again(tmp_path):
    src, dest = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("abc")
    CALLS.clear()
    assert call_once(str(src), str(dest)) == "Completed"
    assert call_once(str(src), str(dest)) == "Cached"
    assert CALLS == [str(dest)]
    dest.unlink()
    assert call_once(str(src), str(dest)) == "Completed"  # not Cached with its file gone
    assert dest.read_text() == "ABC" and CALLS == [str(dest)] * 2
    assert call_once(str(src), str(dest)) == "Cached"  # the refreshed record is reused
    src.write_text("xyz")  # changed input: a new key
    assert call_once(str(src), str(dest)) == "Completed" and dest.read_text() == "XYZ"


def test_mapped_calls_with_files_gone_run_again_alone(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("abc")
    dests = [str(tmp_path / f"out{i}.txt") for i in range(3)]
    CALLS.clear()
    assert call_mapped(str(src), dests) == ["Completed"] * 3
    Path(dests[1]).unlink()
    assert call_mapped(str(src), dests) == ["Cached", "Completed", "Cached"]
    assert sorted(CALLS) == sorted([*dests, dests[1]])
    assert Path(dests[1]).read_text() == "ABC"


@flow
def child(source: str, dests: list[str], fail: bool) -> list[str]:
    states = [call_checked(copy_upper, source=source, dest=d).name for d in dests]
    if fail:
        raise RuntimeError("a later step of the child failed")
    return states


@task
def parent_task(source: str, dests: list[str], fail: bool) -> list[str]:
    return run_subflow(child, "child", {"source": source, "dests": dests, "fail": fail})


@flow
def parent(source: str, dests: list[str], fail: bool, through_task: bool) -> list[str]:
    if through_task:
        return parent_task(source, dests, fail)
    return run_subflow(child, "child", {"source": source, "dests": dests, "fail": fail})


@pytest.mark.parametrize("through_task", [False, True])
def test_child_flow_tasks_stay_cached_when_the_child_fails(tmp_path, through_task):
    """A task run inside another task joins its transaction, rolled back when that one fails:
    run_subflow gives the child's tasks their own, so what finished stays cached."""
    src = tmp_path / "in.txt"
    src.write_text("abc")
    dests = [str(tmp_path / f"out{i}.txt") for i in range(2)]
    state = parent(str(src), dests, True, through_task, return_state=True)
    assert state.is_failed()
    assert parent(str(src), dests, False, through_task) == ["Cached", "Cached"]
