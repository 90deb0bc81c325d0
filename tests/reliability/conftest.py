"""Shared by the crash/concurrency tests: a short sample series, the `yokai run` subprocess
(pointed at the session's Prefect server so it does not start one of its own), and an
uninterrupted baseline run to compare against."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EPISODES = 2
SECONDS = 6.0
#: Every tier selected so augmentation, captions, packaging and validation run on the short series.
#: Its layers are far below the guide's 512 px minimum: packaged as they are (no floor) rather than
#: upscaled as the demo does, which took 30 of a run's 90 s (PNG encoding at 512 px and validating it)
#: and has nothing to do with resuming; the packaging kill point still lands on the first PNG.
CONFIG_TOML = 'seed = 0\n[selection]\ntiers = ["S", "A", "B", "C", "D"]\n[packaging]\nmin_resolution = 0\n'
#: Fields that are wall-clock measurements, not outputs.
TIMING_KEYS = {"seconds", "flow_seconds", "images_per_s", "elapsed", "started", "finished"}


@pytest.fixture(scope="session")
def short_series(tmp_path_factory) -> Path:
    from yokai_pipeline import synthetic

    out = tmp_path_factory.mktemp("short_series")
    synthetic.generate_series(out, seed=0, episodes=EPISODES, seconds=SECONDS)
    return out / "episodes"


@pytest.fixture(scope="session")
def run_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.toml"
    path.write_text(CONFIG_TOML, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def child_env(prefect_harness) -> dict[str, str]:
    """Environment of a `yokai run` child: the session's Prefect API, no telemetry."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        NUMBA_CACHE_DIR=env.get("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "yokai" / "numba")),
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)  # the CLI puts results in the workspace
    return env


def run_command(episodes: Path, workspace: Path, config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "yokai_pipeline.cli",
        "run",
        str(episodes),
        "--workspace",
        str(workspace),
        "--config",
        str(config),
    ]


@dataclass
class Outcome:
    rc: int | None
    killed: bool
    trigger: str | None
    seconds: float
    log: str = field(repr=False, default="")


def run_cli(
    episodes: Path,
    workspace: Path,
    config: Path,
    env: dict,
    *,
    kill_when: str | None = None,
    kill_after: float | None = None,
    timeout: float = 300,
) -> Outcome:
    """Run `yokai run` as a child; SIGKILL it when a new file matches ``kill_when`` (a glob under the
    workspace) or ``kill_after`` seconds have passed, whichever first."""
    existing = set(workspace.glob(kill_when)) if kill_when and workspace.exists() else set()
    log_path = workspace.parent / f"{workspace.name}-{time.monotonic_ns()}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            run_command(episodes, workspace, config),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(workspace.parent),
            start_new_session=True,
        )
        fired = None
        while proc.poll() is None:
            now = time.monotonic() - t0
            if kill_when and workspace.exists():
                new = set(workspace.glob(kill_when)) - existing
                if new:
                    fired = f"{kill_when} ({sorted(new)[0].name})"
            if fired is None and kill_after is not None and now >= kill_after:
                fired = f"after {kill_after:.1f}s"
            if fired:
                os.killpg(proc.pid, signal.SIGKILL)  # kill -9, no chance to clean up
                proc.wait()
                break
            if now > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(f"yokai run timed out after {timeout}s; log {log_path}")
            time.sleep(0.01)
    return Outcome(proc.returncode, fired is not None, fired, time.monotonic() - t0, log_path.read_text())


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


RUN_RECORDS = {"summary.json", "dataset_run.json"}


def output_digest(workspace: Path) -> dict[str, str]:
    """sha256 of every output file, keyed by its workspace-relative path.

    Skipped: Prefect's own result store, summary.json (timings only) and dataset_run.json (which
    flow run built the dataset: run bookkeeping, another id in every run). Workspace-absolute paths
    inside text files are replaced by ``<WS>`` and timing fields are dropped from JSON, so two
    workspaces with the same outputs compare equal.
    """
    root = workspace.resolve()
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.parts[0] == ".prefect" or rel.as_posix() in RUN_RECORDS:
            continue
        if any(part.startswith((".tmp-", ".old-")) for part in rel.parts):
            continue  # interrupted writes: reported by leftovers()
        data = p.read_bytes()
        if p.suffix in (".json", ".jsonl", ".html", ".txt", ".toml", ".md", ".sh"):
            data = data.replace(str(root).encode(), b"<WS>")
        if p.suffix == ".json":
            data = json.dumps(_strip_timing(json.loads(data)), sort_keys=True).encode()
        elif p.suffix == ".jsonl":
            rows = [json.loads(line) for line in data.splitlines() if line.strip()]
            data = json.dumps(_strip_timing(rows), sort_keys=True).encode()
        out[rel.as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(workspace: Path) -> list[str]:
    """Temporary files or folders of interrupted writes (outside Prefect's result store)."""
    root = workspace.resolve()
    bad = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if rel.parts[0] == ".prefect":
            continue
        if p.name.startswith((".tmp-", ".old-")) or p.name.endswith((".tmp", ".partial")):
            bad.append(rel.as_posix())
    return sorted(bad)


class Baseline(dict):
    """Output digest of one uninterrupted run (a dict), plus its workspace ``ws`` for diffs."""

    ws: Path


def describe_diff(got_ws: Path, got: dict[str, str], base: Baseline) -> str:
    """Which files differ from the baseline, with the first differing lines of text files."""
    import difflib

    missing = sorted(set(base) - set(got))
    extra = sorted(set(got) - set(base))
    changed = sorted(k for k in set(got) & set(base) if got[k] != base[k])
    lines = [f"missing={missing[:10]} extra={extra[:10]} changed={changed[:10]}"]
    for rel in changed[:3]:
        a, b = base.ws / rel, got_ws / rel
        if a.suffix in (".json", ".jsonl", ".txt", ".toml"):
            diff = difflib.unified_diff(
                a.read_text().splitlines(), b.read_text().splitlines(), lineterm="", n=1
            )
            lines += [f"--- {rel}", *list(diff)[2:14]]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, short_series, run_config, child_env) -> Baseline:
    """Outputs of one uninterrupted run."""
    ws = tmp_path_factory.mktemp("baseline") / "ws"
    out = run_cli(short_series, ws, run_config, child_env)
    assert out.rc == 0, out.log[-4000:]
    digest = Baseline(output_digest(ws))
    digest.ws = ws
    for must in (
        "episodes/ep01/frames.jsonl",
        "layered_frames/manifests/ep02.jsonl",
        "embeddings/ep01.npy",
        "character_clusters/clusters.json",
        "analysis/cluster_analysis.json",
        "selection.json",
        "logs/validation_report.json",
    ):
        assert must in digest, f"baseline run did not write {must}"
    return digest
