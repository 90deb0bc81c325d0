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
