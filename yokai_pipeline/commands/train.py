"""``yokai train CONFIG...``: train character LoRAs (built-in trainer or kohya sd-scripts)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from yokai_pipeline.errors import BadInputError, ConfigError, YokaiError


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def train(
    configs: Annotated[
        list[Path],
        typer.Argument(
            help="Training-args TOML(s) from `yokai prepare` (kohya --config_file).",
            exists=True,
            dir_okay=False,
        ),
    ],
    backend: Annotated[
        str,
        typer.Option(help="builtin (diffusers+peft, no sd-scripts) or kohya (sd-scripts train_network.py)."),
    ] = "builtin",
    max_steps: Annotated[
        int | None,
        typer.Option(help="builtin: stop at this global step (state is saved; run again to resume)."),
    ] = None,
    sd_scripts: Annotated[
        Path | None, typer.Option(help="kohya: sd-scripts checkout (else $YOKAI_SD_SCRIPTS).")
    ] = None,
    python: Annotated[
        Path | None, typer.Option(help="kohya: python of the sd-scripts environment (else $YOKAI_SD_PYTHON).")
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(help="Base model (hub id, diffusers folder or .safetensors) instead of the config's."),
    ] = None,
    launcher: Annotated[
        str, typer.Option(help="kohya: accelerate, python (run train_network.py directly) or auto.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="builtin: auto, cpu, cuda or cuda:N.")] = "auto",
    evidence: Annotated[
        bool,
        typer.Option(help="After training, sample every checkpoint into an HTML grid (evidence/index.html)."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="kohya: print every output line.")] = False,
) -> None:
    """Train one LoRA per config; finished characters are skipped, interrupted ones resume."""
    console = Console()
    if backend not in ("builtin", "kohya"):
        console.print(f"[red]--backend must be builtin or kohya, got {backend!r}[/red]")
        raise typer.Exit(2)
    if backend == "kohya":
        from yokai_pipeline.kohya_launch import resolve_sd_python, resolve_sd_scripts

        try:  # fail before any work, with exactly what to set
            resolve_sd_python(python, resolve_sd_scripts(sd_scripts))
        except ConfigError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from exc

    results: list[tuple[Path, dict[str, Any] | None, str | None]] = []
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        for cfg in configs:
            task = progress.add_task(cfg.stem.removesuffix("_config"), total=None, info="")

            def on_progress(p: dict[str, Any], task: Any = task) -> None:
                info = []
                if p.get("epoch") is not None:
                    info.append(f"epoch {p['epoch']}/{p.get('total_epochs', '?')}")
                if p.get("loss") is not None:
                    info.append(f"loss {p['loss']:.4f}")
                if p.get("val_loss") is not None:
                    info.append(f"val {p['val_loss']:.4f}")
                progress.update(
                    task, completed=p.get("step"), total=p.get("total_steps"), info="  ".join(info)
                )

            def on_line(line: str) -> None:
                if verbose:
                    progress.console.print(line, markup=False, highlight=False)

            try:
                if backend == "builtin":
                    from yokai_pipeline.training import train_lora_builtin

                    res = train_lora_builtin(
                        cfg,
                        base_model_override=base_model,
                        max_steps=max_steps,
                        device=device,
                        on_progress=on_progress,
                    )
                else:
                    from yokai_pipeline.kohya_launch import launch_kohya

                    res = launch_kohya(
                        cfg,
                        sd_scripts=sd_scripts,
                        python=python,
                        base_model=base_model,
                        on_progress=on_progress,
                        on_line=on_line,
                        launcher=launcher,
                    )
                if evidence and res.get("status") in ("finished", "skipped"):
                    from yokai_pipeline.checkpoints import render_checkpoint_evidence

                    progress.update(task, info="sampling checkpoints")
                    res["evidence"] = render_checkpoint_evidence(
                        cfg, base_model_override=base_model, device=device
                    )["html"]
                results.append((cfg, res, None))
            except ConfigError as exc:
                # A missing setting concerns every config: stop here with what to set.
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(2) from exc
            except (BadInputError, YokaiError, OSError) as exc:
                # One failing character fails alone; the others still train.
                results.append((cfg, None, str(exc)))
            progress.update(task, info=(results[-1][1] or {}).get("status", "failed"))

    table = Table(title=f"LoRA training ({backend})")
    for col in ("character", "status", "step", "best epoch", "checkpoint / error"):
        table.add_column(col)
    for cfg, res, err in results:
        if res is None:
            table.add_row(cfg.stem, "[red]failed[/red]", "", "", err or "")
        else:
            table.add_row(
                cfg.stem,
                res.get("status", ""),
                str(res.get("global_step") or res.get("step") or ""),
                str(res.get("best_epoch") or ""),
                str(res.get("checkpoint") or ""),
            )
    console.print(table)
    failed = [r for r in results if r[1] is None]
    if failed:
        console.print(
            f"[red]{len(failed)} of {len(results)} failed[/red]; "
            "rerun `yokai train` on them to retry (finished ones are skipped)."
        )
        raise typer.Exit(1)
