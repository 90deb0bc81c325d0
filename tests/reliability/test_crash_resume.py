"""kill -9 `yokai run` at many points, re-run it, and compare every output with an uninterrupted run.

The runs share the session's Prefect server (tests/conftest.py ``prefect_harness``), so each
child pays only its import time. One trial is a chain: the run is killed at the first kill
point, re-run and killed at the next, and so on; the last run goes to completion. A second
trial kills at seeded random times. Each kill fires when a file of the named kind appears that
did not exist when that run started, so every kill lands in a different stage.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tests.reliability.conftest import describe_diff, leftovers, output_digest, run_cli

KILL_POINTS = [
    "episodes/ep01/frames/*.png",  # mid frame extraction (first PNG written)
    "episodes/ep01/extract.json",  # extraction done, layering not started
    "layered_frames/masks/ep01/*.png",  # mid layering
    "layered_frames/manifests/ep01.jsonl",  # layer manifest written, flow not yet returned
    "embeddings/*.npy",  # dataset flow: embeddings
    "character_clusters/clusters.json",  # clustering published, analysis next
    "training_data/characters/*/*.png",  # kohya packaging
]


@pytest.fixture(scope="module")
def chain_trial(tmp_path_factory, short_series, run_config, child_env):
    """Killed at each kill point in turn, then run to completion."""
    ws = tmp_path_factory.mktemp("chain") / "ws"
    kills = []
    for point in KILL_POINTS:
        out = run_cli(short_series, ws, run_config, child_env, kill_when=point)
        if out.killed:
            kills.append(point)
        else:  # the stage was already done by an earlier run (no new file appeared)
            assert out.rc == 0, out.log[-4000:]
    final = run_cli(short_series, ws, run_config, child_env)
    return ws, kills, final


@pytest.fixture(scope="module")
def random_trial(tmp_path_factory, short_series, run_config, child_env):
    """Killed twice at seeded random times, then run to completion."""
    rng = random.Random(1234)
    ws = tmp_path_factory.mktemp("random") / "ws"
    kills = []
    for _ in range(2):
        # children spend their first seconds importing; kill somewhere in the work after that
        out = run_cli(short_series, ws, run_config, child_env, kill_after=rng.uniform(8.0, 25.0))
        if out.killed:
            kills.append(out.trigger)
    final = run_cli(short_series, ws, run_config, child_env)
    return ws, kills, final


@pytest.mark.slow
@pytest.mark.parametrize("trial", ["chain_trial", "random_trial"])
def test_killed_then_resumed_is_byte_identical(request, trial, baseline):
    ws, kills, final = request.getfixturevalue(trial)
    assert final.rc == 0, final.log[-4000:]
    assert len(kills) >= (5 if trial == "chain_trial" else 1), f"kills that landed: {kills}"
    got = output_digest(ws)
    assert got == baseline, describe_diff(ws, got, baseline)


@pytest.mark.slow
@pytest.mark.parametrize("trial", ["chain_trial", "random_trial"])
def test_resumed_run_left_no_temporary_files_of_its_own(request, trial):
    ws, kills, final = request.getfixturevalue(trial)
    assert final.rc == 0
    # a kill can leave a .tmp- file only if it lands mid-write; any that a run of this workspace
    # can see must be gone after the next complete run (see the planted test below)
    assert [p for p in leftovers(ws) if p.startswith(("episodes/", "layered_frames/"))] == []


@pytest.mark.slow
def test_temporary_files_of_killed_writers_are_swept_on_the_next_run(
    chain_trial, short_series, run_config, child_env
):
    ws, kills, final = chain_trial
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now belongs to no process: the files below look like a killed writer's
    planted = [
        ws / "episodes" / "ep01" / "frames" / f".tmp-{dead.pid}-x1.png",
        ws / "embeddings" / f".tmp-{dead.pid}-x2.npy",
        ws / "character_clusters" / f".tmp-{dead.pid}-x3.json",
        ws / "training_data" / f".tmp-{dead.pid}-x4.png",
    ]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    out = run_cli(short_series, ws, run_config, child_env)
    assert out.rc == 0, out.log[-3000:]
    assert [p.relative_to(ws).as_posix() for p in planted if p.exists()] == []
