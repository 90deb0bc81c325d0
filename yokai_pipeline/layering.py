"""Layering: split each extracted frame into RGBA character layers and an inpainted background.

A :class:`Segmenter` turns RGB frames into foreground masks; these backends exist:

- :class:`OfflineSegmenter` (no weights): line-art segmentation for cel animation.
- :class:`U2NetSegmenter`: the U^2-Net / U^2-NetP saliency model (``models/u2net.py``),
  batched on the GPU with decoding and writing overlapping the model.
- :class:`ISNetSegmenter`: the anime IS-Net of skytnt/anime-segmentation (``models/isnet.py``),
  on U2Net's batching machinery.

From each mask, :func:`layers_from_mask` cuts one RGBA layer per connected instance and
inpaints the character regions out of the background. :func:`segment_layers` runs that over
a chunk of frame-manifest rows and writes (docs/data-formats.md)::

    layered_frames/character/<ep>/<ep>_f{idx:06d}_i{k:02d}.png   RGBA crops
    layered_frames/background/<ep>/<ep>_f{idx:06d}.png           RGB, characters inpainted
    layered_frames/masks/<ep>/<ep>_f{idx:06d}.png                1-bit foreground mask
    layered_frames/instances/<ep>/<ep>_f{idx:06d}.png            instance labels (0 = background, k = i{k-1})

With a :class:`~yokai_pipeline.config.DetectionConfig` (backend "offline" or "yolo"), the
instances come from the detection stage (yokai_pipeline/detection.py) before any cut: every
character layer is one detected instance (touching characters are separate layers, props the
detector rejected are background), and the background's character holes are filled from the
shot's plate where it saw the background, inpainted only elsewhere.

The mask is written last, so a frame whose mask and background exist is complete and is
skipped on re-run (its rows are rebuilt from the mask). The per-frame CPU work (cutting,
inpainting, PNG encoding, writing) runs in worker processes kept for the life of the process
(threads for fewer than 3 workers or with ``worker_processes`` off); the outputs are the same.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from yokai_pipeline import fsio
from yokai_pipeline.config import DetectionConfig, LayeringConfig
from yokai_pipeline.errors import BadInputError, ConfigError
from yokai_pipeline.fsio import atomic_write_bytes, atomic_write_json, read_jsonl, write_jsonl
from yokai_pipeline.runtime import batching
from yokai_pipeline.workspace import Workspace

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive)

#: Frames narrower or shorter than this have no room for an outlined character; OpenCV's
#: morphology fails on them with an opaque size-mismatch error, so they are refused up front.
MIN_FRAME_SIDE = 8


class Segmenter(Protocol):
    """RGB uint8 HxWx3 frames -> float32 HxW foreground masks in [0, 1]."""

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]: ...


# ---------------------------------------------------------------------------------------------
# Offline backend
# ---------------------------------------------------------------------------------------------


class OfflineSegmenter:
    """Line-art segmenter for cel animation; needs no weights.

    Assumption: characters are drawn with dark (near-black) closed outlines over painted
    backgrounds that have no near-black lines of their own, and a character lies inside the
    frame (its outline does not run off the border). Then the character is everything the
    line art encloses:

    1. dark pixels (max channel below ``dark_value``) are line art;
    2. a small closing bridges gaps that compression opens in the lines;
    3. the non-line pixels connected to the frame border are background (a flood fill from
       the border, done as one connected-components pass); everything else - lines and the
       regions they enclose - is character;
    4. blobs smaller than ``min_area_frac`` of the frame (specks, stray dark pixels) are
       dropped (``grow_px`` can add a dilation for footage with soft, anti-aliased outlines).

    Backgrounds with dark lines (night scenes, ink-drawn props) or characters cut by the frame
    edge break the assumption; use the ``u2net`` backend for such footage.
    """

    batched = False

    def __init__(
        self, min_area_frac: float = 0.002, dark_value: int = 56, close_px: int = 3, grow_px: int = 0
    ):
        self.min_area_frac = min_area_frac
        self.dark_value = dark_value
        self._close = (
            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_px, close_px)) if close_px > 1 else None
        )
        self._grow = (
            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow_px + 1,) * 2) if grow_px > 0 else None
        )

    def segment(self, rgb: np.ndarray, drop_small: bool = True) -> np.ndarray:
        """One frame -> uint8 mask (255 = character); ``drop_small=False`` leaves specks to the caller."""
        h, w = rgb.shape[:2]
        r, g, b = cv2.split(rgb)
        line = (cv2.max(cv2.max(r, g), b) < self.dark_value).astype(np.uint8)
        if self._close is not None:
            line = cv2.morphologyEx(line, cv2.MORPH_CLOSE, self._close)
        # Flood the non-line pixels from the border; the border ring is forced open so the
        # flood reaches around anything touching the edge. Unflooded pixels are character.
        line[0, :] = line[-1, :] = line[:, 0] = line[:, -1] = 0
        cv2.floodFill(line, None, (0, 0), 2, flags=4)
        fg = cv2.compare(line, 2, cv2.CMP_NE)
        if self._grow is not None:
            fg = cv2.dilate(fg, self._grow)
        return drop_small_blobs(fg, self.min_area_frac * h * w) if drop_small else fg

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self.segment(im).astype(np.float32) / 255.0 for im in images]


# ---------------------------------------------------------------------------------------------
# U2Net backend
# ---------------------------------------------------------------------------------------------


class U2NetSegmenter:
    """U^2-Net / U^2-NetP saliency masks, batched.

    On CUDA: bf16 autocast, channels_last, cuDNN autotuning, optional ``torch.compile``;
    a prefetch thread stacks frames into pinned host memory, uploads and downloads run on
    side streams, and up to :attr:`ahead` batches are queued on the GPU before the host
    waits for the oldest one's masks, so the GPU does not idle while results are handed
    out. Only uint8 masks come back. On CPU: fp32, one batch at a time.
    """

    batched = True
    #: Batches queued on the GPU beyond the one whose masks are being handed out.
    ahead = 2

    def __init__(
        self,
        weights: str | Path,
        variant: str = "u2net",
        device: str = "auto",
        batch_size: int = 16,
        compile: bool = False,
    ):
        from yokai_pipeline.models.u2net import load_u2net, resolve_device

        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.compile = compile
        self.model = load_u2net(weights, variant, device=self.device, compile=compile)
        self._budget = batching.Budget("layering", self.device, batch_size)

    @property
    def _cuda(self) -> bool:
        return self.device.startswith("cuda")

    def _launch(self, batch: Any, binarize_above: int | None = None, streams: Any = None) -> Any:
        """Queue one uint8 NHWC host batch; :meth:`_collect` gives its uint8 [N, H, W] masks.

        On CUDA nothing here waits for the GPU: the upload from pinned memory runs on
        ``streams[0]``, the download of the masks into pinned memory on ``streams[1]``, and
        the returned handle holds an event that marks the masks ready. On CPU the masks are
        computed before returning.
        """
        import torch

        n = batch.shape[0]
        with torch.inference_mode():
            if not self._cuda:
                return self._to_u8(self._masks(self._pad(batch))[:n], binarize_above).numpy()
            up, down = streams
            main = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(up):
                x = batch.to(self.device, non_blocking=True)
            main.wait_stream(up)
            x.record_stream(main)  # allocated on the upload stream, read on the main one
            u8 = self._to_u8(self._masks(self._pad(x))[:n], binarize_above)
            host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
            down.wait_stream(main)
            with torch.cuda.stream(down):
                host.copy_(u8, non_blocking=True)
                ready = torch.cuda.Event(blocking=True)  # sleep, not spin: the CPU has work to do
                ready.record(down)
            u8.record_stream(down)
            return host, ready

    def _masks(self, x: Any) -> Any:
        """float [N, H, W] masks in [0, 1] for a uint8 NHWC batch on the model's device."""
        from yokai_pipeline.models.u2net import predict_masks

        return self._in_parts(lambda part: predict_masks(self.model, part), x)

    def _in_parts(self, forward: Any, x: Any) -> Any:
        """``forward(x)``, split in smaller batches when the device runs out of memory."""
        import torch

        return batching.run_in_parts(forward, x, self._budget, torch.cat)

    @staticmethod
    def _collect(handle: Any) -> np.ndarray:
        if isinstance(handle, np.ndarray):
            return handle
        host, ready = handle
        ready.synchronize()
        return host.numpy()

    def _pad(self, batch: Any) -> Any:
        """Pad a short batch to ``batch_size`` under ``torch.compile``: a new shape would recompile."""
        import torch

        n = batch.shape[0]
        if not self.compile or n >= self.batch_size:
            return batch
        return torch.cat([batch, batch.new_zeros((self.batch_size - n, *batch.shape[1:]))])

    @staticmethod
    def _to_u8(masks: Any, binarize_above: int | None) -> Any:
        import torch

        u8 = masks.mul(255).round_().to(dtype=torch.uint8)
        if binarize_above is not None:
            u8 = (u8 > binarize_above).to(torch.uint8).mul_(255)
        return u8

    def _run(self, batch: Any) -> np.ndarray:
        """uint8 NHWC host tensor -> uint8 [N, H, W] host masks (0-255), synchronously."""
        return self._collect(self._launch(batch, None, self._streams()))

    def _streams(self) -> Any:
        import torch

        return (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)) if self._cuda else None

    def _stack(self, images: list[np.ndarray]) -> Any:
        import torch

        h, w = images[0].shape[:2]
        out = torch.empty((len(images), h, w, 3), dtype=torch.uint8, pin_memory=self._cuda)
        arr = out.numpy()
        for i, im in enumerate(images):
            arr[i] = im
        return out

    def predict_u8(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Masks as uint8 0-255 (what the stage writes; a quarter of the float transfer)."""
        out: list[np.ndarray | None] = [None] * len(images)
        # Frames of different sizes go in separate batches (they cannot be stacked).
        order = sorted(range(len(images)), key=lambda i: images[i].shape[:2])
        for pairs, masks in self.predict_batches((i, images[i]) for i in order):
            for (i, _), m in zip(pairs, masks, strict=True):
                out[i] = m
        return out  # type: ignore[return-value]

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [m.astype(np.float32) / 255.0 for m in self.predict_u8(images)]

    def predict_stream(
        self, items: Iterable[tuple[Any, np.ndarray]]
    ) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        """(key, frame) pairs -> (key, frame, uint8 mask), in order (see :meth:`predict_batches`)."""
        for pairs, masks in self.predict_batches(items):
            for (key, im), m in zip(pairs, masks, strict=True):
                yield key, im, m

    def predict_batches(
        self, items: Iterable[tuple[Any, np.ndarray]], *, binarize_above: int | None = None
    ) -> Iterator[tuple[list[tuple[Any, np.ndarray]], np.ndarray]]:
        """(key, frame) pairs -> one (pairs, uint8 masks [n, H, W]) per model batch, in order.

        Consecutive frames of one size form a batch of up to ``batch_size``. A prefetch thread
        pulls the frames and stacks the next batch into pinned memory while the GPU runs
        earlier ones; on CUDA, batches are queued :attr:`ahead` deep before the host waits.
        The masks of one batch share a pinned buffer that lives as long as any of them.

        Args:
            items: (key, RGB uint8 HxWx3 frame) pairs; ``items`` is consumed by another thread.
            binarize_above: if set, masks come back as 0/255, 255 where the 0-255 mask
                exceeds it (thresholded on the device: cheaper than on the host).

        Yields:
            (the batch's (key, frame) pairs, its masks).
        """
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def producer() -> None:
            try:
                buf: list[tuple[Any, np.ndarray]] = []
                for item in items:
                    if stop.is_set():
                        return
                    if buf and item[1].shape != buf[0][1].shape:
                        q.put((buf, self._stack([im for _, im in buf])))
                        buf = []
                    buf.append(item)
                    if len(buf) == self.batch_size:
                        q.put((buf, self._stack([im for _, im in buf])))
                        buf = []
                if buf:
                    q.put((buf, self._stack([im for _, im in buf])))
                q.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                q.put(exc)

        t = threading.Thread(target=producer, name="u2net-prefetch", daemon=True)
        t.start()
        streams = self._streams()
        ahead = self.ahead if self._cuda else 0  # on CPU a launch is the whole computation
        queued: deque = deque()
        try:
            while True:
                got = q.get()
                if got is None:
                    break
                if isinstance(got, BaseException):
                    raise got
                buf, batch = got
                queued.append((buf, self._launch(batch, binarize_above, streams)))
                while len(queued) > ahead:
                    pairs, handle = queued.popleft()
                    yield pairs, self._collect(handle)
            while queued:
                pairs, handle = queued.popleft()
                yield pairs, self._collect(handle)
        finally:
            stop.set()
            while t.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)


class ISNetSegmenter(U2NetSegmenter):
    """skytnt/anime-segmentation's anime IS-Net ("isnetis"), batched like :class:`U2NetSegmenter`.

    Only the model and its preprocessing differ (1024 x 1024 letterbox, pixels / 255,
    ``sigmoid(side1)``: :func:`yokai_pipeline.models.isnet.predict_masks`); the prefetch thread,
    pinned buffers, side streams and bf16 autocast on CUDA are U2Net's.
    """

    def __init__(
        self,
        weights: str | Path,
        device: str = "auto",
        batch_size: int = 16,
        compile: bool = False,
        input_size: int = 1024,
    ):
        from yokai_pipeline.models.isnet import load_isnet
        from yokai_pipeline.models.u2net import resolve_device

        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.compile = compile
        self.input_size = input_size
        self.model = load_isnet(weights, device=self.device, compile=compile)
        self._budget = batching.Budget("layering", self.device, batch_size)

    def _masks(self, x: Any) -> Any:
        from yokai_pipeline.models.isnet import predict_masks

        return self._in_parts(lambda part: predict_masks(self.model, part, input_size=self.input_size), x)


def batch_cost(cfg: LayeringConfig) -> batching.BatchCost:
    """What one frame costs the segmenter's forward pass on the GPU (bf16; for ``batch_size = "auto"``).

    Measured on an H200 (``bench/bench_batch_memory.py``, BENCHMARKS.md "Memory"): U^2-Net at
    320 px 141 MiB a frame (it keeps its encoder maps for the decoder), IS-Net at 1024 px 378 MiB;
    the estimates add about 6% and 20%. An estimate too low is caught by the halving on
    out-of-memory.

    The upper bound also keeps the batch under CUDA's 32-bit indexing limit of the bilinear
    upsampling (fewer than 2**31 - 1 output elements; the same H200 bench): IS-Net's first
    decoder stage upsamples 64 channels at half the input side, so at 1024 px 128 frames can
    never run there (``[128, 64, 512, 512]``) and 127 can; U^2-Net's widest is 64 channels at 320 px.
    """
    if cfg.backend == "isnet":
        per_item, widest = 448 * (cfg.isnet_input_size / 1024) ** 2, 64 * (cfg.isnet_input_size // 2) ** 2
    else:
        per_item, widest = 150, 64 * 320 * 320
    upper = max(1, min(128, (2**31 - 2) // widest))
    return batching.BatchCost("layering", per_item, upper=upper, cpu_default=16)


def sized(cfg: LayeringConfig) -> LayeringConfig:
    """``cfg`` with an integer ``batch_size``: ``"auto"`` resolved for the device the segmenter uses."""
    if not batching.is_auto(cfg.batch_size):
        return cfg
    if cfg.backend == "offline":
        device = "cpu"
    else:
        from yokai_pipeline.models.u2net import resolve_device

        device = resolve_device(cfg.device)
    size = batching.resolve_batch_size(batch_cost(cfg), device, "auto")
    return cfg.model_copy(update={"batch_size": size})


_segmenters: dict[str, Any] = {}
_segmenters_lock = threading.Lock()


def get_segmenter(cfg: LayeringConfig) -> Segmenter:
    """The segmenter for ``cfg.backend``, memoised per process and configuration."""
    cfg = sized(cfg)
    key = cfg.model_dump_json(
        include={"backend", "weights", "device", "batch_size", "compile", "min_area_frac", "isnet_input_size"}
    )
    with _segmenters_lock:
        if key not in _segmenters:
            if cfg.backend == "offline":
                _segmenters[key] = OfflineSegmenter(min_area_frac=cfg.min_area_frac)
            else:
                if cfg.weights is None:
                    raise ConfigError(
                        f"layering.backend={cfg.backend} needs layering.weights (a .pth, .ckpt or .safetensors file)"
                    )
                if cfg.backend == "isnet":
                    _segmenters[key] = ISNetSegmenter(
                        cfg.weights, cfg.device, cfg.batch_size, cfg.compile, cfg.isnet_input_size
                    )
                else:
                    _segmenters[key] = U2NetSegmenter(
                        cfg.weights, cfg.backend, cfg.device, cfg.batch_size, cfg.compile
                    )
        return _segmenters[key]


# ---------------------------------------------------------------------------------------------
# Mask -> layers (pure, per image)
# ---------------------------------------------------------------------------------------------


def _mask_u8(mask: np.ndarray) -> np.ndarray:
    """Accept float [0, 1], bool, or uint8 [0, 255] masks; return uint8 0-255."""
    if mask.dtype == np.uint8:
        return mask
    if mask.dtype == bool:
        return mask.astype(np.uint8) * 255
    return np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8)


def drop_small_blobs(mask_u8: np.ndarray, min_area: float) -> np.ndarray:
    """Zero the 8-connected blobs of a binary uint8 mask smaller than ``min_area`` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask_u8 > 0).astype(np.uint8), connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_area)
    small = small[small > 0]
    if small.size == 0:
        return mask_u8
    lut = np.ones(n, np.uint8)
    lut[small] = 0
    lut[0] = 0
    return mask_u8 * lut[labels]


