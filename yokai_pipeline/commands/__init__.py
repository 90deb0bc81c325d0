"""Typer commands, one module per group; each exposes ``register(app)``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console


@contextlib.contextmanager
def progress_bars(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress display; yields ``sink(label, done, total)`` that draws one bar per label."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars: dict[str, Any] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as prog:

        def sink(label: str, done: int, total: int) -> None:
            if label not in bars:
                bars[label] = prog.add_task(label, total=total)
            prog.update(bars[label], completed=done, total=total)

        yield sink


def run_with_progress(
    console: Console, work: Callable[[Callable[[str, int, int], None]], dict], show: Callable[[dict], None]
) -> dict:
    """Run ``work(sink)`` under progress bars, print its summary with ``show``; exit 1 on failure.

    A :class:`~yokai_pipeline.errors.YokaiError` is printed as one line; a summary with failed
    items is shown before the exit, so the user sees which files they were.
    """
    import typer

    from yokai_pipeline.errors import YokaiError

    try:
        with progress_bars(console) as sink:
            summary = work(sink)
    except YokaiError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    show(summary)
    if summary["failed"]:
        raise typer.Exit(1)
    return summary
