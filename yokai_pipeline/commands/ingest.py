"""`yokai ingest`: one ingest pass over an inbox (what the scheduled deployment runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from yokai_pipeline.commands.run import build_config, exit_unless_completed, prepare_prefect_env

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def ingest(
        inbox: Annotated[str, typer.Argument(help="Folder or s3://bucket/prefix where new episodes land.")],
        workspace: Annotated[
            Path, typer.Option(help="Run workspace (keeps the ingest registry and claims).")
        ] = Path("runs/default"),
        config: Annotated[Path | None, typer.Option(help="PipelineConfig as TOML or JSON.")] = None,
        stable_seconds: Annotated[
            float, typer.Option(help="Take a video only once its size has not changed for this long.")
        ] = 30.0,
    ) -> None:
        """Process each new, completely written episode in INBOX once, then update the datasets."""
        cfg = build_config(config, None, None, None)
        ws = workspace.resolve()
        prepare_prefect_env(ws)
        from flows.ingest import ingest_flow

        state = ingest_flow(inbox, str(ws), cfg, stable_seconds=stable_seconds, return_state=True)
        exit_unless_completed(state, "ingest")
        res = state.result()
        console.print(
            f"{len(res['new'])} new episode(s), {len(res['done'])} processed, {len(res['skipped'])} skipped; "
            f"workspace: {ws}"
        )
