"""`yokai analyze`: cluster quality, tiers and character types; JSON + HTML report."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from yokai_pipeline.config import load_config
from yokai_pipeline.errors import YokaiError

console = Console(stderr=True)


class TypeBackend(StrEnum):
    offline = "offline"
    clip = "clip"


def analyze(
    clusters: Annotated[Path, typer.Argument(help="The character_clusters folder (with clusters.json).")],
    output_json: Annotated[
        Path | None,
        typer.Option("--output-json", help="Default: <workspace>/analysis/cluster_analysis.json."),
    ] = None,
    output_html: Annotated[
        Path | None, typer.Option("--output-html", help="Default: next to the JSON, .html.")
    ] = None,
    type_backend: Annotated[
        TypeBackend, typer.Option("--type-backend", help="offline heuristic or CLIP zero-shot prompts.")
    ] = TypeBackend.offline,
    config: Annotated[
        Path | None, typer.Option("--config", help="Pipeline config file (TOML or JSON).")
    ] = None,
    truth: Annotated[
        Path | None,
        typer.Option("--truth", help='JSON {"<cluster id>": "human"|"yokai"}: print the type accuracy.'),
    ] = None,
) -> None:
    """Analyse cluster quality and recommend tiers (S/A/B recommended, C needs augmentation)."""
    from yokai_pipeline import analysis

    try:
        cfg = load_config(config)
        json_path = output_json or clusters.resolve().parent / "analysis" / "cluster_analysis.json"
        html_path = output_html or json_path.with_suffix(".html")
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        ) as prog:
            task = prog.add_task("analysing clusters", total=None)
            result = analysis.analyze_clusters(
                clusters,
                cfg.analysis,
                type_backend=type_backend.value,
                clip_cfg=cfg.embedding.model_copy(update={"backend": "clip"}),
                progress=lambda done, total: prog.update(task, completed=done, total=total),
            )
        analysis.write_analysis(result, json_path, html_path)
        accuracy = None
        if truth is not None:
            accuracy = analysis.type_accuracy(result, json.loads(truth.read_text(encoding="utf-8")))
    except (YokaiError, OSError, ValueError) as exc:
        console.print(f"[red]analyze failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    typer.echo(analysis.format_summary(result))
    typer.echo("")
    if accuracy is not None:
        typer.echo(f"Type accuracy: {accuracy:.1%} ({type_backend.value} backend)")
    for err in result["errors"][:5]:
        console.print(f"[yellow]skipped:[/yellow] {err}")
    if len(result["errors"]) > 5:
        console.print(
            f"[yellow]... {len(result['errors']) - 5} more unreadable images (see the JSON)[/yellow]"
        )
    typer.echo(f"JSON:   {json_path}")
    typer.echo(f"Report: {html_path}")


def register(app: typer.Typer) -> None:
    """Add `yokai analyze`."""
    app.command("analyze")(analyze)
