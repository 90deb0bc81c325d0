"""The review app's HTTP surface (FastAPI TestClient): what it serves, what it refuses.

Every refusal is checked to change nothing: the edit log is byte-for-byte what it was.
"""

from __future__ import annotations

import re

import pytest

from tests.unit.test_edits import HOSTILE, _clustered, series  # noqa: F401  (fixtures)
from yokai_pipeline import clustering, edits, fsio
from yokai_pipeline.review.app import TOKEN_COOKIE, create_app

BASE = "http://127.0.0.1:8765"


def client(ws, **kwargs):
    from fastapi.testclient import TestClient

    app = create_app(ws.root, **kwargs)
    return app, TestClient(app, base_url=BASE)


def log_bytes(ws) -> bytes | None:
    path = edits.edit_log(ws)
    return path.read_bytes() if path.exists() else None


@pytest.fixture
def app_client(series):  # noqa: F811
    ws, truth = series
    app, c = client(ws)
    return ws, app, c


def post(c, app, body, **headers):
    return c.post("/api/edits", json=body, headers={"X-CSRF-Token": app.state.csrf, **headers})


def test_page_lists_every_cluster_with_counts_and_lazy_thumbnails(app_client):
    ws, app, c = app_client
    page = c.get("/")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    doc = clustering.read_clusters(ws)
    for cl in doc["clusters"]:
        assert f'id="cluster-{cl["id"]}"' in page.text
        assert f'data-size="{cl["size"]}"' in page.text
    imgs = re.findall(r'<img loading="lazy" src="/img/([^"]+)"', page.text)
    assert imgs and len(imgs) == len(set(imgs))
    assert c.get(f"/img/{imgs[0]}").headers["content-type"] == "image/png"
    cards = c.get("/api/clusters").json()["clusters"]
    assert all(card["alike"] for card in cards if card["id"] >= 0)  # nearest cluster always named


def test_members_are_paged(app_client):
    ws, app, c = app_client
    biggest = max(clustering.read_clusters(ws)["clusters"], key=lambda x: x["size"])
    first = c.get(f"/api/clusters/{biggest['id']}/members?offset=0&limit=7").json()
    rest = c.get(f"/api/clusters/{biggest['id']}/members?offset=7&limit=1000").json()
    assert first["total"] == biggest["size"] and len(first["layers"]) == 7
    assert len(first["layers"]) + len(rest["layers"]) == biggest["size"]
    assert not set(first["layers"]) & set(rest["layers"])


def test_hostile_names_are_shown_as_text(app_client):
    ws, app, c = app_client
    assert post(c, app, {"op": "name", "clusters": [0], "name": HOSTILE}).status_code == 200
    page = c.get("/").text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&#34;q&#34;" in page and "&#39;x&#39;" in page  # quotes cannot close an attribute


@pytest.mark.parametrize(
    "path",
    [
        "/img/..%2F..%2F..%2Fetc%2Fpasswd",
        "/img/../../etc/passwd",
        "/img/%2Fetc%2Fpasswd",
        "/img/character_clusters",
        "/static/..%2F..%2Fedits.py",
        "/static/review.html.j2",
        "/api/clusters/999/members",
        "/api/clusters/abc/members",
    ],
)
def test_paths_outside_the_workspace_and_unknown_ids_are_refused(app_client, path):
    ws, app, c = app_client
    before = log_bytes(ws)
    r = c.get(path)
    assert 400 <= r.status_code < 500, (path, r.status_code)
    assert "root:" not in r.text
    assert log_bytes(ws) == before


def test_a_member_whose_path_leaves_the_workspace_is_not_served(series, tmp_path):  # noqa: F811
    ws, _ = series
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG secret")
    doc = clustering.read_clusters(ws)
    victim = doc["members"][0]
    victim["path"] = "../" * 12 + str(outside).lstrip("/")
    fsio.atomic_write_json(clustering.clusters_file(ws), doc)
    _, c = client(ws)
    r = c.get(f"/img/{victim['layer_id']}")
    assert r.status_code == 404 and b"secret" not in r.content


