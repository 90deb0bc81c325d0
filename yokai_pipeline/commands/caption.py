"""`yokai caption`: write a ``.txt`` caption next to every image (BLIP-2 or offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from yokai_pipeline.commands import run_with_progress
from yokai_pipeline.config import CaptionConfig, TagConfig

console = Console(stderr=True)


def caption(
    directory: Annotated[
        Path, typer.Argument(help="Folder of cluster folders (augmented_clusters) or of images.")
    ],
    model: Annotated[str, typer.Option(help="BLIP-2 hub id or local folder.")] = "Salesforce/blip2-opt-6.7b",
    device: Annotated[str, typer.Option(help="cuda, cpu or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per generate() call.")] = 8,
    backend: Annotated[str, typer.Option(help="blip2 or offline (no weights).")] = "blip2",
    max_new_tokens: Annotated[int, typer.Option(help="Caption length limit in tokens.")] = 40,
    compile: Annotated[
        bool,
        typer.Option(help="CUDA: static KV cache + compiled decode step (faster after ~30 s compiling)."),
    ] = True,
    selection: Annotated[
        Path | None, typer.Option(help="selection.json: trigger words, types; only its clusters.")
    ] = None,
    cluster_analysis: Annotated[
        Path | None, typer.Option(help="cluster_analysis.json: the type of each cluster.")
    ] = None,
    content: Annotated[
        str,
        typer.Option(
            help="sentence, tags (from `yokai tag` sidecars; no captioner) or both (tags, then sentence)."
        ),
    ] = "sentence",
    prune_core_tags: Annotated[
        bool,
        typer.Option(help="Leave tags found on most of a character's images out (the trigger learns them)."),
    ] = True,
) -> None:
    """Caption images (guide step 4); images that already have a caption are skipped."""
    from yokai_pipeline.captioning import caption_clusters

    try:
        cfg = CaptionConfig(
            backend=backend,  # type: ignore[arg-type]
            model=model,
            device=device,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            compile=compile,
        )
        tags = TagConfig(caption=content, prune_core_tags=prune_core_tags)  # type: ignore[arg-type]
    except ValueError as exc:
        console.print(f"[red]invalid option:[/red] {exc}")
        raise typer.Exit(2) from exc
    run_with_progress(
        console,
        lambda sink: caption_clusters(
            directory, cfg, analysis=cluster_analysis, selection=selection, progress=sink, tags=tags
        ),
        print_summary,
    )


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"Captions ({summary['backend']})")
    for col in ("folder", "trigger", "type", "captioned", "skipped", "failed"):
        table.add_column(col)
    for r in summary["results"]:
        table.add_row(
            Path(r["folder"]).name,
            r["trigger"],
            r["type"],
            str(r["captioned"]),
            str(r["skipped"]),
            str(len(r["failed"])),
        )
    console.print(table)
    console.print(
        f"{summary['captioned']} captioned, {summary['skipped']} already had captions, "
        f"{len(summary['failed'])} failed, {summary['fallback']} fallback captions; "
        f"{summary['seconds']:.1f} s ({summary['images_per_s']:.1f} images/s)"
    )
    for f in summary["failed"]:
        console.print(f"[red]failed[/red] {f['folder']}/{f['name']}: {f['problem']}")


def register(app: typer.Typer) -> None:
    app.command("caption")(caption)
