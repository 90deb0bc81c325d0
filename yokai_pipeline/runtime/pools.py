"""How per-image work is spread: decode processes over shared memory, pinned uploads to the device.

Stages say what an image becomes (a picklable ``prep(item) -> HxWx3 uint8`` function: decode,
composite, resize as the model wants); this module owns the workers. A persistent pool of
spawned decode processes (:func:`decode_pool`) fills uint8 batches in place in a few
shared-memory slots, so nothing is pickled per image; :class:`DeviceUploader` copies each batch
through page-locked memory to the GPU while the workers prepare the next ones. Used by the
CLIP embedder and the WD14 tagger. Imports neither torch nor pydantic at import time (the
workers are plain interpreters with PIL and numpy).
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from yokai_pipeline.errors import BadInputError

ImageLike = Any  # PIL.Image.Image | str | os.PathLike
Prep = Callable[[ImageLike], np.ndarray]

#: Batches a decode pool works on ahead of the one the device is working on.
_PREFETCH_BATCHES = 4
#: Most images per worker task: a batch is split over all workers, so the first batch is ready
#: after ``batch_size / workers`` images per worker instead of a whole batch on one worker.
_MAX_CHUNK = 32


def name_of(item: ImageLike, i: int) -> str:
    """How an input is named in an error: its path, or its position."""
    return str(item) if isinstance(item, str | os.PathLike) else f"<image #{i}>"


def fill_rows(out: np.ndarray, items: Sequence[ImageLike], index0: int, prep: Prep) -> list[tuple[int, str]]:
    """Run ``prep`` on ``items`` into the rows of ``out``; unreadable ones become zero rows.

    Returns:
        ``(index, "name: problem")`` for each failed item, ``index`` counted from ``index0``.
    """
    errs = []
    for k, item in enumerate(items):
        try:
            arr = prep(item)
            if arr.shape != out.shape[1:]:
                raise ValueError(f"preprocessed to {arr.shape}, expected {out.shape[1:]}")
            out[k] = arr
        except (BadInputError, OSError, ValueError) as exc:
            out[k] = 0
            errs.append((index0 + k, f"{name_of(item, index0 + k)}: {exc}"))
    return errs


def _decode_worker(tasks: Any, results: Any) -> None:
    """Body of a decode-pool process: fill rows of shared-memory batches until a None task."""
    import queue
    import signal
    import traceback
    from multiprocessing import shared_memory

    # Ctrl-C reaches the whole process group; the parent decides what happens to the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    slots: dict[str, tuple[Any, np.ndarray]] = {}
    generation = None
    while True:
        try:
            task = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent was killed without shutting the pool down
                break
            continue
        if task is None:
            break
        call, job, gen, name, shape, row0, items, index0, prep = task
        try:
            if gen != generation:  # the parent replaced its slots: let go of the old ones
                _release(slots)
                generation = gen
            if name not in slots:
                shm = shared_memory.SharedMemory(name=name)
                slots[name] = (shm, np.ndarray(shape, dtype=np.uint8, buffer=shm.buf))
            errs = fill_rows(slots[name][1][row0 : row0 + len(items)], items, index0, prep)
            results.put((call, job, errs, None))
        except Exception:  # a bug or MemoryError: report it instead of leaving the parent waiting
            results.put((call, job, [], traceback.format_exc()))
    _release(slots)


def _release(slots: dict[str, tuple[Any, np.ndarray]]) -> None:
    """Close shared-memory slots; a view still held elsewhere only delays the unmapping."""
    for shm, _ in slots.values():
        try:
            shm.close()
        except BufferError:
            pass
    slots.clear()


class DecodePool:
    """Spawned decode processes that fill uint8 batches in shared memory, kept for the process.

    Workers import neither torch nor CUDA (start-up is a plain interpreter plus PIL and numpy)
    and are started with ``spawn`` because the parent holds a CUDA context. Each batch is
    split into chunks over all workers and written in place into one of a few shared-memory
    slots, so nothing is pickled per image and the parent copies one block per batch.
    One call at a time uses a pool; other threads wait for it.
    """

    def __init__(self, workers: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.pid = os.getpid()
        self.closed = False
        self.lock = threading.RLock()
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_decode_worker, args=(self.tasks, self.results), daemon=True, name=f"yokai-decode-{i}"
            )
            for i in range(workers)
        ]
        for p in self.procs:
            p.start()
        self._slots: list[tuple[Any, np.ndarray]] = []
        self._shape: tuple[int, ...] | None = None
        self._generation = 0
        self._calls = 0

    def batches(
        self, items: Sequence[ImageLike], batch_size: int, size: tuple[int, int], prep: Prep
    ) -> Iterator[tuple[int, np.ndarray, list[tuple[int, str]]]]:
        """Yield ``(start, pixels, errors)`` per batch in order; see :func:`pixel_batches`."""
        with self.lock:
            if self.closed:
                raise RuntimeError("decode pool is shut down")
            self._calls += 1
            call, n = self._calls, len(items)
            n_batches = math.ceil(n / batch_size)
            self._ensure_slots((batch_size, *size, 3))
            chunk = max(1, min(_MAX_CHUNK, math.ceil(batch_size / len(self.procs))))
            payload = [str(x) if isinstance(x, os.PathLike) else x for x in items]
            free = list(range(len(self._slots)))[::-1]
            slot_of: dict[int, int] = {}
            remaining: dict[int, int] = {}
            bad: dict[int, list[tuple[int, str]]] = {}
            outstanding = 0

            def submit(j: int) -> int:
                slot_of[j] = s = free.pop()
                start, end = j * batch_size, min(n, (j + 1) * batch_size)
                head = (call, j, self._generation, self._slots[s][0].name, self._slots[s][1].shape)
                remaining[j], bad[j] = 0, []
                for a in range(start, end, chunk):
                    b = min(end, a + chunk)
                    self.tasks.put((*head, a - start, payload[a:b], a, prep))
                    remaining[j] += 1
                return remaining[j]

            submitted = 0
            try:
                while submitted < n_batches and free:
                    outstanding += submit(submitted)
                    submitted += 1
                for j in range(n_batches):
                    while remaining[j]:
                        job, errs, failure = self._receive(call)
                        remaining[job] -= 1
                        outstanding -= 1
                        if failure:
                            raise RuntimeError(f"decode worker failed:\n{failure}")
                        bad[job].extend(errs)
                    start = j * batch_size
                    pixels = self._slots[slot_of[j]][1][: min(n, start + batch_size) - start]
                    yield start, pixels, sorted(bad.pop(j))
                    del pixels
                    free.append(slot_of.pop(j))
                    if submitted < n_batches:
                        outstanding += submit(submitted)
                        submitted += 1
            finally:
                # Tasks still running write into the slots: wait for them before the next call.
                try:
                    while outstanding and not self.closed:
                        self._receive(call)
                        outstanding -= 1
                except BaseException:
                    self.close()
                    raise

    def _receive(self, call: int) -> tuple[int, list[tuple[int, str]], str | None]:
        import queue

        while True:
            try:
                c, job, errs, failure = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    self.close()
                    raise RuntimeError(
                        f"decode worker {dead[0].name} died (exit code {dead[0].exitcode}); "
                        "out of memory, or /dev/shm too small for the batches?"
                    ) from None
                continue
            if c == call:
                return job, errs, failure

    def _ensure_slots(self, shape: tuple[int, ...]) -> None:
        from multiprocessing import shared_memory

        if self._shape == shape:
            return
        self._free_slots()
        nbytes = int(np.prod(shape))
        if os.path.isdir("/dev/shm"):
            st = os.statvfs("/dev/shm")
            if st.f_bavail * st.f_frsize < _PREFETCH_BATCHES * nbytes:
                raise RuntimeError(
                    f"/dev/shm has {st.f_bavail * st.f_frsize / 2**20:.0f} MiB free; the decode workers need "
                    f"{_PREFETCH_BATCHES * nbytes / 2**20:.0f} MiB: lower the batch size or enlarge /dev/shm "
                    "(docker run --shm-size)"
                )
        for _ in range(_PREFETCH_BATCHES):
            shm = shared_memory.SharedMemory(create=True, size=nbytes)
            self._slots.append((shm, np.ndarray(shape, dtype=np.uint8, buffer=shm.buf)))
        self._shape = shape
        self._generation += 1

    def _free_slots(self) -> None:
        slots, self._slots, self._shape = self._slots, [], None
        for shm, _ in slots:
            try:
                shm.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
            shm.unlink()

    def close(self) -> None:
        """Stop the workers and free the shared memory (no-op in a forked child)."""
        if self.closed or os.getpid() != self.pid:
            return
        # Bounded wait: at exit a daemon thread may still be inside a call, holding the lock.
        locked = self.lock.acquire(timeout=10)
        try:
            self.closed = True
            for _ in self.procs:
                self.tasks.put(None)
            # One deadline for all: a worker killed inside tasks.get() leaves the queue locked.
            deadline = time.monotonic() + 5.0
            for p in self.procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
            self.tasks.cancel_join_thread()
            self.tasks.close()
            self.results.close()
            self._free_slots()
        finally:
            if locked:
                self.lock.release()


_POOLS: dict[tuple[int, int], DecodePool] = {}
_POOLS_LOCK = threading.Lock()
_AT_EXIT: list[bool] = []  # whether shutdown_decode_pools is registered with atexit yet


def decode_pool(workers: int) -> DecodePool:
    """This process's pool of ``workers`` decode processes, started on first use."""
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None and not all(p.is_alive() for p in pool.procs):
            pool.close()  # a worker was killed between calls (OOM killer): start afresh
        if pool is None or pool.closed:
            if not _AT_EXIT:
                atexit.register(shutdown_decode_pools)
                _AT_EXIT.append(True)
            pool = _POOLS[key] = DecodePool(workers)
    return pool