def find_instances(binary: np.ndarray, min_area: float) -> tuple[np.ndarray, list[tuple[int, Box, int]]]:
    """Connected character instances of a binary mask, left to right (then top to bottom).

    Returns:
        (labels, [(label, tight_box, area), ...]) with blobs below ``min_area`` left out.
    """
    labels, instances, _ = _instances(binary, min_area)
    return labels, instances


def _instances(binary: np.ndarray, min_area: float) -> tuple[np.ndarray, list[tuple[int, Box, int]], int]:
    """:func:`find_instances` plus the number of blobs found before the area filter."""
    b = binary.view(np.uint8) if binary.dtype == bool else (binary > 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(b, connectivity=8)
    out = []
    for lab in range(1, stats.shape[0]):
        x, y, w, h, area = (int(v) for v in stats[lab])
        if area >= min_area:
            out.append((lab, (x, y, x + w, y + h), area))
    out.sort(key=lambda t: (t[1][0], t[1][1], t[0]))
    return labels, out, n - 1


def crop_box(box: Box, margin: float, width: int, height: int) -> Box:
    """Grow a tight box by ``margin`` x its size on each side, clipped to the frame."""
    x0, y0, x1, y1 = box
    mx, my = round((x1 - x0) * margin), round((y1 - y0) * margin)
    return max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)


