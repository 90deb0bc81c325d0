"""`yokai tag`: a ``.tags.json`` sidecar of Danbooru tags next to every image (WD14 or offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from yokai_pipeline.commands import run_with_progress
from yokai_pipeline.config import TagConfig

console = Console(stderr=True)


def tag(
    directory: Annotated[
        Path, typer.Argument(help="Folder of cluster folders (augmented_clusters) or of images.")
    ],
    backend: Annotated[str, typer.Option(help="wd14 or offline (no weights).")] = "wd14",
    model: Annotated[
        str,
        typer.Option(help="WD14 v3 tagger: hub id (from the HF cache, never downloaded) or local folder."),
    ] = "SmilingWolf/wd-eva02-large-tagger-v3",
    runtime: Annotated[str, typer.Option(help="torch (timm weights) or onnx (model.onnx, CPU).")] = "torch",
    device: Annotated[str, typer.Option(help="cuda, cpu or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    num_workers: Annotated[int, typer.Option(help="Decode processes (0 = inline).")] = 4,
    general_threshold: Annotated[float, typer.Option(help="General tag threshold.")] = 0.35,
    character_threshold: Annotated[float, typer.Option(help="Character tag threshold.")] = 0.85,
    mcut: Annotated[bool, typer.Option(help="MCut thresholds per image (general and character).")] = False,
    selection: Annotated[Path | None, typer.Option(help="selection.json: only its clusters.")] = None,
) -> None:
    """Tag images; images whose tags match these settings are skipped."""
    from yokai_pipeline.tagging import tag_clusters

    try:
        cfg = TagConfig(
            backend=backend,  # type: ignore[arg-type]
            model=model,
            runtime=runtime,  # type: ignore[arg-type]
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            general_threshold=general_threshold,
            character_threshold=character_threshold,
            general_mcut=mcut,
            character_mcut=mcut,
        )
    except ValueError as exc:
        console.print(f"[red]invalid option:[/red] {exc}")
        raise typer.Exit(2) from exc
    run_with_progress(
        console, lambda sink: tag_clusters(directory, cfg, selection=selection, progress=sink), print_summary
    )


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"Tags ({summary['backend']})")
    for col in ("folder", "tagged", "skipped", "failed", "top tags", "core tags"):
        table.add_column(col)
    for r in summary["results"]:
        table.add_row(
            Path(r["folder"]).name,
            str(r["tagged"]),
            str(r["skipped"]),
            str(len(r["failed"])),
            ", ".join(t["tag"] for t in r["top_tags"][:6]),
            ", ".join(r["core_tags"]),
        )
    console.print(table)
    console.print(
        f"{summary['tagged']} tagged, {summary['skipped']} already had tags, {len(summary['failed'])} failed; "
        f"{summary['seconds']:.1f} s ({summary['images_per_s']:.1f} images/s)"
    )
    for f in summary["failed"]:
        console.print(f"[red]failed[/red] {f['folder']}/{f['name']}: {f['problem']}")


def register(app: typer.Typer) -> None:
    app.command("tag")(tag)
