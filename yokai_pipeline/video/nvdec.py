"""NVDEC decoding with PyNvVideoCodec: frames decoded and analysed in GPU memory.

PyNvVideoCodec (NVIDIA's decoder bindings, its own FFmpeg demuxer) hands out NV12 surfaces
that wrap as torch tensors through DLPack. The surfaces are recycled by the decoder, so each
frame is copied once on the GPU (a device copy, ~3 MB at 1080p) and the copy is what the frame
keeps; nothing full-size crosses to the host unless the frame is kept (:meth:`NvdecFrame.to_ndarray`).

One decoder per keyframe segment (:mod:`.segments`), each run by its own thread
(:meth:`NvdecSource.frames_from`, a CUDA stream each), because one NVDEC session reading
sequentially leaves most of the GPU's decode engines idle (issue 19: 741 frames/s with one,
3,232 frames/s with seven at 1080p on an H200). How frames.py scans segments at once and still
gets one pass's result is in ``yokai_pipeline.frames._segment_worker``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yokai_pipeline.video.segments import Segment, plan_segments

log = logging.getLogger(__name__)

AUTO_SEGMENTS = 7  # decoders at once: the measured knee on an H200 (3,232 frames/s)


class NvdecUnsupported(Exception):
    """NVDEC cannot decode this stream (codec, bit depth or chroma format); PyAV can."""


class NvdecDecodeError(Exception):
    """Decoding stopped early: the file is truncated or corrupt."""


def nvdec_available() -> bool:
    """Whether PyNvVideoCodec imports and torch sees a CUDA device."""
    try:
        import PyNvVideoCodec  # noqa: F401
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def gpu_index(device: str) -> int:
    """The CUDA ordinal of ``cuda`` / ``cuda:N`` (0 for plain ``cuda``)."""
    _, _, n = device.partition(":")
    return int(n) if n.isdigit() else 0


@dataclass
class NvdecFrame:
    """A decoded frame held on the GPU as NV12; duck-types the ``av.VideoFrame`` calls frames.py makes."""

    nv12: Any  # [height * 3 // 2, width] uint8 CUDA tensor, owned by this frame
    width: int
    height: int

    def rgb(self) -> Any:
        """``[H, W, 3]`` uint8 RGB on the GPU (for GPU-resident stages)."""
        from yokai_pipeline.video.features import nv12_to_rgb

        return nv12_to_rgb(self.nv12, self.width, self.height)

    def to_ndarray(self, format: str = "rgb24") -> np.ndarray:
        """Host pixels, ``rgb24`` or ``bgr24`` (what ``av.VideoFrame.to_ndarray`` returns)."""
        return self.pixels(0, format)

    def pixels(self, max_side: int = 0, format: str = "rgb24") -> np.ndarray:
        """Host pixels with the longer side at most ``max_side`` (resized on the GPU, area average)."""
        return _host(_shrink(self.rgb(), max_side), format)

    def shrunk(self, max_side: int) -> SmallFrame:
        """This frame at most ``max_side`` on the longer side, RGB on the GPU (frees the full-size copy)."""
        import torch

        rgb = _shrink(self.rgb(), max_side)
        if rgb.is_cuda:
            torch.cuda.current_stream().synchronize()  # another thread reads it, on another stream
        return SmallFrame(rgb, rgb.shape[1], rgb.shape[0])


@dataclass
class SmallFrame:
    """A downscaled RGB frame kept on the GPU (a shot's stack candidate); same calls as NvdecFrame."""

    rgb_small: Any
    width: int
    height: int

    def pixels(self, max_side: int = 0, format: str = "rgb24") -> np.ndarray:
        return _host(_shrink(self.rgb_small, max_side), format)

    def to_ndarray(self, format: str = "rgb24") -> np.ndarray:
        return self.pixels(0, format)


def _shrink(rgb: Any, max_side: int) -> Any:
    """``[H, W, 3]`` uint8 resized so the longer side is at most ``max_side`` (area average, as INTER_AREA)."""
    import torch.nn.functional as F

    from yokai_pipeline.frames import _capped_size

    h, w = rgb.shape[:2]
    cw, ch = _capped_size(w, h, max_side)
    if (cw, ch) == (w, h):
        return rgb
    x = F.interpolate(rgb.permute(2, 0, 1)[None].float(), size=(ch, cw), mode="area")
    return x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(rgb.dtype)


def _host(rgb: Any, format: str) -> np.ndarray:
    if format not in ("rgb24", "bgr24"):
        raise ValueError(f"GPU frame: unsupported pixel format {format!r} (rgb24 or bgr24)")
    return (rgb.flip(-1) if format == "bgr24" else rgb).contiguous().cpu().numpy()


def _analyse(nv12: Any, width: int, height: int, hist_width: int, sharp_width: int) -> tuple[Any, Any, Any]:
    """:func:`nv12_features` of a batch; on CUDA out of memory the batch is analysed in halves."""
    import torch

    from yokai_pipeline.video.features import nv12_features

    try:
        return nv12_features(nv12, width, height, hist_width, sharp_width)
    except torch.cuda.OutOfMemoryError:
        if nv12.shape[0] == 1:
            raise
        torch.cuda.empty_cache()
        log.warning(f"CUDA out of memory analysing {nv12.shape[0]} frames; retrying in halves")
        half = nv12.shape[0] // 2
        a = _analyse(nv12[:half], width, height, hist_width, sharp_width)
        b = _analyse(nv12[half:], width, height, hist_width, sharp_width)
        return tuple(torch.cat([x, y]) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


class NvdecSource:
    """Every frame of an episode, decoded by NVDEC over keyframe segments, with its analysis.

    Args:
        video: the episode file.
        hist_width: histogram image width (``FramesConfig.analysis_width``).
        sharp_width: sharpness / hash image width.
        segments: decoders at once (0 = :data:`AUTO_SEGMENTS`).
        batch: frames per analysis batch (``FramesConfig.gpu_batch``).
        device: ``cuda`` or ``cuda:N``.

    Raises:
        NvdecUnsupported: NVDEC cannot open or decode the stream (the caller falls back to PyAV,
            which also names a file that no decoder can read).
    """

    def __init__(
        self, video: Path, hist_width: int, sharp_width: int, segments: int, batch: int, device: str
    ) -> None:
        import PyNvVideoCodec as nvc

        self.video, self.hist_width, self.sharp_width = Path(video), hist_width, sharp_width
        self.batch, self.gpu = max(1, batch), gpu_index(device)
        self._nvc = nvc
        try:
            probe = self._decoder(scanned=True)
            meta = probe.get_scanned_stream_metadata()
            first = probe.get_batch_frames(1)  # NVDEC refuses a 10-bit or 4:2:2 stream here, not at open
        except Exception as exc:  # PyNvVideoCodec raises its own exception types, not exported
            raise NvdecUnsupported(str(exc).strip().splitlines()[0][:200] or type(exc).__name__) from exc
        if not first:
            raise NvdecUnsupported("no frame decoded")
        shape = tuple(first[0].shape)
        self.width, self.height = int(meta.width), int(meta.height)
        if shape != (self.height * 3 // 2, self.width) or self.height % 2 or self.width % 2:
            raise NvdecUnsupported(f"surface {shape} is not 8-bit NV12 of {self.width}x{self.height}")
        self.total = int(meta.num_frames)
        self.fps = float(meta.average_fps or 0.0)
        self.codec = str(meta.codec_name)
        parts = segments or AUTO_SEGMENTS
        self.segments: list[Segment] = plan_segments(self.total, list(meta.key_frame_indices), parts)
        del probe, first

    def _decoder(self, scanned: bool = False, stream: int = 0) -> Any:
        nvc = self._nvc
        return nvc.SimpleDecoder(
            str(self.video),
            gpu_id=self.gpu,
            cuda_stream=stream,
            use_device_memory=True,
            need_scanned_stream_metadata=scanned,
            output_color_type=nvc.OutputColorType.NATIVE,
        )

    def _guarded(self, pos: int, call: Any, *args: Any, **kwargs: Any) -> Any:
        """A decoder call; what PyNvVideoCodec raises becomes :class:`NvdecDecodeError` naming the frame."""
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # PyNvVideoCodec's exception types are not exported
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise NvdecDecodeError(f"NVDEC failed at frame {pos} of {self.total}: {first}") from exc

    def frames_from(self, start: int = 0) -> Iterator[Any]:
        """Frames ``start``.. to the end, as ``frames.DecodedFrame`` (frame = :class:`NvdecFrame`).

        Decodes in the calling thread with a decoder and CUDA stream of its own, so several
        segments decode at once from several threads.

        Raises:
            NvdecDecodeError: decoding stopped early (truncated or corrupt file).
        """
        import torch

        from yokai_pipeline.frames import DecodedFrame

        torch.cuda.set_device(self.gpu)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            try:  # the decoder's copies on this thread's stream, ordered before the analysis
                dec = self._decoder(stream=stream.cuda_stream)
            except Exception:  # a build that takes no stream handle: the default stream (DLPack syncs)
                dec = self._guarded(start, self._decoder)
            if start:
                self._guarded(start, dec.seek_to_index, start)
            pos = start
            while pos < self.total:
                got = self._guarded(pos, dec.get_batch_frames, min(self.batch, self.total - pos))
                if not got:
                    raise NvdecDecodeError(f"decoding stopped at frame {pos} of {self.total}")
                # the decoder recycles its surfaces: each frame keeps its own copy
                own = [torch.from_dlpack(f).clone() for f in got]
                hist, sharp, grey = _analyse(
                    torch.stack(own), self.width, self.height, self.hist_width, self.sharp_width
                )
                hist, sharp, grey = hist.cpu().numpy(), sharp.cpu().numpy(), grey.cpu().numpy()
                for i, nv in enumerate(own):
                    idx = pos + i
                    ts = idx / self.fps if self.fps else float(idx)
                    frame = NvdecFrame(nv, self.width, self.height)
                    yield DecodedFrame(idx, ts, frame, hist[i], float(sharp[i]), grey[i])
                pos += len(got)


def bare_decode(video: Path, segments: int = 0, device: str = "cuda", batch: int = 32) -> tuple[int, float]:
    """NVDEC decode of every frame over the same segments, no analysis; returns (frames, seconds).

    The floor frame extraction is measured against (bench/bench_end_to_end.py).
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    src = NvdecSource(video, 160, 320, segments, batch, device)

    def run(seg: Segment) -> int:
        torch.cuda.set_device(src.gpu)
        stream = torch.cuda.Stream()
        dec = src._decoder(stream=stream.cuda_stream)
        if seg.start:
            dec.seek_to_index(seg.start)
        n = seg.start
        while n < seg.end:
            got = dec.get_batch_frames(min(batch, seg.end - n))
            if not got:
                break
            n += len(got)
        stream.synchronize()
        return n - seg.start

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(src.segments)) as pool:
        n = sum(pool.map(run, src.segments))
    return n, time.perf_counter() - t0
