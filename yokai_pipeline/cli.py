"""The ``yokai`` command: thin; parses arguments and calls the library or a flow.

Each group of commands lives in ``yokai_pipeline/commands/<name>.py`` and exposes
``register(app)``; this module only assembles them.
"""

from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(
    help="Yokai Pipeline: anime episodes -> per-character LoRA datasets and training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order = order in `yokai --help`.
COMMAND_MODULES = [
    "run",
    "analyze",
    "name",
    "select",
    "review",
    "augment",
    "tag",
    "caption",
    "prepare",
    "validate",
    "backgrounds",
    "train",
    "ingest",
]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"yokai_pipeline.commands.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"yokai_pipeline.commands.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
