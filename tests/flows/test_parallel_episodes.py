"""`yokai run` with episodes in parallel: overlapping episode times, the same datasets as one at a time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import tomli_w

from yokai_pipeline import synthetic

ROOT = Path(__file__).resolve().parents[2]


def _yokai_run(episodes: Path, ws: Path, concurrency: int, tmp: Path) -> dict:
    from prefect.settings import PREFECT_API_URL

    cfg = tmp / f"config-{concurrency}.toml"
    # the sample's small layers packaged as they are (no 512 px floor): upscaling them is the
    # slowest stage on this series and does not depend on how the episodes were scheduled
    settings = {"orchestration": {"episode_concurrency": concurrency}, "packaging": {"min_resolution": 0}}
    cfg.write_bytes(tomli_w.dumps(settings).encode())
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(tmp / f"prefect-{concurrency}"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the session's API (tests/conftest.py prefect_harness), the same kind of SQLite server as a
        # user's ephemeral one: each run would otherwise spend 15-30 s starting its own
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
    }
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)  # the CLI puts results in the workspace
    cmd = [sys.executable, "-m", "yokai_pipeline.cli", "run", str(episodes), "--workspace", str(ws)]
    proc = subprocess.run([*cmd, "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((ws / "summary.json").read_text())


def _dataset(ws: Path) -> dict[str, str]:
    """Every file of the kohya datasets and the layer manifests, by content (the workspace path masked)."""
    out = {}
    for sub in ("training_data", "layered_frames/manifests"):
        for p in sorted((ws / sub).rglob("*")):
            if not p.is_file() or p.suffix == ".json":  # JSON reports carry timings
                continue
            data = p.read_bytes().replace(str(ws).encode(), b"WS")
            out[p.relative_to(ws).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.slow
def test_three_episodes_at_once_overlap_and_build_the_serial_datasets(prefect_harness, tmp_path):
    series = synthetic.generate_series(tmp_path / "series", seed=4, episodes=3, seconds=9.0)
    episodes = Path(series.episodes[0]).parent
    parallel = _yokai_run(episodes, tmp_path / "ws3", 3, tmp_path)
    serial = _yokai_run(episodes, tmp_path / "ws1", 1, tmp_path)

    def spans(summary: dict) -> list[tuple[datetime, datetime]]:
        eps = summary["per_episode"]
        assert len(eps) == 3 and all(e["device"] == "cpu" for e in eps)
        out = [
            (datetime.fromisoformat(e["started_at"]), datetime.fromisoformat(e["finished_at"])) for e in eps
        ]
        assert all(s.utcoffset().total_seconds() == 0 and s < f for s, f in out)  # UTC, ordered
        return out

    par = spans(parallel)

    def overlap(a, b) -> bool:
        return a[0] < b[1] and b[0] < a[1]

    # flow-run start-up is staggered by seconds on a loaded machine, so every episode must run
    # alongside another one (not necessarily all three at one instant)
    assert all(any(overlap(x, y) for y in par if y is not x) for x in par), f"episodes ran alone: {par}"
    ser = sorted(spans(serial))
    assert all(ser[i][1] <= ser[i + 1][0] for i in range(2)), f"concurrency 1 overlapped: {ser}"

    a, b = _dataset(tmp_path / "ws3"), _dataset(tmp_path / "ws1")
    assert any(k.endswith(".png") for k in a) and any(k.endswith(".txt") for k in a)
    assert a == b
    assert parallel["stages"]["series_dedup"]["dropped_frames"] > 0  # the repeated opening
    assert parallel["stages"]["series_dedup"] == serial["stages"]["series_dedup"] | {
        "seconds": parallel["stages"]["series_dedup"]["seconds"]
    }
    assert parallel["stages"]["frames"]["kept"] == serial["stages"]["frames"]["kept"]
