"""`yokai validate`: check a kohya training-data folder before training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def validate(
        data_dir: Annotated[
            Path, typer.Argument(help="Training data folder ({repeat}_{name}/ folders + configs/).")
        ],
        output_report: Annotated[Path, typer.Option(help="JSON report path.")] = Path(
            "validation_report.json"
        ),
        min_resolution: Annotated[int, typer.Option(help="Shorter image side below this is an issue.")] = 512,
    ) -> None:
        """Validate images, captions, folder structure and kohya configs; exit 1 when anything is invalid."""
        from yokai_pipeline.validation import format_validation_summary, validate_training_data

        report = validate_training_data(data_dir, min_resolution=min_resolution, report_path=output_report)
        typer.echo(format_validation_summary(report))
        typer.echo(f"Report: {output_report}")
        if not report["passed"]:
            raise typer.Exit(1)
