"""`yokai prepare`: package captioned clusters as kohya datasets with training configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from yokai_pipeline.config import PackagingConfig, TrainingConfig, load_config
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.training.families import get_family

console = Console(stderr=True)


def parse_cluster_ids(values: list[str] | None) -> list[int] | None:
    """``["3,5", "7"]`` -> ``[3, 5, 7]`` (accepts repeated options and comma/space lists)."""
    if not values:
        return None
    out = []
    for v in values:
        for tok in v.replace(",", " ").split():
            try:
                out.append(int(tok.removeprefix("cluster_")))
            except ValueError as exc:
                raise typer.BadParameter(f"not a cluster id: {tok!r}") from exc
    return out


def _read_json(path: Path | None, what: str) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(path, f"{what} is not valid JSON: {exc}") from exc


def register(app: typer.Typer) -> None:
    @app.command()
    def prepare(
        clusters_dir: Annotated[
            Path, typer.Argument(help="Folder of captioned cluster_NNN/ folders (augmented_clusters).")
        ],
        output_dir: Annotated[Path, typer.Option(help="Output folder (training_data/characters).")] = Path(
            "training_data/characters"
        ),
        validation_split: Annotated[
            float, typer.Option(help="Fraction of originals held out for validation.")
        ] = 0.1,
        selected_clusters: Annotated[
            list[str] | None, typer.Option(help="Only these cluster ids (repeat or comma-separate).")
        ] = None,
        no_auto_params: Annotated[
            bool,
            typer.Option("--no-auto-params", help="Standard parameters instead of the table by image count."),
        ] = False,
        selection: Annotated[
            Path | None, typer.Option(help="selection.json (default: next to CLUSTERS_DIR).")
        ] = None,
        cluster_analysis: Annotated[
            Path | None, typer.Option(help="cluster_analysis.json (optional).")
        ] = None,
        alpha_mode: Annotated[
            str | None, typer.Option(help="alpha_mask (keep RGBA + masked_loss) or composite.")
        ] = None,
        resolution: Annotated[int | None, typer.Option(help="Training resolution.")] = None,
        min_resolution: Annotated[
            int | None, typer.Option(help="Shorter side below this is too low-resolution (left out).")
        ] = None,
        upscale_to: Annotated[
            int | None, typer.Option(help="Upscale images whose shorter side is below this (0 = never).")
        ] = None,
        multi_concept: Annotated[
            bool,
            typer.Option(
                "--multi-concept", help="Also write one config training all characters in one LoRA."
            ),
        ] = False,
        config: Annotated[
            Path | None, typer.Option(help="PipelineConfig TOML/JSON (its [packaging] section).")
        ] = None,
        family: Annotated[
            str | None,
            typer.Option(
                help="Model family: sd15 (train_network.py, 512 px) or sdxl (sdxl_train_network.py, "
                "1024 px). Default: training.family of the config (sd15)."
            ),
        ] = None,
    ) -> None:
        """Organise clusters into kohya {repeat}_{name}/ folders with dataset + training TOMLs."""
        from yokai_pipeline.kohya import format_preparation_summary, prepare_training_data

        try:
            full = load_config(config)
            # Only what was set: an unset resolution follows the family (512 / 1024).
            data = full.packaging.model_dump(exclude_unset=True)
            data["validation_split"] = validation_split
            data["auto_params"] = full.packaging.auto_params and not no_auto_params
            if alpha_mode:
                data["alpha_mode"] = alpha_mode
            if resolution:
                data["resolution"] = resolution
            for key, value in (("min_resolution", min_resolution), ("upscale_to", upscale_to)):
                if value is not None:
                    data[key] = value
            if multi_concept:
                data["multi_concept"] = True
            cfg = PackagingConfig.model_validate(data)
            training = full.training
            if family:
                get_family(family)  # names the bad value and the known families
                training = TrainingConfig.model_validate({**full.training.model_dump(), "family": family})
        except Exception as exc:
            console.print(f"[red]invalid configuration:[/red] {exc}")
            raise typer.Exit(2) from exc
        try:
            sel = _read_json(selection or clusters_dir.parent / "selection.json", "selection")
            ana = _read_json(
                cluster_analysis or clusters_dir.parent / "analysis" / "cluster_analysis.json", "analysis"
            )
            summary = prepare_training_data(
                clusters_dir,
                output_dir,
                sel,
                cfg,
                analysis=ana,
                selected_clusters=parse_cluster_ids(selected_clusters),
                training=training,
            )
        except BadInputError as exc:
            console.print(f"[red]bad input:[/red] {exc}")
            raise typer.Exit(2) from exc
        for item in summary["skipped"] + summary["low_resolution"]:
            console.print(f"[yellow]skipped[/yellow] {item['path']}: {item['problem']}")
        typer.echo(format_preparation_summary(summary))
        if not summary["characters"]:
            raise typer.Exit(1)
