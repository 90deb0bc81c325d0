"""`yokai prepare-backgrounds`: background LoRA data (dedup, most diverse, captions, kohya configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from yokai_pipeline.config import BackgroundConfig, load_config
from yokai_pipeline.errors import BadInputError

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("prepare-backgrounds")
    def prepare_backgrounds_cmd(
        layers: Annotated[
            Path, typer.Argument(help="Folder of background layers (layered_frames/background).")
        ],
        output_dir: Annotated[Path, typer.Option(help="Output folder (training_data/backgrounds).")] = Path(
            "training_data/backgrounds"
        ),
        repeat_count: Annotated[int, typer.Option(help="kohya repeats of the background folder.")] = 10,
        max_backgrounds: Annotated[
            int, typer.Option(help="Keep at most this many most-diverse backgrounds.")
        ] = 500,
        similarity_threshold: Annotated[
            float, typer.Option(help="Cosine similarity at or above which two backgrounds are duplicates.")
        ] = 0.95,
        trigger: Annotated[str, typer.Option(help="Trigger word of background captions.")] = "bg_style",
        embedder: Annotated[
            str,
            typer.Option(
                help="config (the configured embedding backend: CLIP when embedding.backend is clip), "
                "descriptor (offline, no weights) or clip (the config's CLIP model)."
            ),
        ] = "config",
        config: Annotated[
            Path | None, typer.Option(help="PipelineConfig TOML/JSON (its [packaging] section).")
        ] = None,
    ) -> None:
        """Deduplicate, pick the most diverse, caption and package background layers for kohya."""
        from yokai_pipeline.backgrounds import (
            clip_embed_fn,
            configured_embed_fn,
            embed_backgrounds,
            format_background_summary,
            prepare_backgrounds,
        )

        try:
            pipeline_cfg = load_config(config)
            cfg = BackgroundConfig(
                repeat_count=repeat_count,
                max_backgrounds=max_backgrounds,
                similarity_threshold=similarity_threshold,
                trigger=trigger,
            )
            if embedder not in ("config", "descriptor", "clip"):
                raise ValueError(f"--embedder must be config, descriptor or clip, not {embedder!r}")
        except Exception as exc:
            console.print(f"[red]invalid configuration:[/red] {exc}")
            raise typer.Exit(2) from exc
        embed_fn = {
            "config": lambda: configured_embed_fn(pipeline_cfg.embedding),
            "clip": lambda: clip_embed_fn(pipeline_cfg.embedding),
            "descriptor": lambda: embed_backgrounds,
        }[embedder]()
        try:
            summary = prepare_backgrounds(
                layers, output_dir, cfg, packaging=pipeline_cfg.packaging, embed_fn=embed_fn
            )
        except BadInputError as exc:
            console.print(f"[red]bad input:[/red] {exc}")
            raise typer.Exit(2) from exc
        for item in summary["skipped"]:
            console.print(f"[yellow]skipped[/yellow] {item['path']}: {item['problem']}")
        typer.echo(format_background_summary(summary))
        if not summary["kept"]:
            raise typer.Exit(1)
