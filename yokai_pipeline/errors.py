"""Errors that name the offending input."""

from __future__ import annotations

from pathlib import Path


class YokaiError(Exception):
    """Base class of the pipeline's own errors."""


class BadInputError(YokaiError):
    """An input file is unreadable or invalid. The message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:
        # Exception pickling replays __init__ with self.args (the one message): give it both parts,
        # so the error survives a trip from a worker process.
        return type(self), (self.path, self.problem)


class ConfigError(YokaiError):
    """A setting is missing or wrong; the message says what to set."""