def fill_holes(rgb: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Fill ``hole`` pixels smoothly from the pixels around them (push-pull over an image pyramid).

    Each level halves the image, averaging only known pixels; going back up, every pixel
    takes its known share from its own level and the rest from the coarser level. Hand
    written because OpenCV's ``inpaint`` costs ~25 ms per character-sized hole at 320x180,
    this ~1-2 ms at 320x180, and on flat cel paint the two look the same.
    """
    known = (~hole).astype(np.float32)
    levels = [(rgb.astype(np.float32) * known[..., None], known)]
    while max(levels[-1][1].shape) > 1:
        col, wt = levels[-1]
        h, w = wt.shape
        size = (max(1, (w + 1) // 2), max(1, (h + 1) // 2))
        levels.append(
            (
                cv2.resize(col, size, interpolation=cv2.INTER_AREA),
                cv2.resize(wt, size, interpolation=cv2.INTER_AREA),
            )
        )
    col, wt = levels[-1]
    out = col / np.maximum(wt, 1e-6)[..., None] if wt.ndim == 2 else col / max(float(wt), 1e-6)
    for col, wt in reversed(levels[:-1]):
        h, w = wt.shape
        up = cv2.resize(out.reshape(out.shape[0], -1, 3), (w, h), interpolation=cv2.INTER_LINEAR)
        # Premultiplied colour: known share from this level, the remainder from the coarser one.
        out = col + (1.0 - wt)[..., None] * up
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def inpaint_background(rgb: np.ndarray, fg: np.ndarray, grow_px: int = 3, work_side: int = 320) -> np.ndarray:
    """Paint the foreground out of a frame.

    The hole is the mask grown by ``grow_px`` (so the soft outer edge of outlines goes too).
    It is filled by :func:`fill_holes` at ``work_side`` resolution and the fill upsampled:
    on flat cel paint that looks the same as a full-resolution fill at a quarter of the cost.
    Pixels outside the hole are kept exactly.
    """
    if not fg.any():
        return rgb.copy()
    h, w = rgb.shape[:2]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow_px + 1,) * 2)
    hole = cv2.dilate((fg > 0).astype(np.uint8), kernel)
    scale = min(1.0, work_side / max(h, w))
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        # A low-res pixel touched by the hole is mixed with outline colour: it is hole too.
        small_hole = cv2.resize(hole, size, interpolation=cv2.INTER_AREA) > 0
        fill = cv2.resize(fill_holes(small, small_hole), (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        fill = fill_holes(rgb, hole > 0)
    out = rgb.copy()
    cv2.copyTo(fill, hole, out)  # ~100x faster than boolean-mask assignment in numpy
    return out


def layers_from_mask(
    frame_rgb: np.ndarray, mask: np.ndarray, cfg: LayeringConfig
) -> tuple[list[tuple[np.ndarray, Box, int]], np.ndarray]:
    """Cut character layers out of a frame and inpaint them out of the background.

    Args:
        frame_rgb: uint8 HxWx3.
        mask: HxW foreground mask, float [0, 1] or uint8 [0, 255].
        cfg: threshold, minimum blob area, crop margin.

    Returns:
        ([(rgba_crop, box, area), ...], background_rgb): one layer per connected instance
        (blobs below ``min_area_frac`` dropped), ``box`` the crop box in frame pixels
        (tight box + margin), ``area`` the instance's mask pixels; alpha is the mask
        restricted to the instance.
    """
    layers, background, _ = _layers_and_mask(frame_rgb, _mask_u8(mask), cfg)
    return layers, background


def _layers_and_mask(
    frame_rgb: np.ndarray, mask_u8: np.ndarray, cfg: LayeringConfig
) -> tuple[list[tuple[np.ndarray, Box, int]], np.ndarray, np.ndarray]:
    h, w = frame_rgb.shape[:2]
    if mask_u8.shape != (h, w):
        raise ValueError(f"mask shape {mask_u8.shape} does not match frame {(h, w)}")
    binary = mask_u8 > round(cfg.mask_threshold * 255)
    labels, instances, n_blobs = _instances(binary, cfg.min_area_frac * h * w)
    keep = np.zeros(n_blobs + 1, bool)
    layers = []
    for lab, box, area in instances:
        keep[lab] = True
        x0, y0, x1, y1 = crop_box(box, cfg.crop_margin, w, h)
        alpha = np.where(labels[y0:y1, x0:x1] == lab, np.maximum(mask_u8[y0:y1, x0:x1], 1), 0).astype(
            np.uint8
        )
        rgba = np.dstack([frame_rgb[y0:y1, x0:x1], alpha])
        layers.append((rgba, (x0, y0, x1, y1), area))
    fg = binary if len(instances) == n_blobs else keep[labels]
    background = inpaint_background(frame_rgb, fg)
    return layers, background, fg


def layers_from_labels(
    frame_rgb: np.ndarray,
    labels: np.ndarray,
    cfg: LayeringConfig,
    mask_u8: np.ndarray | None = None,
    plate: np.ndarray | None = None,
    plate_seen: np.ndarray | None = None,
) -> tuple[list[tuple[np.ndarray, Box, int]], np.ndarray, np.ndarray]:
    """Cut one layer per detected instance and paint the instances out of the background.

    Args:
        frame_rgb: uint8 HxWx3.
        labels: int HxW instance labels (0 = background, k = instance k).
        cfg: crop margin.
        mask_u8: the segmenter's soft mask, used as alpha inside each instance (else 255).
        plate: the shot's background plate aligned to the frame: the hole is filled from it
            where ``plate_seen``, inpainted elsewhere.
        plate_seen: bool HxW.

    Returns:
        ([(rgba_crop, box, area), ...] in label order, background_rgb, foreground bool mask).
    """
    h, w = frame_rgb.shape[:2]
    if labels.shape != (h, w):
        raise ValueError(f"instance labels {labels.shape} do not match frame {(h, w)}")
    fg = labels > 0
    layers = []
    n = int(labels.max()) if labels.size else 0
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if xs.size == 0:
            continue
        tight = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        x0, y0, x1, y1 = crop_box(tight, cfg.crop_margin, w, h)
        inside = labels[y0:y1, x0:x1] == k
        soft = mask_u8[y0:y1, x0:x1] if mask_u8 is not None else np.full(inside.shape, 255, np.uint8)
        alpha = np.where(inside, np.maximum(soft, 1), 0).astype(np.uint8)
        layers.append((np.dstack([frame_rgb[y0:y1, x0:x1], alpha]), (x0, y0, x1, y1), int(xs.size)))
    background = inpaint_background(frame_rgb, fg)
    if plate is not None and plate_seen is not None and fg.any():
        # the plate shows what was behind the character where another frame saw it
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
        hole = cv2.dilate(fg.view(np.uint8), kernel) > 0
        use = (hole & plate_seen).view(np.uint8)
        cv2.copyTo(plate, use, background)
    return layers, background, fg


# ---------------------------------------------------------------------------------------------
# Stage runner (file I/O at the edges)
# ---------------------------------------------------------------------------------------------


def _frame_stem(row: dict) -> str:
    return f"{row['episode_id']}_f{int(row['frame_index']):06d}"


def _paths(ws: Workspace, row: dict) -> dict[str, Path]:
    ep, stem = row["episode_id"], _frame_stem(row)
    lf = ws.layered_frames
    return {
        "background": lf / "background" / ep / f"{stem}.png",
        "mask": lf / "masks" / ep / f"{stem}.png",
        "instances": lf / "instances" / ep / f"{stem}.png",
        "character_dir": lf / "character" / ep,
        "crops": lf / "crops" / ep / f"{stem}.json",
        "failure": lf / "failures" / ep / f"{stem}.json",
    }


def _encode_png(img: np.ndarray, bilevel: bool = False) -> bytes:
    """PNG bytes of an RGB/RGBA/grey image (fsio.encode_png takes OpenCV's channel order)."""
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR if img.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    return fsio.encode_png(img, bilevel=bilevel)


def read_frame(path: str | Path) -> np.ndarray:
    """A frame PNG as RGB uint8; a missing, truncated, undecodable or tiny file -> BadInputError."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise BadInputError(path, f"cannot read frame ({exc.strerror or exc})") from exc
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error as exc:
        # OpenCV refuses images over its pixel limit (decompression bombs) with cv2.error
        msg = (getattr(exc, "err", None) or str(exc)).strip()
        raise BadInputError(path, f"image refused by the decoder, too large or corrupt ({msg})") from exc
    if img is None:
        raise BadInputError(path, "not a decodable image (empty, truncated or corrupt)")
    h, w = img.shape[:2]
    if min(w, h) < MIN_FRAME_SIDE:
        raise BadInputError(path, f"frame is {w}x{h} px, too small to segment")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _rows_for(
    ws: Workspace,
    row: dict,
    layers: list[tuple[Box, int]],
    size: tuple[int, int],
    paths: dict,
    crops: list[dict] | None = None,
) -> list[dict]:
    ep, stem = row["episode_id"], _frame_stem(row)
    base = {
        "episode": row.get("episode", ep),
        "episode_id": ep,
        "frame_index": int(row["frame_index"]),
        "shot_id": row.get("shot_id"),
        "frame_path": row["path"],
    }
    w, h = size
    out = [
        {
            **base,
            "layer_id": f"{stem}_bg",
            "kind": "background",
            "box": [0, 0, w, h],
            "area": w * h - sum(a for _, a in layers),
            "path": ws.rel(paths["background"]),
            "mask_path": ws.rel(paths["mask"]),
        }
    ]
    for k, (box, area) in enumerate(layers):
        out.append(
            {
                **base,
                "layer_id": f"{stem}_i{k:02d}",
                "kind": "character",
                "box": list(box),
                "area": int(area),
                "path": ws.rel(paths["character_dir"] / f"{stem}_i{k:02d}.png"),
                **_crop_fields(crops, k),
            }
        )
    return out


def _crop_fields(crops: list[dict] | None, k: int) -> dict:
    """Manifest fields of instance ``k``'s 3-stage crops (yokai_pipeline/crops.py)."""
    if crops is None or k >= len(crops):
        return {"crop_kind": "full_body"}
    c = crops[k]
    out = {"crop_kind": "full_body", "crops": {kind: c[kind] for kind in ("upper_body", "head")}}
    out["crop_source"] = c["source"]
    if "detector_box" in c:  # yolo: the detector's box (x0, y0, x1, y1, score, class) of this instance
        out["detector_box"] = c["detector_box"]
    if "motion_share" in c:  # offline: share of its pixels other frames saw it leave (docs/detection.md)
        out["motion_share"] = c["motion_share"]
    return out


def layer_crops(
    layers: list[tuple[np.ndarray, Box, int]], size: tuple[int, int], cfg: LayeringConfig, det: Any = None
) -> list[dict]:
    """Upper-body and head crop boxes of each layer (from its alpha, or the detection's head boxes).

    Args:
        layers: (rgba, box, area) per instance, as cut.
        size: frame (width, height).
        cfg: crop geometry.
        det: the frame's detection.Detection; its ``heads`` (row k = instance k+1's head box or
            NaN) and yolo ``source_boxes`` are used when present.
    """
    from yokai_pipeline.crops import crop_boxes

    heads = getattr(det, "heads", None)
    sources = getattr(det, "source_boxes", None)
    motion = getattr(det, "motion_share", None)
    out = []
    for k, (rgba, (x0, y0, x1, y1), _) in enumerate(layers):
        inside = rgba[..., 3] > 0
        ys, xs = np.nonzero(inside)
        if xs.size == 0:
            out.append({"upper_body": [x0, y0, x0, y0], "head": [x0, y0, x0, y0], "source": "empty"})
            continue
        tight = inside[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        head = heads[k] if heads is not None and k < len(heads) and np.isfinite(heads[k]).all() else None
        c = crop_boxes(tight, (x0 + int(xs.min()), y0 + int(ys.min())), size, cfg, head)
        for kind in ("upper_body", "head"):  # a crop shows no more than its layer holds
            b = c[kind]
            c[kind] = [max(b[0], x0), max(b[1], y0), min(b[2], x1), min(b[3], y1)]
        if sources is not None and k < len(sources):
            c["detector_box"] = [round(float(v), 2) for v in sources[k]]
        if motion is not None and k < len(motion):
            c["motion_share"] = round(float(motion[k]), 4)
        out.append(c)
    return out


def _write_frame(
    ws: Workspace,
    row: dict,
    rgb: np.ndarray,
    mask_u8: np.ndarray | None,
    cfg: LayeringConfig,
    det: Any = None,
) -> list[dict]:
    """Write one frame's layers; ``det`` (a detection.Detection) gives the instances, else the mask's blobs."""
    paths = _paths(ws, row)
    stem = _frame_stem(row)
    if det is None:
        layers, background, fg = _layers_and_mask(rgb, mask_u8, cfg)
    else:
        layers, background, fg = layers_from_labels(rgb, det.labels, cfg, mask_u8, det.plate, det.plate_seen)
        if len(layers) > 254:
            raise BadInputError(ws.abs(row["path"]), f"{len(layers)} instances: more than 254 in one frame")
        atomic_write_bytes(paths["instances"], _encode_png(np.clip(det.labels, 0, 255).astype(np.uint8)))
    for k, (rgba, _, _) in enumerate(layers):
        atomic_write_bytes(paths["character_dir"] / f"{stem}_i{k:02d}.png", _encode_png(rgba))
    atomic_write_bytes(paths["background"], _encode_png(background))
    h, w = rgb.shape[:2]
    crops = layer_crops(layers, (w, h), cfg, det)
    atomic_write_json(paths["crops"], {"stamp": row.get(STAMP_KEY), "instances": crops})
    # The mask goes last: its presence marks the frame complete (resume).
    atomic_write_bytes(paths["mask"], _encode_png(fg.astype(np.uint8) * 255, bilevel=True))
    paths["failure"].unlink(missing_ok=True)
    return _rows_for(ws, row, [(box, area) for _, box, area in layers], (w, h), paths, crops)


#: Frame-row key of :func:`frame_stamp` while a chunk is cut (not written to the manifest).
STAMP_KEY = "layering_stamp"
#: Settings that change how fast layers are cut, not what they are.
_SPEED_FIELDS = {"device", "batch_size", "chunk_size", "num_workers", "worker_processes", "compile"}


def frame_stamp(
    ws: Workspace, row: dict, cfg: LayeringConfig, detection: DetectionConfig | None
) -> str | None:
    """What a frame's layers are cut from: the frame's bytes, its shot stack's and the settings.

    A frame finished by an earlier run is reused only under the same stamp, so a video replaced
    under the same name (its frames keep their names) or a changed setting cuts the frame again.
    None when the frame cannot be read (it then fails as bad input where it is cut).
    """
    try:
        files = [fsio.file_sha256(ws.abs(row["path"]))]
        stack = row.get("stack_path")
        if stack and ws.abs(stack).is_file():
            files.append(fsio.file_sha256(ws.abs(stack)))
    except OSError:
        return None
    settings = [cfg.model_dump(mode="json", exclude=_SPEED_FIELDS)]
    if detection is not None:
        settings.append(detection.model_dump(mode="json", exclude=_SPEED_FIELDS))
    return fsio.stable_hash({"files": files, "settings": settings})[:32]


def _existing_rows(ws: Workspace, row: dict, cfg: LayeringConfig) -> list[dict] | None:
    """Rows of a frame finished by an earlier run under the same :func:`frame_stamp`; None if not."""
    paths = _paths(ws, row)
    if not (paths["mask"].is_file() and paths["background"].is_file()):
        return None
    mask = cv2.imread(str(paths["mask"]), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        return None
    h, w = mask.shape
    labels = (
        cv2.imread(str(paths["instances"]), cv2.IMREAD_GRAYSCALE) if paths["instances"].is_file() else None
    )
    if labels is not None:
        instances = [(k, box, area) for k, box, area in _label_boxes(labels)]
    else:
        _, instances = find_instances(mask > 127, cfg.min_area_frac * h * w)
    stem = _frame_stem(row)
    layers = []
    for k, (_, box, area) in enumerate(instances):
        if not (paths["character_dir"] / f"{stem}_i{k:02d}.png").is_file():
            return None
        layers.append((crop_box(box, cfg.crop_margin, w, h), area))
    try:  # the frame and settings it was cut from (frame_stamp); older layouts have none
        written = fsio.read_json(paths["crops"])
    except (OSError, ValueError):
        return None
    if (
        not isinstance(written, dict)
        or written.get("stamp") is None
        or written["stamp"] != row.get(STAMP_KEY)
    ):
        return None  # another frame under this name (a replaced video), or other settings
    return _rows_for(ws, row, layers, (w, h), paths, written["instances"])


def _label_boxes(labels: np.ndarray) -> list[tuple[int, Box, int]]:
    """(label, tight box, area) of instances 1..max of a label map, in label order."""
    out = []
    for k in range(1, int(labels.max()) + 1):
        ys, xs = np.nonzero(labels == k)
        if xs.size:
            out.append(
                (k, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), int(xs.size))
            )
    return out


#: Most frames in one decode or write task: enough that a task's overhead (a future; for a
#: worker process also a pickle round trip) is small next to the 5-70 ms of work per frame,
#: few enough that one model batch still spreads over every worker.
MAX_TASK_FRAMES = 8


def _task_frames(n: int, tasks: int) -> int:
    """Frames per task to split ``n`` frames into about ``tasks`` tasks."""
    return max(1, min(MAX_TASK_FRAMES, -(-n // max(1, tasks))))


def _read_chunk(ws: Workspace, items: list[tuple[int, dict]]) -> list[tuple[int, dict, Any]]:
    out: list[tuple[int, dict, Any]] = []
    for i, row in items:
        try:
            out.append((i, row, read_frame(ws.abs(row["path"]))))
        except Exception as exc:  # noqa: BLE001 - recorded per frame by the caller
            out.append((i, row, exc))
    return out


def _decoded(
    ws: Workspace, items: list[tuple[int, dict]], pool: ThreadPoolExecutor, lookahead: int, per_task: int = 1
) -> Iterator[tuple[int, dict, Any]]:
    """(index, row, RGB frame or the exception) in order, decoding up to ``lookahead`` frames ahead.

    ``cv2.imdecode`` releases the GIL, so threads decode in parallel.
    """
    chunks = iter([items[s : s + per_task] for s in range(0, len(items), per_task)])
    pending: deque[Future] = deque()
    ahead = max(1, lookahead // per_task)
    for chunk in chunks:
        pending.append(pool.submit(_read_chunk, ws, chunk))
        if len(pending) >= ahead:
            break
    while pending:
        done = pending.popleft().result()
        nxt = next(chunks, None)
        if nxt is not None:
            pending.append(pool.submit(_read_chunk, ws, nxt))
        yield from done


def _mask_for(segmenter: Segmenter, img: np.ndarray) -> np.ndarray:
    if isinstance(segmenter, OfflineSegmenter):
        return segmenter.segment(img, drop_small=False)  # _layers_and_mask drops them (one pass less)
    return _mask_u8(segmenter.predict([img])[0])


def _detect(
    ws: Workspace,
    row: dict,
    img: np.ndarray,
    mask: np.ndarray | None,
    cfg: LayeringConfig,
    det: DetectionConfig,
) -> tuple[Any, np.ndarray | None]:
    """(detection.Detection, mask for the layers' alpha) of one frame, offline detector.

    The offline detector's instances (with the shot's plate); with a model segmenter its
    mask is then cut inside the instances' boxes. The yolo backend batches a chunk's frames
    instead (:func:`_layer_chunk_yolo`).
    """
    from yokai_pipeline import detection

    h, w = img.shape[:2]
    stack = (
        detection.read_stack(ws.abs(row["stack_path"]), int(row["frame_index"]))
        if row.get("stack_path")
        else None
    )
    found = detection.detect_offline(img, stack, det)
    if not det.plate_fill:
        found.plate = found.plate_seen = None
    if mask is None:
        return found, None
    mask = _mask_u8(mask)
    labels, src = detection.labels_and_sources(
        mask, found.boxes, round(cfg.mask_threshold * 255), det.min_area_frac * h * w
    )
    share = None if found.motion_share is None else found.motion_share[src]
    boxes = detection.boxes_of(labels)
    return detection.Detection(labels, boxes, found.plate, found.plate_seen, motion_share=share), mask


def _layer_chunk(
    ws: Workspace,
    cfg: LayeringConfig,
    items: list[tuple],
    segmenter: Segmenter | None = None,
    det: DetectionConfig | None = None,
) -> list[tuple[int, list[dict] | None, BaseException | None]]:
    """Cut and write the layers of a few frames; a frame's failure is returned, not raised.

    Args:
        ws: the workspace.
        cfg: layering configuration.
        items: (index, row, RGB frame or None to read it from ``row["path"]``, uint8 mask or
            None to segment the frame with ``segmenter``).
        segmenter: for frames without a mask (default: :func:`get_segmenter` of ``cfg``).
        det: detection settings; None or backend "none": instances are the mask's blobs.

    Returns:
        (index, layer rows or None, exception or None) per item.
    """
    if det is not None and det.backend == "yolo":
        return _layer_chunk_yolo(ws, cfg, items, segmenter, det)
    out: list[tuple[int, list[dict] | None, BaseException | None]] = []
    for i, row, img, mask in items:
        try:
            if img is None:
                img = read_frame(ws.abs(row["path"]))
            if det is not None and det.backend != "none":
                if mask is None and cfg.backend != "offline":
                    mask = _mask_for(segmenter or get_segmenter(cfg), img)
                found, mask = _detect(ws, row, img, mask, cfg, det)
                out.append((i, _write_frame(ws, row, img, mask, cfg, found), None))
                continue
            if mask is None:
                mask = _mask_for(segmenter or get_segmenter(cfg), img)
            out.append((i, _write_frame(ws, row, img, mask, cfg), None))
        except Exception as exc:  # noqa: BLE001 - one bad frame never loses the chunk
            out.append((i, None, exc))
    return out


def _layer_chunk_yolo(
    ws: Workspace, cfg: LayeringConfig, items: list[tuple], segmenter: Segmenter | None, det: DetectionConfig
) -> list[tuple[int, list[dict] | None, BaseException | None]]:
    """:func:`_layer_chunk` with the neural detector: the chunk's frames go to it as one batch."""
    from yokai_pipeline import detection

    out: list[tuple[int, list[dict] | None, BaseException | None]] = []
    ready: list[tuple[int, dict, np.ndarray, np.ndarray]] = []
    for i, row, img, mask in items:
        try:
            img = read_frame(ws.abs(row["path"])) if img is None else img
            mask = _mask_for(segmenter or get_segmenter(cfg), img) if mask is None else mask
            ready.append((i, row, img, _mask_u8(mask)))
        except Exception as exc:  # noqa: BLE001 - one bad frame never loses the chunk
            out.append((i, None, exc))
    if not ready:
        return out
    try:
        found = detection.detect_yolo(
            [r[2] for r in ready], [r[3] for r in ready], det, round(cfg.mask_threshold * 255)
        )
    except Exception as exc:  # noqa: BLE001 - the detector failed on the batch: every frame records it
        return out + [(i, None, exc) for i, *_ in ready]
    for (i, row, img, mask), f in zip(ready, found, strict=True):
        try:
            out.append((i, _write_frame(ws, row, img, mask, cfg, f), None))
        except Exception as exc:  # noqa: BLE001
            out.append((i, None, exc))
    return out


class _WorkerError(Exception):
    """An exception from a worker process reduced to strings (an arbitrary exception may not pickle)."""

    def __init__(self, record: str, message: str):
        super().__init__(message)
        self.record = record

    def __reduce__(self) -> tuple:
        return type(self), (self.record, str(self))


def _layer_chunk_in_worker(
    ws: Workspace, cfg: LayeringConfig, items: list[tuple], det: DetectionConfig | None = None
) -> list[tuple]:
    """:func:`_layer_chunk` in a worker process, its failures made picklable."""
    out = []
    for i, rows, exc in _layer_chunk(ws, cfg, items, None, det):
        if exc is not None and not isinstance(exc, BadInputError):
            exc = _WorkerError(f"{type(exc).__name__}: {exc}", str(exc))
        out.append((i, rows, exc))
    return out


def _worker_init(parent: int) -> None:
    """Set up a layering worker process: one OpenCV thread, and exit when ``parent`` is gone."""
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV's own threads would oversubscribe
    _keep_heap()
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    """Exit this process once process ``parent`` has exited.

    A parent killed outright (kill -9) cannot stop its pool, and a forkserver child is not
    orphaned by it either (its parent is the forkserver, which stays up while its children
    hold its pipe): without this the workers would wait for work forever.
    """
    import select
    import time

    try:
        fd = os.pidfd_open(parent)  # readable once the process exits (Linux 5.3+)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                break
            except PermissionError:  # alive, someone else's (cannot be ours, but never mind)
                pass
            time.sleep(1.0)
    os._exit(0)


def _keep_heap() -> None:
    """Stop glibc handing a frame's freed buffers back to the OS after every frame.

    A fresh worker starts with small mmap/trim thresholds, so each frame's multi-megabyte
    buffers were mapped, page-faulted (~1,200 faults a 640x360 frame) and unmapped again:
    +15% CPU per frame against a warmed-up parent process. Elsewhere than glibc: a no-op.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's ceiling on 64-bit
    mallopt(m_trim_threshold, 256 << 20)


_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()
_pools_atexit = False


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """The pool of ``workers`` layering processes, started on first use and kept for the process.

    A long-lived GPU worker pays the start-up once (the forkserver's imports, ~0.5 s; then a
    fork per worker as work arrives). Workers come from the forkserver (spawn where there is
    none), never ``fork``: the parent may hold a CUDA context.
    """
    global _pools_atexit
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            import multiprocessing

            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                # Imported once in the server (if it is not running yet), not in every worker.
                ctx.set_forkserver_preload(["__main__", __name__])
            pool = ProcessPoolExecutor(
                workers,
                mp_context=ctx,
                initializer=_worker_init,
                initargs=(os.getpid(),),
            )
            try:
                # Start a worker now: a platform that cannot run them fails here, not mid-chunk.
                pool.submit(os.getpid).result(timeout=120)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            _pools[workers] = pool
            if not _pools_atexit:
                atexit.register(_shutdown_pools)
                _pools_atexit = True
        return pool


def _discard_pool(pool: ProcessPoolExecutor) -> None:
    with _pools_lock:
        for key in [k for k, p in _pools.items() if p is pool]:
            del _pools[key]
    pool.shutdown(wait=False, cancel_futures=True)


def _shutdown_pools() -> None:
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


#: Fewest workers for which the per-frame work goes to processes. That work (~18 ms a
#: 640x360 frame, ~65 ms at 1080p: decode, connected components, crops, inpaint, PNG encodes,
#: fsync) holds the GIL for ~3-5 ms of it (profiled), so threads stop scaling at 4-5 cores
#: (134 frames/s on 16); with two workers threads do as well as processes and need no start-up.
PROCESS_MIN_WORKERS = 3


def _use_processes(cfg: LayeringConfig, n_frames: int) -> bool:
    """Whether cutting and writing the layers goes to worker processes rather than threads.

    Yes from :data:`PROCESS_MIN_WORKERS` workers and more than one frame per worker (the
    pool then outlives the call), unless ``cfg.worker_processes`` is off.
    """
    return cfg.worker_processes and cfg.num_workers >= PROCESS_MIN_WORKERS and n_frames > cfg.num_workers


class _Tasks:
    """Layer-writing tasks in flight (threads or worker processes), collected in submission order."""

    def __init__(
        self,
        ws: Workspace,
        cfg: LayeringConfig,
        pool: Any,
        processes: bool,
        det: DetectionConfig | None = None,
    ):
        self.ws, self.cfg, self.pool, self.processes, self.det = ws, cfg, pool, processes, det
        self.pending: deque[tuple[list[tuple], Future]] = deque()
        self.pending_frames = 0
        self.results: dict[int, list[dict]] = {}
        self.failures: list[tuple[int, dict, BaseException]] = []

    def submit(self, items: list[tuple], segmenter: Segmenter | None = None) -> None:
        if self.processes:
            fut = self.pool.submit(_layer_chunk_in_worker, self.ws, self.cfg, items, self.det)
        else:
            fut = self.pool.submit(_layer_chunk, self.ws, self.cfg, items, segmenter, self.det)
        self.pending.append((items, fut))
        self.pending_frames += len(items)

    def failed(self, i: int, row: dict, exc: BaseException) -> None:
        self.failures.append((i, row, exc))

    def drain(self, limit: int) -> None:
        """Collect finished tasks; block on the oldest while more than ``limit`` frames are pending."""
        from concurrent.futures.process import BrokenProcessPool

        while self.pending and (self.pending_frames > limit or self.pending[0][1].done()):
            items, fut = self.pending.popleft()
            self.pending_frames -= len(items)
            try:
                done = fut.result()
            except BrokenProcessPool as exc:
                _discard_pool(self.pool)
                raise RuntimeError(
                    "a layering worker process died (out of memory?); frames already written are kept"
                ) from exc
            except Exception as exc:  # noqa: BLE001 - one bad task never loses the chunk
                done = [(it[0], None, exc) for it in items]
            rows_of = {it[0]: it[1] for it in items}
            for i, rows, exc in done:
                if exc is None:
                    self.results[i] = rows
                else:
                    self.failures.append((i, rows_of[i], exc))


def segment_layers(
    frame_rows: list[dict],
    workspace: Workspace,
    cfg: LayeringConfig,
    detection: DetectionConfig | None = None,
) -> list[dict]:
    """Segment a chunk of frames into character and background layers.

    Frames already complete from an earlier run are not redone. A frame that cannot be read
    is recorded in ``layered_frames/failures/<ep>/<stem>.json`` and skipped; the chunk fails
    only if every frame in it failed.

    With 3 or more ``num_workers`` and more frames than workers, the per-frame CPU work (cutting,
    inpainting, PNG encoding, writing) runs in a pool of worker processes kept for the life
    of the process; with the offline backend the workers also read and segment the frames.
    For U2Net, threads here decode the frames for the model and the workers get each frame
    with its mask (sending a 640x360 frame costs ~0.3 ms, decoding its PNG again ~3 ms).

    Args:
        frame_rows: frame manifest rows (``frames.jsonl``).
        workspace: the run workspace.
        cfg: layering configuration (backend, thresholds, batch size, workers).
        detection: instance detection before the cut (yokai_pipeline/detection.py); None or
            backend "none": one instance per connected blob of the mask. With backend "yolo"
            the work stays in this process's threads (one detector, not one per worker).

    Returns:
        Layer manifest rows (docs/data-formats.md) of every frame in the chunk, each frame's
        background row first; background rows carry ``mask_path``.

    Raises:
        BadInputError: every frame of a non-empty chunk failed (names the first one).
        RuntimeError: a worker process died (the frames written so far are kept).
    """
    ws = Workspace.of(workspace)
    results: dict[int, list[dict]] = {}
    todo = []
    for i, row in enumerate(frame_rows):
        row = {**row, STAMP_KEY: frame_stamp(ws, row, cfg, detection)}
        done = _existing_rows(ws, row, cfg)
        if done is None:
            todo.append((i, row))
        else:
            results[i] = done
    failures: list[tuple[int, dict, BaseException]] = []
    if todo:
        cfg = sized(cfg)
        segmenter = get_segmenter(cfg)
        workers = max(1, cfg.num_workers)
        model = getattr(segmenter, "batched", False) and hasattr(segmenter, "predict_batches")
        # Other segmenters live in this process only.
        processes = (model or isinstance(segmenter, OfflineSegmenter)) and _use_processes(cfg, len(todo))
        # with the neural detector, frames per task = one detector batch (0: another backend)
        yolo = 0
        if detection is not None and detection.backend == "yolo":
            from yokai_pipeline.models.detector import resolve_batch_size

            yolo = resolve_batch_size(detection.batch_size, detection.device)
        # the neural detector lives once, in this process; its tasks are whole detector batches
        processes = processes and not yolo
        pool = None
        if processes:
            try:
                pool = _process_pool(workers)
            except Exception as exc:  # noqa: BLE001 - e.g. no POSIX semaphores: threads still work
                log.warning(
                    "layering in threads: cannot start worker processes (%s: %s)", type(exc).__name__, exc
                )
                processes = False
        with ThreadPoolExecutor(workers, thread_name_prefix="layering") as threads:
            tasks = _Tasks(ws, cfg, pool or threads, processes, detection)
            if model:
                # Decoding (threads), the model (this thread) and writing (tasks) overlap.
                rows_by_index = dict(todo)
                per = _task_frames(cfg.batch_size, workers) if not yolo else max(yolo, cfg.batch_size)
                decoded = _decoded(ws, todo, threads, max(2 * cfg.batch_size, 2 * workers * per), per)

                def good_frames() -> Iterator[tuple[int, np.ndarray]]:
                    for i, row, img in decoded:
                        if isinstance(img, BaseException):
                            tasks.failed(i, row, img)
                        else:
                            yield i, img

                for pairs, masks in segmenter.predict_batches(good_frames()):
                    for s in range(0, len(pairs), per):
                        part = pairs[s : s + per]
                        tasks.submit(
                            [(i, rows_by_index[i], img, masks[s + j]) for j, (i, img) in enumerate(part)]
                        )
                    tasks.drain(limit=2 * cfg.batch_size + 4 * workers)
            else:
                # The tasks read, segment and write: nothing here needs the pixels.
                per = _task_frames(len(todo), 2 * workers) if not yolo else yolo
                for s in range(0, len(todo), per):
                    items = [(i, row, None, None) for i, row in todo[s : s + per]]
                    tasks.submit(items, None if processes else segmenter)
            tasks.drain(limit=0)
        results.update(tasks.results)
        failures = sorted(tasks.failures, key=lambda f: f[0])
    for _, row, exc in failures:
        path = ws.abs(row["path"])
        log.warning("layering skipped %s: %s", path, exc)
        atomic_write_json(_paths(ws, row)["failure"], {"frame_path": row["path"], "error": _problem(exc)})
    if todo and len(failures) == len(todo) and not results:
        _, row, exc = failures[0]
        problem = exc.problem if isinstance(exc, BadInputError) else str(exc)
        raise BadInputError(
            ws.abs(row["path"]), f"{problem} (and all {len(failures)} frames of this chunk failed)"
        )
    return [r for i in sorted(results) for r in results[i]]


def _problem(exc: BaseException) -> str:
    """What a frame's failure record says."""
    if isinstance(exc, BadInputError):
        return exc.problem
    if isinstance(exc, _WorkerError):
        return exc.record
    return f"{type(exc).__name__}: {exc}"


def write_layer_manifest(workspace: Workspace, episode_id: str, rows: list[dict]) -> Path:
    """Write the episode's layer manifests sorted by (frame_index, kind, layer_id).

    ``layered_frames/episode_manifests/<id>.jsonl`` keeps every layer for good;
    ``layered_frames/manifests/<id>.jsonl`` (what the dataset reads) starts equal to it and is
    narrowed by :func:`apply_series_dedup`.
    """
    ws = Workspace.of(workspace)
    ordered = sorted(rows, key=lambda r: (int(r["frame_index"]), r["kind"], r["layer_id"]))
    write_jsonl(ws.episode_layers_manifest(episode_id), ordered)
    return write_jsonl(ws.layers_manifest(episode_id), ordered)


def apply_series_dedup(workspace: Workspace, episode_id: str, dropped_frames: Sequence[int]) -> dict:
    """Write the episode's dataset layer manifest without the layers of ``dropped_frames``.

    Args:
        workspace: the run workspace.
        episode_id: the episode.
        dropped_frames: frame indices the series dedup dropped (``frames.dedup_series``).

    Returns:
        ``{"kept_layers", "dropped_layers"}``.

    Raises:
        BadInputError: the episode has no layer manifest.
    """
    full = workspace.episode_layers_manifest(episode_id)
    if not full.is_file():
        # layered before the series step existed: its manifest already is the whole episode
        full = workspace.layers_manifest(episode_id)
    if not full.is_file():
        raise BadInputError(full, "layer manifest not found; run layering for this episode first")
    drop = set(map(int, dropped_frames))
    rows = read_jsonl(full)
    kept = [r for r in rows if int(r["frame_index"]) not in drop]
    write_jsonl(workspace.layers_manifest(episode_id), kept)
    return {"kept_layers": len(kept), "dropped_layers": len(rows) - len(kept)}


def mask_iou(workspace: Workspace, episode_id: str, ground_truth: Any) -> dict:
    """Foreground IoU of the written masks against the ground truth, over the episode's layered frames.

    Args:
        workspace: the run workspace (its layer manifest and masks are read).
        episode_id: the episode.
        ground_truth: loaded ground truth (``synthetic.load_ground_truth``) or its path.

    Returns:
        ``{"frames", "mean_iou", "min_iou", "min_iou_frame"}`` (IoU 1.0 where both are empty;
        ``mean_iou`` None when no frame was layered).
    """
    from yokai_pipeline import synthetic

    ws = Workspace.of(workspace)
    if isinstance(ground_truth, str | Path):
        ground_truth = synthetic.load_ground_truth(ground_truth)
    manifest = ws.layers_manifest(episode_id)
    if not manifest.is_file():
        raise BadInputError(manifest, "layer manifest not found; run layering for this episode first")
    ious: list[tuple[float, int]] = []
    for row in read_jsonl(manifest):
        if row["kind"] != "background":
            continue
        mask_path = ws.abs(row.get("mask_path") or _paths(ws, row)["mask"])
        pred = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if pred is None:
            raise BadInputError(mask_path, "mask missing or unreadable")
        gt = np.asarray(synthetic.gt_mask(ground_truth, int(row["frame_index"]))) > 0
        if pred.shape != gt.shape:
            pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_NEAREST)
        p = pred > 127
        union = np.logical_or(p, gt).sum()
        iou = 1.0 if union == 0 else float(np.logical_and(p, gt).sum() / union)
        ious.append((iou, int(row["frame_index"])))
    if not ious:
        return {"frames": 0, "mean_iou": None, "min_iou": None, "min_iou_frame": None}
    worst = min(ious)
    return {
        "frames": len(ious),
        "mean_iou": round(float(np.mean([v for v, _ in ious])), 4),
        "min_iou": round(worst[0], 4),
        "min_iou_frame": worst[1],
    }
