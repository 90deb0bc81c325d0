"""Episodes in parallel: wall-clock of the episode phase with 1 vs K episodes at a time.

Generates ``--episodes`` sample episodes (``--seconds`` each) and runs ``yokai run`` on them
once per ``--workers`` value (``orchestration.episode_concurrency``, a fresh workspace and
Prefect home each time), then reads the per-episode ``started_at`` / ``finished_at`` from
summary.json. The episode phase is first start -> last finish; the total includes the series
dedup and the dataset flow, which run once for the series either way. Prints a table; with
--json writes the figures.

    python bench/bench_episodes.py --episodes 4 --seconds 20 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yokai_pipeline import synthetic  # noqa: E402


def run_once(episodes: Path, work: Path, workers: int) -> dict:
    """One `yokai run` with ``workers`` episodes at a time; its timings."""
    import tomli_w

    ws = work / f"ws-{workers}"
    cfg = work / f"config-{workers}.toml"
    settings = {"orchestration": {"episode_concurrency": workers}, "packaging": {"upscale_to": 512}}
    cfg.write_bytes(tomli_w.dumps(settings).encode())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(work / f"prefect-{workers}")}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "yokai_pipeline.cli", "run", str(episodes), "--workspace", str(ws)]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "--config", str(cfg)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"yokai run failed with {workers} workers:\n{proc.stderr[-3000:]}")
    summary = json.loads((ws / "summary.json").read_text())
    spans = [
        (datetime.fromisoformat(e["started_at"]), datetime.fromisoformat(e["finished_at"]))
        for e in summary["per_episode"]
    ]
    phase = (max(f for _, f in spans) - min(s for s, _ in spans)).total_seconds()
    return {
        "workers": workers,
        "episode_phase_s": round(phase, 2),
        "mean_episode_s": round(sum((f - s).total_seconds() for s, f in spans) / len(spans), 2),
        "flow_s": summary["seconds"],
        "wall_s": round(wall, 2),
        "kept_frames": summary["stages"]["frames"]["kept"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-episodes-") as tmp:
        work = Path(tmp)
        series = synthetic.generate_series(
            work / "series", seed=7, episodes=args.episodes, seconds=args.seconds
        )
        episodes = Path(series.episodes[0]).parent
        rows = [run_once(episodes, work, k) for k in args.workers]
    base = rows[0]["episode_phase_s"]
    print(f"{args.episodes} episodes x {args.seconds:g} s, {os.cpu_count()} CPU cores")
    print(
        f"{'workers':>7} {'episode phase s':>16} {'speed-up':>9} {'mean episode s':>15} {'flow s':>8} {'kept':>6}"
    )
    for r in rows:
        r["speedup"] = round(base / r["episode_phase_s"], 2)
        print(
            f"{r['workers']:>7} {r['episode_phase_s']:>16.2f} {r['speedup']:>9.2f} "
            f"{r['mean_episode_s']:>15.2f} {r['flow_s']:>8.2f} {r['kept_frames']:>6}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
