"""`yokai review`: the browser app to merge, split, name and exclude clusters (edits go to the log)."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from yokai_pipeline.config import load_config
from yokai_pipeline.errors import YokaiError

console = Console(stderr=True)
LOOPBACK_HOST = "127.0.0.1"


def review(
    workspace: Annotated[Path, typer.Argument(help="The run workspace (with character_clusters/).")],
    host: Annotated[
        str | None,
        typer.Option(
            "--host", help="Address to bind (default 127.0.0.1); any other needs the printed token."
        ),
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 8765; 0 = any free).")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Reviewer name in the edit log.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Pipeline config file (TOML or JSON).")
    ] = None,
) -> None:
    """Review the clusters in the browser; the edits apply on the next dataset run."""
    import uvicorn

    from yokai_pipeline.review.app import create_app

    try:
        cfg = load_config(config).review
        bind = host or cfg.host
        # An explicit --host, or any address beyond loopback, is reachable by others: require a token.
        token = secrets.token_urlsafe(24) if host is not None or bind != LOOPBACK_HOST else None
        app = create_app(workspace, cfg, token=token, user=user)
    except YokaiError as exc:
        console.print(f"[red]review failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    # Bind first, so the printed URL has the real port even when --port 0 picks a free one.
    sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, cfg.port if port is None else port))
        sock.listen(128)  # connections made right after the URL is printed wait for uvicorn
    except OSError as exc:
        console.print(f"[red]review failed:[/red] cannot bind {bind}:{port}: {exc}")
        raise typer.Exit(1) from exc
    shown = f"[{bind}]" if ":" in bind else bind
    url = f"http://{shown}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
    typer.echo(f"Review {Path(workspace).resolve()} at {url}")
    if token:
        typer.echo(f"Token (required on every request): {token}")
    typer.echo("Edits go to review/edits.jsonl; the next dataset run applies them. Ctrl+C stops.")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


def register(app: typer.Typer) -> None:
    """Add `yokai review`."""
    app.command("review")(review)
