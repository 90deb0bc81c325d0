"""kohya training-args TOML: reading it flat, resolving its paths, typed values."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import BadInputError, YokaiError


class TrainingError(YokaiError):
    """Training failed; the message says how (for kohya: the last lines of its output)."""


def read_training_args(config_file: str | Path) -> dict[str, Any]:
    """Read a kohya training-args TOML: section names are ignored, all keys merge flat.

    Args:
        config_file: the ``--config_file`` TOML of train_network.py.

    Returns:
        The flat key -> value mapping (values keep their TOML types, as kohya does).
    """
    data = read_toml(Path(config_file), "training config")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        # kohya (read_config_from_file) flattens one level of sections.
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a BadInputError naming the file when it is missing or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BadInputError(path, f"{what} file not found") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(path, f"not a valid TOML file: {exc}") from exc


def resolve_config_path(value: str | Path, config_file: str | Path) -> Path:
    """A path from a kohya config: absolute as is; relative to the config's folder if it exists there.

    kohya resolves relative paths against its working directory; our packager writes absolute
    paths, and a relative one most often means "next to the config".
    """
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    beside = Path(config_file).resolve().parent / p
    return beside if beside.exists() else p.resolve()


def _typed(args: dict[str, Any], key: str, kind: type, default: Any, source: Path) -> Any:
    value = args.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadInputError(source, f"{key} must be {kind.__name__}, got {value!r}")
    return value


def _resolution(value: Any, source: Path) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str) and re.fullmatch(r"\d+(,\d+)?", value.replace(" ", "")):
        parts = [int(v) for v in value.replace(" ", "").split(",")]
        return (parts[0], parts[-1])
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise BadInputError(source, f"resolution must be an int or [width, height], got {value!r}")
