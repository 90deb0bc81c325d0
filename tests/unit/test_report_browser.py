"""The HTML report in headless Chromium: no console errors, every thumbnail loaded, filters work.

Chromium is driven through the DevTools protocol (``websockets``, a Prefect dependency).
The test skips, printing why, only when no chromium binary is installed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_analysis import build_clusters
from yokai_pipeline import analysis

CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
        if p and Path(p).exists()
    ),
    None,
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1280,1600",
    "--hide-scrollbars",
]
HOSTILE = {
    0: '"><script>window.__pwned=1</script>',
    1: "<img src=x onerror=window.__pwned=2>",
    2: "../../etc/passwd",
    3: "ジバニャン 'q' & \"dq\"",
}


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=1 << 27, open_timeout=30)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        msg_id = self.next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"])
        return res["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(
                    "console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p["exceptionDetails"])[:500])
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
        return out


@pytest.fixture()
def chromium():
    if CHROMIUM is None:
        print("SKIP REASON: no chromium binary (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    user_dir = tempfile.mkdtemp(prefix="yokai-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(user_dir) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().splitlines()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as resp:
            page = next(t for t in json.load(resp) if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(user_dir, ignore_errors=True)


def test_report_renders_in_chromium_with_every_image_loaded(chromium: DevTools, tmp_path: Path) -> None:
    sizes = [(0, 4, "normal"), (1, 15, "normal"), (2, 20, "normal"), (3, 50, "normal"), (5, 16, "dup")]
    cdir = build_clusters(tmp_path / "ws", sizes, noise=2)
    result = analysis.analyze_clusters(cdir)
    # Copy the report somewhere else: it must not depend on the cluster folders.
    _, html = analysis.write_analysis(
        result, tmp_path / "a.json", tmp_path / "report" / "cluster_analysis.html", names=HOSTILE
    )
    shutil.rmtree(tmp_path / "ws")
    moved = tmp_path / "copied" / "report.html"
    moved.parent.mkdir()
    shutil.move(html, moved)

    chromium.call("Runtime.enable")
    chromium.call("Log.enable")
    chromium.call("Page.enable")
    chromium.call("Page.navigate", url=f"{moved.as_uri()}#cluster-003")
    chromium.wait_event("Page.loadEventFired")
    images = chromium.evaluate(
        "Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))"
        ".then(() => Array.from(document.images).map(i => [i.naturalWidth, i.complete]))"
    )
    n_samples = sum(len(c["samples"]) for c in result["clusters"])
    assert len(images) == n_samples > 0
    assert all(w > 0 and done for w, done in images), images

    # Names are text, not markup: nothing injected ran, the text reads back as given.
    assert chromium.evaluate("typeof window.__pwned") == "undefined"
    names = chromium.evaluate("Array.from(document.querySelectorAll('.name')).map(e => e.textContent)")
    assert names == [HOSTILE[k] for k in sorted(HOSTILE)]
    assert chromium.evaluate("document.getElementById('summary').textContent") == analysis.format_summary(
        result
    )
    assert chromium.evaluate("location.hash") == "#cluster-003"
    # Opened at the anchor: scrolled to the cluster (or as far as the page goes).
    assert chromium.evaluate(
        "(() => { const y = document.getElementById('cluster-003').getBoundingClientRect().top;"
        "const bottom = scrollY + innerHeight >= document.documentElement.scrollHeight - 2;"
        "return scrollY > 0 && (y < 200 || bottom); })()"
    )

    # Filters: untick tier D, then types, then a size bar.
    visible = "Array.from(document.querySelectorAll('section.cluster')).filter(s => !s.hidden).map(s => s.id)"
    assert chromium.evaluate(visible) == [f"cluster-{i:03d}" for i in range(5)]
    chromium.evaluate("document.querySelector('input[name=tier][value=D]').click()")
    not_d = [analysis.cluster_anchor(c["id"]) for c in result["clusters"] if c["tier"] != "D"]
    assert chromium.evaluate(visible) == not_d and len(not_d) < 5
    chromium.evaluate("document.querySelector('input[name=type][value=human]').click()")
    assert chromium.evaluate(visible) == [
        analysis.cluster_anchor(c["id"])
        for c in result["clusters"]
        if c["tier"] != "D" and c["type"] != "human"
    ]
    chromium.evaluate(
        "(() => { document.querySelector('input[name=type][value=human]').click();"
        "const m = document.getElementById('min-images'); m.value = '20';"
        "m.dispatchEvent(new Event('input', {bubbles: true})); })()"
    )
    assert chromium.evaluate(visible) == [
        analysis.cluster_anchor(c["id"]) for c in result["clusters"] if c["tier"] != "D" and c["images"] >= 20
    ]
    chromium.evaluate(
        "(() => { window.scrollTo(0, 0); document.querySelectorAll('#filters input[type=checkbox]')"
        ".forEach(e => { if (!e.checked) e.click(); });"
        "const m = document.getElementById('min-images'); m.value = '0';"
        "m.dispatchEvent(new Event('input', {bubbles: true})); })()"
    )
    assert chromium.evaluate(visible) == [f"cluster-{i:03d}" for i in range(5)]

    shot = chromium.call("Page.captureScreenshot", format="png")
    out_dir = Path(os.environ.get("YOKAI_SCREENSHOT_DIR", tmp_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "cluster_analysis_report.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    print(f"report screenshot: {png}")
    assert png.stat().st_size > 10_000

    assert chromium.errors() == []
