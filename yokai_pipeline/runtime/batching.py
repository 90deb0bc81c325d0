"""Batch sizes bounded by the leased device's memory: ``batch_size = "auto"`` (or 0), and halving on OOM.

A GPU stage whose config says ``batch_size = "auto"`` (stored as 0) gets the largest power of two (stable
shapes for ``torch.compile``) whose estimated cost fits the device's free memory
(``torch.cuda.mem_get_info``) less a reserve, capped by the stage's upper bound; on the CPU it
gets the stage's usual default. The choice is made once per process, stage and device, so a
model memoised by its config is not loaded again when the free memory moves.

Whatever the size (an explicit integer included), a forward pass that raises
``torch.cuda.OutOfMemoryError`` (or a kernel's 32-bit size-limit error) is run again in halves, the cache freed in between, down to one
item; the smaller size is kept for the stage's later batches on that device and logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Share of the device's total memory left free: the allocator's fragmentation, cuDNN
#: workspaces and buffers of other stages on the device (decode uploads, pinned copies).
RESERVE_FRACTION = 0.15

T = TypeVar("T")


@dataclass(frozen=True)
class BatchCost:
    """What one stage's batch costs on the device.

    Attributes:
        stage: name in logs and in the per-process choice.
        per_item_mib: estimated device memory one item adds to a forward pass (activations,
            autocast copies), excluding the weights, which are resident whatever the batch.
        upper: the largest batch worth running (beyond it throughput no longer grows).
        cpu_default: the batch on a CPU device (memory there is not the bound).
    """

    stage: str
    per_item_mib: float
    upper: int
    cpu_default: int


@dataclass
class Budget:
    """The batch size one model holder uses on its device; lowered when a forward pass runs out of memory."""

    stage: str
    device: str
    size: int


_chosen: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


def _mem_get_info(device: str) -> tuple[int, int]:
    import torch

    return torch.cuda.mem_get_info(torch.device(device))


def auto_batch_size(
    cost: BatchCost, device: str, mem_get_info: Callable[[str], tuple[int, int]] | None = None
) -> int:
    """The largest power of two of items that fits ``device``'s free memory, within ``cost.upper``.

    Args:
        cost: the stage's per-item estimate and bounds.
        device: ``cuda:N`` (a CPU device gets ``cost.cpu_default``).
        mem_get_info: ``(free, total)`` bytes for a device (default ``torch.cuda.mem_get_info``).
    """
    if not str(device).startswith("cuda"):
        return cost.cpu_default
    free, total = (mem_get_info or _mem_get_info)(device)
    usable = free - RESERVE_FRACTION * total
    fits = int(usable // (cost.per_item_mib * MIB)) if usable > 0 else 0
    n = 1
    while n * 2 <= min(fits, cost.upper):
        n *= 2
    log.info(
        "%s on %s: batch %d (%.1f of %.1f GiB free, ~%.0f MiB per item, at most %d)",
        cost.stage,
        device,
        n,
        free / 1024**3,
        total / 1024**3,
        cost.per_item_mib,
        cost.upper,
    )
    return n


def resolve_batch_size(
    cost: BatchCost,
    device: str,
    requested: int | str,
    mem_get_info: Callable[[str], tuple[int, int]] | None = None,
) -> int:
    """The configured batch size: an integer as given, 0 / ``"auto"`` chosen once per process and device."""
    if not is_auto(requested):
        return int(requested)
    key = (cost.stage, str(device))
    with _lock:
        if key not in _chosen:
            _chosen[key] = auto_batch_size(cost, device, mem_get_info)
        return _chosen[key]


def is_auto(requested: int | str) -> bool:
    """Whether a configured batch size asks for a choice from free memory (the config stores ``"auto"`` as 0)."""
    return requested in (0, "auto")


def forget_choices() -> None:
    """Choose ``"auto"`` sizes afresh (tests)."""
    with _lock:
        _chosen.clear()


#: What CUDA kernels raise when one call holds more elements than their 32-bit indexing allows
#: (e.g. ``upsample_bilinear2d_nhwc only supports output tensors with less than INT_MAX
#: elements``, met on the H200 at U^2-Net batch 2026): too big a batch, like out of memory.
_SIZE_LIMIT_MESSAGES = ("INT_MAX", "canUse32BitIndexMath", "32-bit index")


def _is_oom(exc: BaseException) -> bool:
    """Out of device memory, or over a kernel's tensor-size limit: both are fixed by a smaller batch."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _SIZE_LIMIT_MESSAGES)


def run_in_parts(
    fn: Callable[[Any], T],
    batch: Any,
    state: Budget,
    join: Callable[[list[T]], T],
) -> T:
    """``fn(batch)``, in parts of ``state.size`` items, halving the parts on out-of-memory.

    Args:
        fn: the forward pass of a slice of ``batch`` (a tensor or a sequence: anything sliceable).
        batch: the items.
        state: the stage's budget on this device; lowered in place when a part runs out of memory.
        join: puts the parts' outputs back together, in order (``torch.cat``, list concatenation).

    Raises:
        torch.cuda.OutOfMemoryError: a single item does not fit.
    """
    n = len(batch)
    while True:
        size = max(1, min(n, state.size))
        try:
            parts = [fn(batch[i : i + size]) for i in range(0, n, size)]
            return parts[0] if len(parts) == 1 else join(parts)
        except Exception as exc:
            if not _is_oom(exc) or size == 1:
                raise
            import torch

            torch.cuda.empty_cache()  # what the failed attempt held goes back before the retry
            with _lock:
                state.size = min(state.size, size // 2)
            log.warning(
                "%s on %s: out of memory (or over a kernel's size limit) at batch %d; retrying in batches of %d",
                state.stage,
                state.device,
                size,
                state.size,
            )
