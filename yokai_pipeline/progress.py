"""A process-wide progress sink so the CLI can draw bars for work that runs inside flows.

Library stages take a ``progress(done, total)`` callback; task wrappers build one with
:func:`reporter`, which forwards to whatever sink the CLI installed (a rich progress bar)
and to an optional logger. Without a sink nothing is drawn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Sink = Callable[[str, int, int], None]

_sink: Sink | None = None
_lock = threading.Lock()


def set_sink(sink: Sink | None) -> None:
    """Install (or remove) the process-wide progress sink."""
    global _sink
    with _lock:
        _sink = sink


def reporter(
    label: str, log: Callable[[str], None] | None = None, every: float = 0.25
) -> Callable[[int, int], None]:
    """Return a ``progress(done, total)`` callback for one unit of work called ``label``.

    ``log`` (a Prefect logger's ``info``) gets a line at every ``every`` fraction of the work.
    """
    state = {"next": every}

    def progress(done: int, total: int) -> None:
        with _lock:
            sink = _sink
        if sink is not None:
            sink(label, done, total)
        if log is not None and total > 0 and (done / total >= state["next"] or done == total):
            log(f"{label}: {done}/{total}")
            while state["next"] <= done / total:
                state["next"] += every

    return progress
