"""The review web app: FastAPI over :class:`ReviewView` and the edit log.

Security model: the app binds 127.0.0.1 and then only answers requests whose Host header is
a loopback name (a page of another site cannot reach it through DNS rebinding). Bound to any
other address it requires a token (printed at start; taken once from ``?token=`` into a
cookie). Every state-changing request carries the page's CSRF token in ``X-CSRF-Token``
and a JSON body; every id in a request is checked against the clusters, and images are
served only by layer id, from files inside the workspace.
"""

import hmac
import secrets
from pathlib import Path
from typing import Any

from yokai_pipeline import edits
from yokai_pipeline.config import ReviewConfig
from yokai_pipeline.review.view import NotFound, ReviewView

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"review.js": "text/javascript", "review.css": "text/css"}
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}
TOKEN_COOKIE = "yokai_review_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _import_fastapi() -> Any:
    try:
        import fastapi
    except ImportError as exc:  # pragma: no cover - fastapi comes with prefect
        raise ImportError("yokai review needs fastapi and uvicorn: pip install fastapi uvicorn") from exc
    return fastapi


def create_app(
    workspace: str | Path,
    cfg: ReviewConfig | None = None,
    *,
    token: str | None = None,
    user: str | None = None,
) -> Any:
    """The FastAPI app reviewing ``workspace``.

    Args:
        workspace: run workspace with character_clusters/clusters.json.
        cfg: page size, look-alike distance.
        token: required on every request when given (the app is bound beyond loopback).
        user: recorded as ``who`` in the edits (default: the OS user).
    """
    fastapi = _import_fastapi()
    view = ReviewView(workspace, cfg)
    view.refresh()  # fail at start, naming the file, when the workspace has no clusters
    csrf = secrets.token_urlsafe(32)
    app = fastapi.FastAPI(title="Yokai review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.view, app.state.csrf, app.state.token = view, csrf, token
    _add_guard(app, token, csrf)
    _add_routes(app, fastapi, view, csrf, user)
    return app


def _add_guard(app: Any, token: str | None, csrf: str) -> None:
    """Refuse what :func:`_refuse` refuses; trade a ``?token=`` for a cookie; security headers."""
    from fastapi.responses import JSONResponse, RedirectResponse

    @app.middleware("http")
    async def guard(request: Any, call_next: Any) -> Any:
        refusal = _refuse(request, token, csrf)
        if refusal is not None:
            status, message = refusal
            response = JSONResponse({"error": message}, status_code=status)
        elif token and request.query_params.get("token") and request.url.path == "/":
            response = RedirectResponse("/", status_code=303)  # the token leaves the address bar
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        else:
            response = await call_next(request)
        response.headers.update(HEADERS)
        return response


def _add_routes(app: Any, fastapi: Any, view: ReviewView, csrf: str, user: str | None) -> None:
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    @app.get("/", response_class=HTMLResponse)
    def page() -> Any:
        return HTMLResponse(render_page(view, csrf))

    @app.get("/favicon.ico")
    def favicon() -> Any:
        return Response(status_code=204)

    @app.get("/static/{name}")
    def static(name: str) -> Any:
        if name not in STATIC_FILES:
            raise fastapi.HTTPException(404, "not found")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    # An unknown id is a 404 and a misfit edit a 400, wherever a route meets them.
    @app.exception_handler(NotFound)
    async def not_found(request: Any, exc: NotFound) -> Any:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(edits.EditError)
    async def bad_edit(request: Any, exc: edits.EditError) -> Any:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/img/{layer_id}")
    def image(layer_id: str) -> Any:
        return FileResponse(view.image_path(layer_id), media_type="image/png")

    @app.get("/api/clusters")
    def clusters() -> Any:
        return {"clusters": view.clusters()}

    @app.get("/api/clusters/{cluster_id}/members")
    def members(cluster_id: int, offset: int = 0, limit: int | None = None) -> Any:
        return view.member_page(cluster_id, offset, limit)

    @app.get("/api/edits")
    def edit_log() -> Any:
        return {"edits": view.edit_list()}

    @app.post("/api/edits")
    async def add_edit(request: fastapi.Request) -> Any:
        body = await _json_body(request, fastapi)
        if body.get("op") == "undo" and body.get("target") is None:
            body["target"] = view.last_undoable()
        return {"edit": edits.append_edit(view.ws, body, who=user)}


async def _json_body(request: Any, fastapi: Any) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise fastapi.HTTPException(400, "the body must be JSON") from exc
    if not isinstance(body, dict):
        raise fastapi.HTTPException(400, "the body must be a JSON object")
    return body


def _refuse(request: Any, token: str | None, csrf: str) -> tuple[int, str] | None:
    """(status, message) when a request must be refused, else None."""
    host = request.headers.get("host", "")
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if token is None and hostname not in LOOPBACK:
        return 400, "unexpected Host header"
    if token is not None:
        given = (
            request.cookies.get(TOKEN_COOKIE)
            or request.headers.get("x-review-token")
            or (request.query_params.get("token") if request.url.path == "/" else None)
        )
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return 401, "a valid review token is required (printed when yokai review started)"
    if request.method not in SAFE_METHODS:
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent.encode(), csrf.encode()):
            return 403, "missing or wrong CSRF token"
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return 415, "state-changing requests must send JSON"
    return None


def render_page(view: ReviewView, csrf: str) -> str:
    """The review page (Jinja2, autoescaped: names are shown as text)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    cards = view.clusters()
    return env.get_template("review.html.j2").render(
        clusters=cards,
        live=[c for c in cards if c["id"] != edits.NOISE and not c["excluded"]],
        edits=view.edit_list()[:50],
        skipped=view.state.skipped if view.state else [],
        csrf=csrf,
        page_size=view.cfg.page_size,
        workspace=str(view.ws.root),
        tiers=edits.TIERS,
        types=edits.TYPES,
    )
