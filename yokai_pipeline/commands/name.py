"""`yokai name`: name clusters after reference images (one folder per character)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from yokai_pipeline.config import load_config
from yokai_pipeline.errors import YokaiError

console = Console(stderr=True)


def name(
    workspace: Annotated[Path, typer.Argument(help="Run workspace (with character_clusters/clusters.json).")],
    refs: Annotated[
        Path, typer.Option("--refs", help="Folder with one sub-folder of 1-3 images per character name.")
    ],
    max_distance: Annotated[
        float | None,
        typer.Option(
            "--max-distance", help="Identity distance threshold (default: CCIP's own, or 0.25 cosine)."
        ),
    ] = None,
    seed: Annotated[
        bool,
        typer.Option(
            "--seed/--no-seed", help="Unmatched references gather matching noise into new clusters."
        ),
    ] = True,
    config: Annotated[
        Path | None, typer.Option("--config", help="Pipeline config file (TOML or JSON).")
    ] = None,
) -> None:
    """Give clusters the names (and trigger words) of the reference characters they match."""
    from yokai_pipeline import naming
    from yokai_pipeline.workspace import Workspace

    try:
        cfg = load_config(config)
        update: dict = {"seed_clusters": seed}
        if max_distance is not None:
            update["max_distance"] = max_distance
        ncfg = cfg.naming.model_validate({**cfg.naming.model_dump(), **update})
        result = naming.name_clusters(Workspace(workspace), refs, ncfg, cfg.embedding, cfg.clustering)
    except YokaiError as exc:
        console.print(f"[red]name failed:[/red] {exc}")
        raise typer.Exit(2) from exc
    for line in naming.naming_report_lines(result):
        typer.echo(line)
    typer.echo(f"Names: {workspace / naming.NAMING_FILE} ({len(result['names'])} clusters named)")


def register(app: typer.Typer) -> None:
    """Add `yokai name`."""
    app.command("name")(name)