@pytest.mark.parametrize(
    "body",
    [
        {"op": "merge", "clusters": [0, 999]},
        {"op": "name", "clusters": [999], "name": "x"},
        {"op": "move", "layers": ["../../etc/passwd"], "to": 0},
        {"op": "move", "layers": [], "to": 999},
        {"op": "tier", "clusters": [0], "tier": "<b>"},
    ],
)
def test_unknown_ids_in_edits_are_refused(app_client, body):
    ws, app, c = app_client
    before = log_bytes(ws)
    r = post(c, app, body)
    assert r.status_code == 400 and r.json()["detail"]
    assert log_bytes(ws) == before


def test_state_changes_need_the_csrf_token_and_json(app_client):
    ws, app, c = app_client
    body = {"op": "merge", "clusters": [0, 1]}
    assert c.post("/api/edits", json=body).status_code == 403
    assert c.post("/api/edits", json=body, headers={"X-CSRF-Token": "guess"}).status_code == 403
    form = c.post(
        "/api/edits",
        content="op=merge",
        headers={"X-CSRF-Token": app.state.csrf, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415
    assert log_bytes(ws) is None
    assert post(c, app, body).status_code == 200 and len(edits.read_edits(ws)) == 1


def test_loopback_mode_refuses_foreign_host_headers(app_client):
    ws, app, c = app_client
    r = c.get("/", headers={"Host": "evil.example:8765"})
    assert r.status_code == 400
    r = post(c, app, {"op": "merge", "clusters": [0, 1]}, Host="evil.example")
    assert r.status_code == 400 and log_bytes(ws) is None


def test_with_host_every_request_needs_the_token(series):  # noqa: F811
    ws, _ = series
    app, c = client(ws, token="s3cret-token")
    csrf = {"X-CSRF-Token": app.state.csrf}
    assert c.get("/").status_code == 401
    assert c.get("/api/clusters").status_code == 401
    assert c.get("/img/x").status_code == 401
    assert c.post("/api/edits", json={"op": "merge", "clusters": [0, 1]}, headers=csrf).status_code == 401
    assert c.get("/", headers={"X-Review-Token": "wrong"}).status_code == 401
    assert log_bytes(ws) is None
    r = c.get("/?token=s3cret-token", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert TOKEN_COOKIE in r.headers["set-cookie"] and "httponly" in r.headers["set-cookie"].lower()
    c.cookies.set(TOKEN_COOKIE, "s3cret-token")
    assert c.get("/").status_code == 200
    assert c.post("/api/edits", json={"op": "merge", "clusters": [0, 1]}, headers=csrf).status_code == 200


def test_undo_without_a_target_undoes_the_last_edit(app_client):
    ws, app, c = app_client
    post(c, app, {"op": "tier", "clusters": [0], "tier": "D"})
    last = post(c, app, {"op": "tier", "clusters": [0], "tier": "S"}).json()["edit"]
    undo = post(c, app, {"op": "undo"}).json()["edit"]
    assert undo["target"] == last["id"]
    card = next(x for x in c.get("/api/clusters").json()["clusters"] if x["id"] == 0)
    assert card["tier"] == "D"
    listed = c.get("/api/edits").json()["edits"]
    assert [e["undone"] for e in listed if e["op"] == "tier"] == [True, False]


def test_cli_with_host_prints_a_token_that_every_request_needs(series):  # noqa: F811
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    from pathlib import Path

    ws, _ = series
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "yokai_pipeline.cli",
            "review",
            str(ws.root),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()  # type: ignore[union-attr]
        url = re.search(r"at (http://127\.0\.0\.1:\d+/)\?token=(\S+)$", first.strip())
        assert url, first
        base, token = url.groups()
        assert token in second
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "api/clusters", timeout=30)
        assert refused.value.code == 401
        req = urllib.request.Request(base + "api/clusters", headers={"X-Review-Token": token})
        with urllib.request.urlopen(req, timeout=30) as ok:
            assert ok.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
