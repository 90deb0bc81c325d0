"""The frozen base model, loaded once per process per device and reused character after character.

The built-in trainer changes a base model in three ways: it moves and casts the frozen parts
to the training device and dtype, injects LoRA adapters, and switches train/eval modes. The
first is what the cache key fixes (family, model, device, dtype), so the next character needs
no copy; the adapters are removed again when a character's training ends (each wrapper layer
is put back to the layer it wraps), so the next character starts from the untouched base
weights with fresh adapters. One training at a time uses an entry (its lock); a device lease
already gives one training per device.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from yokai_pipeline.training import families

_guard = threading.Lock()
_entries: dict[tuple[str, str, str, str], _Entry] = {}
_loads = 0


@dataclass
class _Entry:
    model: families.BaseModel | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _model_key(name_or_path: str | Path) -> str:
    """The same local model by any spelling of its path is one entry; a hub id is itself."""
    path = Path(str(name_or_path)).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


@contextlib.contextmanager
def base_model(
    name_or_path: str | Path, family: str, device: str, dtype: str
) -> Iterator[families.BaseModel]:
    """The process's base model for ``(family, model, device, dtype)``, held for one training.

    Loaded on first use (:func:`families.load_base_model`); the LoRA adapters that the block
    injects are removed when it ends, an error included.
    """
    global _loads
    key = (family, _model_key(name_or_path), str(device), str(dtype))
    with _guard:
        entry = _entries.setdefault(key, _Entry())
    with entry.lock:
        if entry.model is None:
            entry.model = families.load_base_model(name_or_path, family)
            with _guard:
                _loads += 1
        try:
            yield entry.model
        finally:
            remove_adapters(entry.model)


def remove_adapters(model: families.BaseModel) -> int:
    """Put every peft wrapper layer of the UNet and text encoders back to its base layer; returns how many."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    removed = 0
    for module in (model.unet, *model.text_encoders):
        wrapped = [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
        for name, layer in wrapped:
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
            removed += 1
        if hasattr(module, "peft_config"):
            del module.peft_config  # injection records its config on the module
    return removed


def load_count() -> int:
    """Base models this process has loaded through the cache (tests, logs)."""
    return _loads


def clear() -> None:
    """Forget every cached model (frees its memory once no training holds it)."""
    with _guard:
        _entries.clear()