def shutdown_decode_pools() -> None:
    """Stop this process's decode workers and free their shared memory.

    Runs at interpreter exit; call it to get the memory back earlier. The next call that
    decodes through a pool starts a new one.
    """
    with _POOLS_LOCK:
        pools = [p for (pid, _), p in _POOLS.items() if pid == os.getpid()]
        _POOLS.clear()  # pools inherited through fork belong to the parent: forget, don't stop
    for pool in pools:
        pool.close()


def pixel_batches(
    items: Sequence[ImageLike], batch_size: int, size: tuple[int, int], prep: Prep, workers: int
) -> Iterator[tuple[int, np.ndarray, list[tuple[int, str]]]]:
    """Preprocessed uint8 batches of ``items`` in order, from the decode pool (or inline for 0 workers).

    Close the generator (``contextlib.closing``) or exhaust it: it holds the pool until then.

    Args:
        items: paths or PIL images.
        batch_size: rows per batch.
        size: ``(height, width)`` that ``prep`` produces.
        prep: picklable per-image function (module-level function or ``functools.partial`` of one).
        workers: decode processes; 0 decodes in the calling thread.

    Yields:
        ``(start, pixels, errors)``: ``pixels`` is ``[n, H, W, 3]`` uint8 for
        ``items[start:start + n]``, valid only until the next batch is requested; failed
        images are zero rows, listed in ``errors`` as ``(index, "name: problem")``.
    """
    if workers:
        yield from decode_pool(workers).batches(items, batch_size, size, prep)
        return
    buf = np.empty((batch_size, *size, 3), dtype=np.uint8)
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        yield start, buf[: len(part)], fill_rows(buf[: len(part)], part, start, prep)


