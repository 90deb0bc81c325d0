"""`yokai augment`: expand small clusters with the guide's augmentation table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from yokai_pipeline.commands import run_with_progress
from yokai_pipeline.config import AugmentConfig

console = Console(stderr=True)


def augment(
    clusters: Annotated[Path, typer.Argument(help="Folder of cluster_NNN folders (character_clusters).")],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where augmented clusters go.")],
    max_original: Annotated[
        int, typer.Option(help="Only clusters with at most this many images are augmented.")
    ] = 30,
    min_original: Annotated[int, typer.Option(help="Clusters with fewer images are copied unchanged.")] = 5,
    aug_intensity: Annotated[
        str,
        typer.Option(
            help="Transform strength: light, medium or heavy (the multiplier is automatic by count)."
        ),
    ] = "medium",
    selection: Annotated[Path | None, typer.Option(help="selection.json: only its clusters.")] = None,
    cluster_analysis: Annotated[
        Path | None, typer.Option(help="Cluster analysis JSON (a 'symmetric' flag per cluster allows flips).")
    ] = None,
    allow_flip: Annotated[bool, typer.Option(help="Allow horizontal flips for every cluster.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same images).")] = 0,
) -> None:
    """Augment small clusters (guide step 3); clusters outside min/max are copied as they are."""
    from yokai_pipeline.augmentation import augment_clusters

    try:
        cfg = AugmentConfig(
            max_original=max_original,
            min_original=min_original,
            intensity=aug_intensity,  # type: ignore[arg-type]
            allow_flip=allow_flip,
            seed=seed,
        )
    except ValueError as exc:
        console.print(f"[red]invalid option:[/red] {exc}")
        raise typer.Exit(2) from exc
    run_with_progress(
        console,
        lambda sink: augment_clusters(
            clusters, output_dir, cfg, analysis=cluster_analysis, selection=selection, progress=sink
        ),
        print_summary,
    )


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="Augmentation")
    for col in ("cluster", "originals", "multiplier", "augmented", "total", "status"):
        table.add_column(col, justify="right" if col not in ("cluster", "status") else "left")
    for r in summary["results"]:
        table.add_row(
            r["cluster"],
            str(r["originals"]),
            f"{r['multiplier']:g}x",
            str(r["augmented"]),
            str(r["total"]),
            r["status"],
        )
    console.print(table)
    console.print(
        f"{summary['clusters']} clusters: {summary['augmented_clusters']} augmented, "
        f"{summary['copied_clusters']} copied unchanged, {summary['resumed_clusters']} already done; "
        f"{summary['originals']} originals -> {summary['total']} images in {summary['seconds']:.1f} s"
    )
    for f in summary["failed"]:
        console.print(f"[red]failed[/red] {f['cluster']}/{f['name']}: {f['problem']}")


def register(app: typer.Typer) -> None:
    app.command("augment")(augment)
