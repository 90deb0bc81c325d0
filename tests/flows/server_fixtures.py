"""A real Prefect server, work pools and process workers for the orchestration tests.

One server per test session (SQLite in a temporary PREFECT_HOME, a free port on 127.0.0.1),
set up the way a user does it: ``deployments/setup.py`` (run twice: it must be idempotent),
``deployments/deploy.sh`` (``prefect deploy`` from the repository's prefect.yaml) and one
process worker per pool. Workers are stopped before the server: a worker whose server is
gone hangs on SIGTERM retrying the API.

Register in a test module with ``from tests.flows.server_fixtures import *  # noqa: F403``
or ``pytest_plugins = ["tests.flows.server_fixtures"]``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFECT_BIN = Path(sys.executable).parent / "prefect"
CPU_POOL = "yokai-cpu"
GPU_POOL = "yokai-gpu"


@dataclass
class PrefectServer:
    """A running test server and the environment its clients and workers use."""

    api_url: str
    ui_url: str
    home: Path
    results_dir: Path
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def settings(self) -> dict:
        """Prefect settings for ``temporary_settings`` so this process talks to this server."""
        from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH

        return {PREFECT_API_URL: self.api_url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(self.results_dir)}

    def run_cli(
        self, *args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run a command with the server's environment (plus ``env``) in the repository root."""
        out = subprocess.run(
            list(args),
            cwd=REPO,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {out.returncode}\nstdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-4000:]}"
            )
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: Path, port: int, results_dir: Path) -> dict[str, str]:
    """Environment for the server, the CLI, workers and their flow-run processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            # SQLite under several concurrent flow runs on a loaded 2-core machine: wait for the
            # write lock instead of answering 503
            "PREFECT_API_DATABASE_TIMEOUT": "60",
            "PREFECT_API_DATABASE_CONNECTION_TIMEOUT": "30",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true",
            # No scheduled runs: the tests trigger runs themselves, and a scheduled ingest run
            # would hold the ingest deployment's single slot (collision strategy CANCEL_NEW).
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            # Child flows hand results back through files every process can read.
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results_dir),
            # Workers poll every second instead of every 10 (the tests wait on them).
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PATH": f"{PREFECT_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT": str(PREFECT_BIN),
            "YOKAI_REPO_DIR": str(REPO),
            "YOKAI_RUN_DIR": str(home / "run"),
        }
    )
    return env


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.read().strip() == b"true"
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, name: str, wait_s: float = 20) -> None:
    """SIGINT (Prefect's CLI shuts down cleanly on it), then SIGTERM, then SIGKILL the group."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGINT, wait_s), (signal.SIGTERM, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            print(f"{name} (pid {proc.pid}) ignored SIGINT and SIGTERM; killing it")
    # Whatever is left of the group (flow-run subprocesses of a worker, the server's children).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def start_server(home: Path, timeout: float = 120) -> PrefectServer:
    """Start ``prefect server start`` on a free port and wait until /api/health answers."""
    home.mkdir(parents=True, exist_ok=True)
    results = home / "results"
    results.mkdir(exist_ok=True)
    port = free_port()
    env = server_env(home, port, results)
    log = home / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(PREFECT_BIN), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=home,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = PrefectServer(env["PREFECT_API_URL"], f"http://127.0.0.1:{port}", home, results, log, env, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(server.api_url):
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    stop_process(proc, "server")
    raise RuntimeError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


def start_worker(
    server: PrefectServer, pool: str, timeout: float = 90, name: str | None = None
) -> subprocess.Popen:
    """A process worker for ``pool`` (named ``test-<name or pool>``), started in the repository root;
    waits until it polls."""
    name = name or pool
    log = server.home / f"worker-{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                str(PREFECT_BIN),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
                "--name",
                f"test-{name}",
            ],
            cwd=REPO,
            env=server.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server.workers[name] = proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker for {pool} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        if "started!" in log.read_text(errors="replace"):
            return proc
        time.sleep(0.5)
    raise RuntimeError(f"worker for {pool} did not start in {timeout} s:\n{log.read_text()[-4000:]}")


def stop_server(server: PrefectServer) -> None:
    """Workers first, all at once, then the server.

    A process worker that has run flows was still up 20 s after SIGINT (its log shows it
    forwarding the signal to itself), so one after another each cost its whole grace period.
    """
    from concurrent.futures import ThreadPoolExecutor

    def stop(item: tuple[str, subprocess.Popen]) -> None:
        stop_process(item[1], f"worker {item[0]}", wait_s=10)

    with ThreadPoolExecutor(max(1, len(server.workers))) as pool:
        list(pool.map(stop, server.workers.items()))
    server.workers.clear()
    stop_process(server.proc, "server", wait_s=30)


def setup_and_deploy(server: PrefectServer, names: tuple[str, ...] = ()) -> dict[str, str]:
    """Pools and limits via deployments/setup.py (twice), then deploy ``names`` (default: all)
    from prefect.yaml through deployments/deploy.sh.

    Returns:
        The outputs of the two setup runs and of the deploy, by step.
    """
    setup = [str(Path(sys.executable)), str(REPO / "deployments" / "setup.py"), "--gpus", "1"]
    first = server.run_cli(*setup, timeout=120).stdout
    second = server.run_cli(*setup, timeout=120).stdout
    args = [a for n in names for a in ("--name", n)]
    inbox = server.home / "inbox"
    workspace = server.home / "workspace"
    deploy = server.run_cli(
        "bash",
        str(REPO / "deployments" / "deploy.sh"),
        *args,
        timeout=300,
        env={"YOKAI_INBOX": str(inbox), "YOKAI_WORKSPACE": str(workspace)},
    )
    return {"setup_first": first, "setup_second": second, "deploy": deploy.stdout + deploy.stderr}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """A real Prefect server (SQLite) on 127.0.0.1 for this session; stopped after its workers."""
    if not PREFECT_BIN.is_file():
        pytest.skip(f"prefect CLI not found at {PREFECT_BIN}")
    home = tmp_path_factory.mktemp("prefect_home")
    server = start_server(home)
    try:
        yield server
    finally:
        stop_server(server)
        print(f"prefect server log: {server.log}")


@pytest.fixture(scope="session")
def deployed(prefect_server: PrefectServer) -> dict[str, str]:
    """The pools, limits and test deployments created on the session's server."""
    return setup_and_deploy(prefect_server)


@pytest.fixture(scope="session")
def workers(prefect_server: PrefectServer, deployed) -> dict[str, subprocess.Popen]:
    """One process worker on each of yokai-cpu and yokai-gpu (stopped before the server)."""
    for pool in (CPU_POOL, GPU_POOL):
        start_worker(prefect_server, pool)
    return prefect_server.workers


def chromium_path() -> str | None:
    """Debian's chromium, if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


__all__ = [
    "CPU_POOL",
    "GPU_POOL",
    "PrefectServer",
    "REPO",
    "capture_page",
    "chromium_path",
    "deployed",
    "prefect_server",
    "setup_and_deploy",
    "start_server",
    "start_worker",
    "stop_server",
    "workers",
]


def capture_page(
    url: str,
    png: Path,
    expect: tuple[str, ...],
    *,
    timeout: float = 90,
    width: int = 1400,
    height: int = 2000,
) -> str:
    """Open ``url`` in headless Chromium, wait until all ``expect`` texts are on the page, screenshot it.

    Driven over the DevTools protocol (``websockets``, which Prefect brings) rather than
    ``--screenshot``/``--dump-dom``: the UI is a single-page app that fills the form from API
    calls, so the test waits for the texts instead of guessing a time budget.

    Returns:
        The page's visible text when the texts appeared (or at the timeout).
    """
    import json

    from websockets.sync.client import connect

    chromium = chromium_path()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    profile = png.parent / f"chromium-profile-{os.getpid()}"
    profile.mkdir(parents=True, exist_ok=True)
    with (png.parent / "chromium.log").open("ab") as err:
        proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"chromium did not open its DevTools port; see {png.parent / 'chromium.log'}"
                )
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            page = next(t for t in json.load(resp) if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            ids = iter(range(1, 1_000_000))

            def call(method: str, **params):
                msg_id = next(ids)
                ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=60))
                    if msg.get("id") == msg_id:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg["result"]

            def evaluate(expr: str):
                return call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

            call("Page.enable")
            call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            call("Page.navigate", url=url)
            text = ""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                text = evaluate("document.body ? document.body.innerText : ''") or ""
                if all(e in text for e in expect):
                    break
                time.sleep(0.5)
            time.sleep(1.0)  # let the last layout settle before the picture
            shot = call("Page.captureScreenshot", format="png")
            import base64

            png.write_bytes(base64.b64decode(shot["data"]))
            (png.with_suffix(".html")).write_text(evaluate("document.documentElement.outerHTML") or "")
            return evaluate("document.body ? document.body.innerText : ''") or text
    finally:
        stop_process(proc, "chromium", wait_s=5)
        shutil.rmtree(profile, ignore_errors=True)