class DeviceUploader:
    """Copies uint8 host batches to a device; on CUDA through two page-locked buffers.

    The copy is asynchronous and the source (a shared-memory slot) is free at once. Waiting
    for the copy made two batches ago keeps the device queue short while the decoders stay
    ahead. A numpy copy into the pinned buffer is one plain memcpy; torch's ``copy_`` would
    wake its thread pool next to the busy decoders. Keep one uploader per model and reuse it
    (page-locking is slow).
    """

    def __init__(self, device: str):
        self.device = device
        self.on_cuda = str(device).startswith("cuda")
        self._staging: list[Any] = []
        self._copied: list[Any] = []
        self._k = 0

    def start(self, shape: tuple[int, ...]) -> None:
        """Get ready for batches of at most ``shape`` (``[batch, H, W, 3]``)."""
        import torch

        if self.on_cuda and (not self._staging or tuple(self._staging[0].shape) != shape):
            # Normal tensors, not inference tensors: they are written again outside inference mode.
            with torch.inference_mode(False):
                self._staging = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self._copied = [None] * len(self._staging)
        self._k = 0

    def upload(self, pixels: np.ndarray) -> Any:
        """``[n, H, W, 3]`` uint8 numpy -> the same as a uint8 tensor on the device."""
        import torch

        if not self.on_cuda:
            return torch.from_numpy(pixels)
        n = len(pixels)
        s = self._k % len(self._staging)
        self._k += 1
        if self._copied[s] is not None:
            self._copied[s].synchronize()
        self._staging[s].numpy()[:n] = pixels
        u8 = self._staging[s][:n].to(self.device, non_blocking=True)
        self._copied[s] = torch.cuda.Event()
        self._copied[s].record()
        return u8
