"""Frame extraction: streaming decode, shot detection, sharp-frame picking, near-duplicate removal.

One pass over the video with PyAV (any container FFmpeg reads), FFmpeg decoding on all cores.
Per frame only small analysis images are computed, straight from the decoder's YUV planes
(no full-size colour conversion) on a few threads; a frame becomes full-size RGB pixels only
if it is kept. The frames held in memory are a bounded set of candidates of the (at most
two) shots still open plus a few chunks in flight, so memory does not grow with the episode.

- Shots: a hard cut is a large HSV-histogram distance between consecutive downscaled frames.
  Shots shorter than ``min_shot_frames`` are merged into the previous shot (flashes, glitches).
- Sharp frames: each shot is split into ``frames_per_shot`` parts and the frame with the highest
  variance of the Laplacian near the middle of each part is kept, so the picks are spread out.
- Duplicates: a 64-bit perceptual hash (imagehash.phash, 16 hex digits) per picked frame; a frame
  within ``dedup_hamming`` bits of a frame kept earlier in this episode is dropped. Across
  episodes (the repeated opening and ending, kept once per series) :func:`dedup_series` runs
  after extraction over a shared hash index, so episodes are extracted independently and in
  parallel. (``reference_hashes`` still drops them during extraction, for a caller that has them.)

Outputs (docs/data-formats.md): ``episodes/<id>/frames/*.png``, ``frames.jsonl`` and
``extract.json`` (statistics; also the completion marker used to skip a finished episode).
With ``shot_stack_side`` set, each shot that keeps a frame also gets a *stack*
(``episodes/<id>/shots/<id>_s{shot:05d}.npz``): the shot's candidate frames (the sharpest of each
bin, spread over the shot, at most ``3 x frames_per_shot``), small, so the detection stage can
build the shot's background plate (yokai_pipeline/detection.py) without decoding the video again.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from yokai_pipeline import fsio
from yokai_pipeline.config import FramesConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.workspace import Workspace

ALGORITHM_VERSION = 2  # 2: PyAV decode, analysis on the YUV planes
_SHARPNESS_WIDTH = 320  # sharpness is measured at this width at most: enough to rank blur, cheap at 4K
_YUV420 = frozenset({"yuv420p", "yuvj420p"})  # what nearly every H.264/HEVC/AV1 8-bit episode decodes to
_CHUNK = 8  # frames per analysis task: amortises the hand-off, bounds frames in flight
_FEATURE_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))
_MAX_PENDING_WRITES = 8  # PNG encodes overlap decoding in threads; bounded so frames don't pile up
_PROGRESS_EVERY = 48

log = logging.getLogger(__name__)


def episode_id_for(video: str | Path) -> str:
    """The workspace id of an episode: its file stem made path-safe."""
    return fsio.safe_name(Path(video).stem, fallback="episode")


# --------------------------------------------------------------------------------------
# Small pure per-image functions


def analysis_image(frame: np.ndarray, width: int) -> np.ndarray:
    """Downscale a BGR frame to ``width`` px wide (aspect kept) for shot detection."""
    h, w = frame.shape[:2]
    if w <= width:
        return frame
    # bilinear, not INTER_AREA: 7x cheaper, and a histogram does not mind the aliasing
    return cv2.resize(frame, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_LINEAR)


def _scaled_size(w: int, h: int, width: int) -> tuple[int, int]:
    """(width, height) of a ``w`` x ``h`` image scaled to at most ``width`` wide, even sides."""
    if w <= width:
        return w - w % 2 or w, h - h % 2 or h
    return width - width % 2, max(2, round(h * width / w / 2) * 2)


def yuv420_analysis_images(
    y: np.ndarray, u: np.ndarray, v: np.ndarray, hist_width: int, sharp_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Small BGR image (for the histogram) and small grey image (for sharpness) of a YUV 4:2:0 frame.

    Works on the decoder's planes directly: only the downscaled pixels are converted to BGR,
    so a 1080p frame costs a few small resizes instead of a full-size colour conversion.
    """
    h, w = y.shape
    sw, sh = _scaled_size(w, h, sharp_width)
    grey = cv2.resize(y, (sw, sh), interpolation=cv2.INTER_LINEAR) if (sw, sh) != (w, h) else y
    hw, hh = _scaled_size(w, h, hist_width)
    i420 = np.empty((hh * 3 // 2, hw), np.uint8)
    i420[:hh] = cv2.resize(grey, (hw, hh), interpolation=cv2.INTER_LINEAR)
    chroma = i420[hh:].reshape(2, hh // 2, hw // 2)
    chroma[0] = cv2.resize(u, (hw // 2, hh // 2), interpolation=cv2.INTER_LINEAR)
    chroma[1] = cv2.resize(v, (hw // 2, hh // 2), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420), grey


def _plane(plane: Any) -> np.ndarray:
    """A zero-copy uint8 view of one plane of an av.VideoFrame (rows may be padded)."""
    rows = np.frombuffer(plane, np.uint8, count=plane.height * plane.line_size)
    return rows.reshape(plane.height, plane.line_size)[:, : plane.width]


def frame_features(frame: Any, hist_width: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Histogram (shot detection), sharpness and small grey image (phash) of an ``av.VideoFrame``."""
    if frame.format.name in _YUV420:
        small, grey = yuv420_analysis_images(*(_plane(p) for p in frame.planes), hist_width, _SHARPNESS_WIDTH)
    else:  # 10-bit, 4:2:2, 4:4:4, RGB, grey...: let FFmpeg convert the whole frame
        # one resize of the full frame feeds both small images (the full-size resize is the costly one)
        base = analysis_image(frame.to_ndarray(format="bgr24"), max(hist_width, _SHARPNESS_WIDTH))
        small = analysis_image(base, hist_width)
        grey = cv2.cvtColor(analysis_image(base, _SHARPNESS_WIDTH), cv2.COLOR_BGR2GRAY)
    return colour_histogram(small), sharpness(grey), grey


def frame_pixels(frame: Any, max_side: int = 0, format: str = "rgb24") -> np.ndarray:
    """Pixels of a decoded ``av.VideoFrame``, downscaled so the longer side is at most ``max_side``."""
    if hasattr(frame, "pixels"):  # a GPU frame resizes where it is (yokai_pipeline/video/nvdec.py)
        return frame.pixels(max_side, format)
    img = frame.to_ndarray(format=format)
    h, w = img.shape[:2]
    if max_side and max(h, w) > max_side:
        img = cv2.resize(img, _capped_size(w, h, max_side), interpolation=cv2.INTER_AREA)
    return img


def _capped_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    if not max_side or max(h, w) <= max_side:
        return w, h
    s = max_side / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


def _save_stack(dest: Path, cands: list[_Candidate], side: int) -> Path:
    """Write a shot's candidate frames as one compressed .npz (``frames`` NxHxWx3 RGB, ``index``)."""
    import io

    frames = np.stack([frame_pixels(c.frame, side, "rgb24") for c in cands])
    buf = io.BytesIO()
    np.savez_compressed(buf, frames=frames, index=np.array([c.index for c in cands], np.int64))
    return fsio.atomic_write_bytes(dest, buf.getvalue())


def _save_frame(dest: Path, frame: Any, max_side: int) -> Path:
    # the full-size colour conversion happens here, on a writer thread, for kept frames only
    return fsio.atomic_write_bytes(dest, fsio.encode_png(frame_pixels(frame, max_side, "bgr24")))


@dataclass
class DecodedFrame:
    """One decoded frame with what shot detection and frame picking need."""

    index: int
    timestamp: float | None  # presentation time in seconds from the container, if any
    frame: Any  # the av.VideoFrame; converted to pixels only if the frame is kept
    hist: np.ndarray
    sharpness: float
    thumb: np.ndarray  # small grey image, for the perceptual hash


def analysed_frames(
    container: Any, stream: Any, hist_width: int, workers: int = _FEATURE_WORKERS
) -> Iterator[DecodedFrame]:
    """Decode ``stream`` and yield every frame in order with its histogram and sharpness.

    FFmpeg decodes on its own threads (frame threading); a reader thread feeds chunks of
    decoded frames to ``workers`` analysis threads (OpenCV releases the GIL), so decoding and
    analysis overlap and the analysis scales with cores. At most about
    ``(workers + 2) * _CHUNK`` frames are in flight.

    Raises:
        av.FFmpegError: decoding failed (raised here, in the caller's thread).
    """
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="frames-analyse")
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, workers) + 1)
    stop = threading.Event()
    done = object()

    def analyse(chunk: list[Any]) -> list[tuple[Any, float | None, np.ndarray, float, np.ndarray]]:
        return [(f, f.time, *frame_features(f, hist_width)) for f in chunk]

    def reader() -> None:
        try:
            chunk: list[Any] = []
            for f in container.decode(stream):
                if stop.is_set():
                    return
                chunk.append(f)
                if len(chunk) == _CHUNK:
                    q.put(pool.submit(analyse, chunk))
                    chunk = []
            if chunk:
                q.put(pool.submit(analyse, chunk))
        except Exception as exc:  # handed to the consumer, raised there
            q.put(exc)
        finally:
            q.put(done)

    thread = threading.Thread(target=reader, name="frames-decode", daemon=True)
    thread.start()
    index = 0
    try:
        while (item := q.get()) is not done:
            if isinstance(item, Exception):
                raise item
            for f, ts, hist, sharp, thumb in item.result():
                yield DecodedFrame(index, ts, f, hist, sharp, thumb)
                index += 1
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class FrameSource:
    """Where an episode's analysed frames come from: one decoder backend over the whole file."""

    decoder: str  # "pyav" or "nvdec"
    fps: float
    total: int  # frames the container announces (0 when unknown)
    frames: Iterator[DecodedFrame]  # one pass (when ``open_at`` is None)
    errors: tuple[type[BaseException], ...]  # what decoding raises for a truncated or corrupt file
    segments: int = 1
    note: str = ""  # why the configured decoder was not used, if it was not
    # segments scanned at once: their first frames (keyframes), and a decoder from a frame to the end
    starts: list[int] = field(default_factory=list)
    open_at: Callable[[int], Iterator[DecodedFrame]] | None = None


def _stream_rate(stream: Any) -> tuple[float, int]:
    """(fps, announced frame count) of a PyAV stream; 0 where unknown or absurd."""
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        fps = 0.0
    return fps, max(int(stream.frames or 0), 0)


def _keyframe_index(video: Path) -> tuple[list[int], list[int]]:
    """(sorted presentation timestamps of every frame, indices of the keyframes) from the packets alone."""
    import av

    pts: list[int] = []
    keys: list[int] = []
    with av.open(str(video)) as c:
        for packet in c.demux(c.streams.video[0]):
            if packet.pts is None or packet.size == 0:
                continue
            pts.append(int(packet.pts))
            if packet.is_keyframe:
                keys.append(int(packet.pts))
    pts.sort()
    rank = {p: i for i, p in enumerate(pts)}
    return pts, sorted(rank[k] for k in keys)


def pyav_frames_from(video: Path, pts: list[int], start: int, hist_width: int) -> Iterator[DecodedFrame]:
    """Frames ``start``.. of ``video`` from a container of their own, seeking to frame ``start``'s keyframe.

    The same frames, indices and analysis as one pass from the beginning: the decoder starts at the
    keyframe at or before ``start``, and the frames before ``start`` are skipped.

    Args:
        video: the episode file.
        pts: every frame's presentation timestamp, sorted (:func:`_keyframe_index`).
        start: first frame wanted.
        hist_width: histogram image width.
    """
    import av

    with av.open(str(video)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        if start:
            c.seek(pts[start], stream=stream, backward=True)
        idx = start
        for item in analysed_frames(c, stream, hist_width):
            if start and item.frame.pts is not None and item.frame.pts < pts[start]:
                continue  # before the wanted frame (a seek lands on the keyframe at or before it)
            yield DecodedFrame(idx, item.timestamp, item.frame, item.hist, item.sharpness, item.thumb)
            idx += 1


def resolve_decoder(decoder: str) -> str:
    """``auto`` -> ``nvdec`` when PyNvVideoCodec and a CUDA device are present, else ``pyav``.

    Raises:
        RuntimeError: ``nvdec`` asked for where it cannot run.
    """
    if decoder == "pyav":
        return "pyav"
    from yokai_pipeline.video.nvdec import nvdec_available

    if nvdec_available():
        return "nvdec"
    if decoder == "nvdec":
        raise RuntimeError(
            "frames.decoder=nvdec needs a CUDA device and PyNvVideoCodec (pip install pynvvideocodec); "
            "set frames.decoder=auto or pyav to decode on the CPU"
        )
    return "pyav"


def open_frame_source(video: Path, container: Any, stream: Any, cfg: FramesConfig) -> FrameSource:
    """The configured decoder over ``video`` (already opened by PyAV, which validated it).

    NVDEC is used when :func:`resolve_decoder` picks it and it can decode the stream; a stream it
    cannot decode (10-bit, 4:2:2, a codec this GPU lacks) falls back to PyAV with a log line.
    """
    import av

    fps, total = _stream_rate(stream)
    note = ""
    if resolve_decoder(cfg.decoder) == "nvdec":
        from yokai_pipeline.runtime.leases import resolve_auto
        from yokai_pipeline.video.nvdec import NvdecDecodeError, NvdecSource, NvdecUnsupported

        try:
            src = NvdecSource(
                video,
                cfg.analysis_width,
                _SHARPNESS_WIDTH,
                cfg.decode_segments,
                cfg.gpu_batch,
                resolve_auto("auto", True),
            )
        except NvdecUnsupported as exc:
            note = f"NVDEC cannot decode {video.name} ({exc}); decoding it with PyAV on the CPU"
            log.warning(note)
        else:
            # the container's own count, when it has one, also catches a file cut short after its header
            fps, total = fps or src.fps, total or src.total
            errors = (NvdecDecodeError,)
            if len(src.segments) < 2:
                return FrameSource("nvdec", fps, total, src.frames_from(0), errors)
            starts = [seg.start for seg in src.segments]
            return FrameSource(
                "nvdec", fps, total, iter(()), errors, len(starts), "", starts, src.frames_from
            )
    if cfg.decode_segments > 1:
        from yokai_pipeline.video.segments import plan_segments

        pts, keys = _keyframe_index(video)
        segs = plan_segments(len(pts), keys, cfg.decode_segments)
        if len(segs) > 1:
            return FrameSource(
                "pyav",
                fps,
                total,
                iter(()),
                (av.FFmpegError,),
                len(segs),
                note,
                [s.start for s in segs],
                lambda start: pyav_frames_from(video, pts, start, cfg.analysis_width),
            )
    it = analysed_frames(container, stream, cfg.analysis_width)
    return FrameSource("pyav", fps, total, it, (av.FFmpegError,), 1, note)


def colour_histogram(small_bgr: np.ndarray) -> np.ndarray:
    """Normalised HSV histogram (hue x saturation, plus value) of a small BGR image."""
    hsv = cv2.cvtColor(small_bgr, cv2.COLOR_BGR2HSV)
    hs = cv2.calcHist([hsv], [0, 1], None, [18, 8], [0, 180, 0, 256]).ravel()
    v = cv2.calcHist([hsv], [2], None, [16], [0, 256]).ravel()
    hist = np.concatenate([hs, v]).astype(np.float32)
    return hist / max(1.0, float(hist.sum()))


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Distance in [0, 1] between two :func:`colour_histogram` results (half their L1 distance)."""
    return float(np.abs(a - b).sum()) / 2.0


def sharpness(frame_bgr: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image (higher = sharper)."""
    grey = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY) if frame_bgr.ndim == 3 else frame_bgr
    h, w = grey.shape
    if w > _SHARPNESS_WIDTH:
        grey = cv2.resize(
            grey, (_SHARPNESS_WIDTH, max(1, round(h * _SHARPNESS_WIDTH / w))), interpolation=cv2.INTER_AREA
        )
    # int16 Laplacian + meanStdDev: same value as float32 .var(), 4x faster
    _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S))
    return float(std[0, 0]) ** 2


def perceptual_hash(image: np.ndarray) -> str:
    """64-bit DCT perceptual hash of a grey or RGB image as 16 hex digits (imagehash.phash).

    phash looks only at the lowest 8x8 DCT frequencies of a 32x32 grey image, so hashing the
    small analysis image gives the hash of the full frame at a fraction of the cost.
    """
    import imagehash
    from PIL import Image

    small = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
    return str(imagehash.phash(Image.fromarray(small)))


def hamming(a: str, b: str) -> int:
    """Bit distance between two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


class HashIndex:
    """64-bit hashes with a vectorised "any within ``max_distance`` bits?" query.

    A series of 50 episodes has tens of thousands of reference frames; a numpy popcount over
    all of them costs microseconds per query where a Python loop costs milliseconds.
    """

    def __init__(self, hashes: Sequence[str] = ()):
        self._buf = np.zeros(max(16, len(hashes)), np.uint64)
        self._n = 0
        for h in hashes:
            self.add(h)

    def __len__(self) -> int:
        return self._n

    def add(self, h: str) -> None:
        if self._n == len(self._buf):
            self._buf = np.concatenate([self._buf, np.zeros_like(self._buf)])
        self._buf[self._n] = np.uint64(int(h, 16) & 0xFFFFFFFFFFFFFFFF)
        self._n += 1

    def near(self, h: str, max_distance: int) -> bool:
        if not self._n:
            return False
        x = np.uint64(int(h, 16) & 0xFFFFFFFFFFFFFFFF)
        return bool((np.bitwise_count(self._buf[: self._n] ^ x) <= max_distance).any())


# --------------------------------------------------------------------------------------
# Bounded per-shot candidate buffer


@dataclass
class _Candidate:
    index: int
    timestamp: float
    sharpness: float
    frame: Any  # the decoded av.VideoFrame; see frame_pixels
    thumb: np.ndarray | None = None  # small grey image, for the perceptual hash


@dataclass
class _Shot:
    start: int
    end: int = 0  # exclusive, set when the shot closes
    bin_width: int = 1
    bins: dict[int, _Candidate] = field(default_factory=dict)
    last_hist: np.ndarray | None = None  # histogram of the last frame, set when the shot closes

    def offer(self, cand: _Candidate, max_bins: int) -> None:
        """Keep the sharpest frame per bin of ``bin_width`` frames; widen bins when too many."""
        key = (cand.index - self.start) // self.bin_width
        cur = self.bins.get(key)
        if cur is None or cand.sharpness > cur.sharpness:
            # a reference, not a copy: the decoder hands out a new frame every time
            self.bins[key] = cand
        while len(self.bins) > max_bins:
            self.bin_width *= 2
            merged: dict[int, _Candidate] = {}
            for c in self.bins.values():
                k = (c.index - self.start) // self.bin_width
                if k not in merged or c.sharpness > merged[k].sharpness:
                    merged[k] = c
            self.bins = merged

    def absorb(self, other: _Shot, max_bins: int) -> None:
        """Merge a following too-short shot into this one."""
        self.end = other.end
        for c in sorted(other.bins.values(), key=lambda c: c.index):
            self.offer(c, max_bins)

    def pick(self, k: int) -> list[_Candidate]:
        """Up to ``k`` sharp candidates spread over the shot, in frame order."""
        n = self.end - self.start
        cands = sorted(self.bins.values(), key=lambda c: c.index)
        if not cands:
            return []
        k = min(k, n, len(cands))
        picks: list[_Candidate] = []
        for j in range(k):
            lo = self.start + (j + 0.2) * n / k
            hi = self.start + (j + 0.8) * n / k
            centre = self.start + (j + 0.5) * n / k
            inside = [c for c in cands if lo <= c.index < hi and c not in picks]
            if inside:
                best = max(inside, key=lambda c: (c.sharpness, -abs(c.index - centre)))
            else:
                rest = [c for c in cands if c not in picks]
                if not rest:
                    break
                best = min(rest, key=lambda c: abs(c.index - centre))
            picks.append(best)
        return sorted(picks, key=lambda c: c.index)


# --------------------------------------------------------------------------------------
# The stage


def _config_key(cfg: FramesConfig, reference_hashes: Sequence[str]) -> str:
    return fsio.stable_hash(
        {
            "algorithm": ALGORITHM_VERSION,
            "config": cfg.model_dump(mode="json"),
            "references": sorted(reference_hashes),
        }
    )


def _open_video(video: Path) -> tuple[Any, Any]:
    """(container, video stream) of an episode file; a file FFmpeg cannot read -> BadInputError."""
    import av

    if not video.exists():
        raise BadInputError(video, "file does not exist")
    if not video.is_file():
        raise BadInputError(video, "not a regular file")
    if video.stat().st_size == 0:
        raise BadInputError(video, "file is empty (0 bytes)")
    try:
        container = av.open(str(video))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise BadInputError(
            video, f"not a readable video (FFmpeg cannot open it; corrupt or not a video: {exc})"
        ) from exc
    if not container.streams.video:
        container.close()
        raise BadInputError(video, "not a readable video (no video stream; audio-only or a data file)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads: FFmpeg decodes on every core
    return container, stream


def extract_frames(
    video: str | Path,
    workspace: Workspace,
    cfg: FramesConfig,
    *,
    reference_hashes: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Extract sharp, non-duplicate frames of one episode into the workspace.

    Args:
        video: Episode file (any container FFmpeg reads through OpenCV).
        workspace: Run workspace; outputs go to ``episodes/<episode_id>/``.
        cfg: Frame extraction settings.
        reference_hashes: Perceptual hashes of frames kept from earlier episodes; a frame close
            to one of them is dropped (cross-episode duplicates such as the opening).
        progress: Called as ``progress(done, total)`` while decoding; ``total`` is the
            container's frame count (0 when unknown).

    Returns:
        Statistics, also written to ``extract.json``: decoded, fps, shots, candidates, kept,
        dropped_within, dropped_cross, seconds, shot_starts, config_hash, video_sha256.

    Raises:
        BadInputError: The file is missing, empty, not a video, has no video stream or is truncated.
    """
    video = Path(video)
    t0 = time.perf_counter()
    episode_id = episode_id_for(video)
    ep_dir = workspace.episode_dir(episode_id)
    stats_path = ep_dir / "extract.json"
    manifest = workspace.frames_manifest(episode_id)
    container, stream = _open_video(video)
    try:
        sha = fsio.file_sha256(video)
        key = _config_key(cfg, reference_hashes)
        if stats_path.exists() and manifest.exists():
            try:
                old = fsio.read_json(stats_path)
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict) and old.get("video_sha256") == sha and old.get("config_hash") == key:
                return {**old, "skipped": True}
        frames_dir = ep_dir / "frames"
        for old_dir in (frames_dir, ep_dir / "shots"):
            if old_dir.exists():  # outputs of another config or a killed run
                shutil.rmtree(old_dir)
        stats_path.unlink(missing_ok=True)
        source = open_frame_source(video, container, stream, cfg)
        try:
            rows, stats = _scan(
                video, source, workspace, episode_id, frames_dir, cfg, list(reference_hashes), progress
            )
        finally:
            close = getattr(source.frames, "close", None)
            if close is not None:  # stops a decoder's threads now, not at garbage collection
                close()
    finally:
        container.close()
    fsio.write_jsonl(manifest, rows)
    stats.update(
        episode=video.name,
        episode_id=episode_id,
        video_sha256=sha,
        config_hash=key,
        seconds=round(time.perf_counter() - t0, 3),
        config=cfg.model_dump(mode="json"),
    )
    fsio.atomic_write_json(stats_path, stats)
    return {**stats, "skipped": False}


class _ShotMachine:
    """Hard cuts, flash merging and per-shot candidate bins over analysed frames fed in order.

    :meth:`feed` returns the shots that close for good (in order); :meth:`finish` the rest at the
    end. :meth:`begin_at` starts it at a *clean* cut (see :func:`_is_clean_cut`), where one pass
    over the whole file is in exactly this state, so a segment can be scanned on its own.
    """

    def __init__(self, cfg: FramesConfig) -> None:
        self.cfg = cfg
        self.max_bins = max(6, 3 * cfg.frames_per_shot)
        self.prev_hist: np.ndarray | None = None
        self.closed: _Shot | None = None  # previous shot, kept open until the current one is long enough
        self.current: _Shot | None = None

    def begin_at(self, index: int) -> None:
        self.current, self.closed, self.prev_hist = _Shot(start=index), None, None

    def feed(self, item: DecodedFrame, ts: float) -> list[_Shot]:
        cfg, idx, hist = self.cfg, item.index, item.hist
        done: list[_Shot] = []
        cut = self.prev_hist is not None and histogram_distance(self.prev_hist, hist) >= cfg.shot_threshold
        current, closed = self.current, self.closed
        if current is None:
            current = _Shot(start=idx)
        elif cut:
            if idx - current.start < cfg.min_shot_frames:
                if closed is not None:  # a flash: merge it into the previous shot
                    current.end = idx
                    closed.absorb(current, self.max_bins)
                    back = (
                        closed.last_hist is not None
                        and histogram_distance(closed.last_hist, hist) < cfg.shot_threshold
                    )
                    if back:
                        current, closed = closed, None  # back to the same scene: one shot
                    else:
                        current = _Shot(start=idx)
                # else: a too-short first segment simply joins the shot that follows
            else:
                current.end = idx
                current.last_hist = self.prev_hist
                if closed is not None:
                    done.append(closed)
                closed, current = current, _Shot(start=idx)
        elif closed is not None and idx - current.start + 1 >= cfg.min_shot_frames:
            done.append(closed)
            closed = None
        self.prev_hist = hist
        current.offer(_Candidate(idx, ts, item.sharpness, item.frame, item.thumb), self.max_bins)
        self.current, self.closed = current, closed
        return done

    def finish(self, end: int) -> list[_Shot]:
        """The shots still open when the frames stop at ``end`` (exclusive)."""
        current, closed = self.current, self.closed
        if current is None:
            return []
        current.end = end
        if closed is None:
            return [current]
        if current.end - current.start < self.cfg.min_shot_frames:
            closed.absorb(current, self.max_bins)
            return [closed]
        return [closed, current]


@dataclass
class _ReadyShot:
    """A closed shot as the stage writes it: its picks with their hashes, and its stack candidates."""

    start: int
    picks: list[tuple[_Candidate, str]]
    stack: list[_Candidate]


def _ready(shot: _Shot, cfg: FramesConfig, shrink: bool = False) -> _ReadyShot:
    """Pick and hash ``shot``'s frames; with ``shrink``, stack-only candidates drop to stack size now.

    Shrinking frees a GPU frame's full-size copy while the shot waits for the segments before it.
    """
    picks = [(c, perceptual_hash(c.thumb)) for c in shot.pick(cfg.frames_per_shot)]
    stack = sorted(shot.bins.values(), key=lambda c: c.index) if cfg.shot_stack_side else []
    if shrink and stack:
        side = min(s for s in (cfg.max_side, cfg.shot_stack_side) if s > 0)
        picked = {id(c) for c, _ in picks}
        for c in stack:
            if id(c) not in picked and hasattr(c.frame, "shrunk"):
                c.frame = c.frame.shrunk(side)
    return _ReadyShot(shot.start, picks, stack)


class _Keeper:
    """Within-episode dedup of the picks in shot order, then the writes (PNG encodes on threads)."""

    def __init__(
        self,
        workspace: Workspace,
        video: Path,
        episode_id: str,
        frames_dir: Path,
        cfg: FramesConfig,
        references: list[str],
        writers: int = _FEATURE_WORKERS,
    ) -> None:
        self.ws, self.video, self.episode_id, self.frames_dir, self.cfg = (
            workspace,
            video,
            episode_id,
            frames_dir,
            cfg,
        )
        self.rows: list[dict[str, Any]] = []
        self.kept_hashes = HashIndex()
        self.reference_index = HashIndex(references)
        self.counters = {"candidates": 0, "dropped_within": 0, "dropped_cross": 0}
        self.shot_starts: list[int] = []
        self.writer = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="frames-png")
        self.pending: deque[Future] = deque()

    def add(self, shot: _ReadyShot) -> None:
        cfg = self.cfg
        shot_id = len(self.shot_starts)
        self.shot_starts.append(shot.start)
        first_row = len(self.rows)
        for cand, h in shot.picks:
            self.counters["candidates"] += 1
            if self.reference_index.near(h, cfg.dedup_hamming):
                self.counters["dropped_cross"] += 1
                continue
            if self.kept_hashes.near(h, cfg.dedup_hamming):
                self.counters["dropped_within"] += 1
                continue
            self.kept_hashes.add(h)
            row = _frame_row(
                self.ws, self.video, self.episode_id, self.frames_dir, cand, shot_id, h, cfg.max_side
            )
            self.rows.append(row)
            self._submit(_save_frame, self.ws.abs(row["path"]), cand.frame, cfg.max_side)
        if shot.stack and len(self.rows) > first_row:
            side = min(s for s in (cfg.max_side, cfg.shot_stack_side) if s > 0)
            dest = self.frames_dir.parent / "shots" / f"{self.episode_id}_s{shot_id:05d}.npz"
            for row in self.rows[first_row:]:
                row["stack_path"] = self.ws.rel(dest)
            self._submit(_save_stack, dest, shot.stack, side)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.pending.append(self.writer.submit(fn, *args))
        while len(self.pending) > _MAX_PENDING_WRITES:
            self.pending.popleft().result()

    def finish(self) -> None:
        while self.pending:
            self.pending.popleft().result()  # a failed write fails the episode

    def close(self) -> None:
        self.writer.shutdown(wait=True)


@dataclass
class _ScanInfo:
    decoded: int = 0  # frames seen (one pass) or the end of the stream (segments)
    size: tuple[int, int] | None = None


def _fixed_ts(item: DecodedFrame, last_ts: float, fps: float) -> float:
    ts = item.timestamp
    if ts is None or not math.isfinite(ts) or ts < 0 or (ts <= last_ts and item.index > 0):
        # containers without timestamps: fall back to the nominal rate
        ts = item.index / fps if fps else float(item.index)
    return ts


def _shots_one_pass(
    source: FrameSource, cfg: FramesConfig, info: _ScanInfo, progress: Callable[[int, int], None] | None
) -> Iterator[_ReadyShot]:
    """The closed shots of one decoder reading the whole file."""
    machine = _ShotMachine(cfg)
    last_ts = -1.0
    for item in source.frames:
        if info.size is None:
            info.size = (item.frame.width, item.frame.height)
        info.decoded += 1
        last_ts = _fixed_ts(item, last_ts, source.fps)
        for shot in machine.feed(item, last_ts):
            yield _ready(shot, cfg)
        if progress is not None and info.decoded % _PROGRESS_EVERY == 0:
            progress(info.decoded, max(source.total, info.decoded))
    _check_decoded(source, info)
    for shot in machine.finish(info.decoded):
        yield _ready(shot, cfg)


def _check_decoded(source: FrameSource, info: _ScanInfo) -> None:
    if info.decoded == 0:
        raise _NoFrames("no video frames could be decoded (audio-only, empty stream or corrupt)")
    if source.total > 0 and info.decoded < 0.9 * source.total:
        raise _NoFrames(f"truncated or corrupt: decoded {info.decoded} of {source.total} frames")


class _NoFrames(Exception):
    """The stream ended too early; becomes a BadInputError naming the file."""


def _scan(
    video: Path,
    source: FrameSource,
    workspace: Workspace,
    episode_id: str,
    frames_dir: Path,
    cfg: FramesConfig,
    references: list[str],
    progress: Callable[[int, int], None] | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    info = _ScanInfo()
    # with the decode on the GPU, PNG and stack encodes are what the CPU cores are left for
    writers = (
        _FEATURE_WORKERS if source.decoder == "pyav" else max(_FEATURE_WORKERS, (os.cpu_count() or 2) - 4)
    )
    keeper = _Keeper(workspace, video, episode_id, frames_dir, cfg, references, writers)
    if source.open_at is not None:
        shots = _shots_segmented(source, cfg, info, progress)
    else:
        shots = _shots_one_pass(source, cfg, info, progress)
    try:
        try:
            for shot in shots:
                keeper.add(shot)
        except _NoFrames as exc:
            raise BadInputError(video, str(exc)) from exc
        except source.errors as exc:
            if info.decoded == 0:
                raise BadInputError(
                    video, f"not a readable video (no frame could be decoded: {exc})"
                ) from exc
            of = f" of {source.total}" if source.total else ""
            raise BadInputError(
                video, f"truncated or corrupt: decoding failed after {info.decoded}{of} frames ({exc})"
            ) from exc
        finally:
            shots.close()
        if progress is not None:
            progress(info.decoded, info.decoded)
        keeper.finish()
    finally:
        keeper.close()
    assert info.size is not None
    stats = {
        "decoded": info.decoded,
        "fps": source.fps,
        "width": info.size[0],
        "height": info.size[1],
        "shots": len(keeper.shot_starts),
        "shot_starts": keeper.shot_starts,
        "kept": len(keeper.rows),
        **keeper.counters,
        "decoder": source.decoder,
        "decode_segments": source.segments,
    }
    if source.note:
        stats["decoder_note"] = source.note
    return keeper.rows, stats


# --------------------------------------------------------------------------------------
# Segments scanned at once (yokai_pipeline/video/segments.py)


class _CleanCuts:
    """Finds *clean* cuts: a hard cut with no other cut within ``min_shot_frames`` before or after.

    At a clean cut one pass over the file always closes the shot before and starts a fresh one
    with nothing carried over (the flash merge only reaches back over shorter shots), so the
    scan from there on depends on the frames from there on alone. Whether a cut is clean is
    decided by the frames within ``min_shot_frames`` of it, so two segments' scanners agree.
    """

    def __init__(self, cfg: FramesConfig) -> None:
        self.cfg = cfg
        self.prev_hist: np.ndarray | None = None
        self.last_cut = -(10**9)
        self.waiting: int | None = None  # a cut that is clean if no cut follows it too soon

    def see(self, item: DecodedFrame) -> int | None:
        """The clean cut that ``item`` confirms, if any."""
        cfg, idx = self.cfg, item.index
        cut = (
            self.prev_hist is not None and histogram_distance(self.prev_hist, item.hist) >= cfg.shot_threshold
        )
        self.prev_hist = item.hist
        confirmed = None
        if cut:
            self.waiting = idx if idx - self.last_cut >= cfg.min_shot_frames else None
            self.last_cut = idx
        elif self.waiting is not None and idx - self.waiting + 1 >= cfg.min_shot_frames:
            confirmed, self.waiting = self.waiting, None
        return confirmed


def _segment_worker(
    source: FrameSource, k: int, cfg: FramesConfig, out: queue.Queue, stop: threading.Event
) -> None:
    """Scan segment ``k``: from its first clean cut (frame 0 for the first) to the next segment's.

    A segment's first clean cut is the first at least ``min_shot_frames`` after its keyframe, so
    this scanner and the one before it agree on it. Frames are fed to the shot machine only once
    no cut that could be where this scan starts or ends is pending. Puts ``_ReadyShot`` items,
    then ``("end", frame reached, whether it is the end of the file)``; an exception instead on failure.
    """
    starts = [*source.starts, 10**12]
    lo, hi = starts[k] + cfg.min_shot_frames, starts[k + 1] + cfg.min_shot_frames
    machine, cuts = _ShotMachine(cfg), _CleanCuts(cfg)
    fifo: deque[tuple[DecodedFrame, float]] = deque()
    began = k == 0
    last_ts, end = -1.0, starts[k]

    def feed_before(limit: int) -> None:
        while fifo and fifo[0][0].index < limit:
            item, ts = fifo.popleft()
            if began:  # before the scan's start frames are only looked at
                for shot in machine.feed(item, ts):
                    out.put(_ready(shot, cfg, shrink=True))

    frames = source.open_at(starts[k])  # type: ignore[misc]
    try:
        for item in frames:
            if stop.is_set():
                return
            end = item.index + 1
            last_ts = _fixed_ts(item, last_ts, source.fps)
            clean = cuts.see(item)
            fifo.append((item, last_ts))
            if clean is not None and clean >= (hi if began else lo):
                feed_before(clean)
                if clean >= hi:  # the next segment's first clean cut: this scan ends there
                    for shot in machine.finish(clean) if began else []:
                        out.put(_ready(shot, cfg, shrink=True))
                    out.put(("end", clean, False))
                    return
                began = True
                machine.begin_at(clean)
            feed_before(cuts.waiting if cuts.waiting is not None else end)
        feed_before(end)
        for shot in machine.finish(end) if began else []:
            out.put(_ready(shot, cfg, shrink=True))
        out.put(("end", end, True))
    except BaseException as exc:  # handed to the consumer, raised there
        out.put(exc)
    finally:
        close = getattr(frames, "close", None)
        if close is not None:  # a generator: stops its decoder now
            close()


def _shots_segmented(
    source: FrameSource, cfg: FramesConfig, info: _ScanInfo, progress: Callable[[int, int], None] | None
) -> Iterator[_ReadyShot]:
    """The closed shots of every segment, scanned at once (one thread and decoder each), in order."""
    stop = threading.Event()
    queues: list[queue.Queue] = [queue.Queue() for _ in source.starts]
    threads = [
        threading.Thread(
            target=_segment_worker, args=(source, k, cfg, q, stop), daemon=True, name=f"frames-seg{k}"
        )
        for k, q in enumerate(queues)
    ]
    for t in threads:
        t.start()
    try:
        for q in queues:
            while not isinstance(item := q.get(), tuple):
                if isinstance(item, BaseException):
                    raise item
                if info.size is None and item.picks:
                    info.size = (item.picks[0][0].frame.width, item.picks[0][0].frame.height)
                yield item
            _, reached, eof = item
            info.decoded = max(info.decoded, reached)
            if progress is not None:
                progress(info.decoded, max(source.total, info.decoded))
            if eof:  # the segments after it found no start: they hold nothing
                break
        _check_decoded(source, info)
    finally:
        stop.set()
        for t in threads:
            t.join()


def _frame_row(
    workspace: Workspace,
    video: Path,
    episode_id: str,
    frames_dir: Path,
    cand: _Candidate,
    shot_id: int,
    phash: str,
    max_side: int,
) -> dict[str, Any]:
    """The manifest row of a kept frame (its size after the ``max_side`` cap)."""
    w, h = _capped_size(cand.frame.width, cand.frame.height, max_side)
    path = frames_dir / f"{episode_id}_f{cand.index:06d}.png"
    row = {
        "episode": video.name,
        "episode_id": episode_id,
        "frame_index": cand.index,
        "timestamp": round(cand.timestamp, 4),
        "shot_id": shot_id,
        "phash": phash,
        "sharpness": round(cand.sharpness, 3),
        "width": w,
        "height": h,
        "path": workspace.rel(path),
    }
    return row


def read_frame_hashes(manifest_path: str | Path) -> list[str]:
    """Perceptual hashes of the frames listed in a ``frames.jsonl`` manifest."""
    return [str(r["phash"]) for r in fsio.read_jsonl(manifest_path) if r.get("phash")]


def dedup_series(workspace: Workspace, episode_ids: Sequence[str], max_distance: int) -> dict[str, Any]:
    """Cross-episode near-duplicates of the extracted frames, over one shared hash index.

    Episodes are taken in episode-id order (not the order they finished in), so the result does
    not depend on which episode ran first: a frame is dropped when it is within ``max_distance``
    bits of a frame kept from an earlier episode. Only manifests are read; nothing is deleted,
    so adding an episode that sorts early changes this list and nothing that was extracted.

    Args:
        workspace: run workspace (``episodes/<id>/frames.jsonl`` are read).
        episode_ids: the series' episodes.
        max_distance: Hamming distance of near-duplicates (``FramesConfig.dedup_hamming``).

    Returns:
        ``{"order", "max_distance", "dropped": {episode_id: [frame_index, ...]}, "kept", "dropped_frames"}``.

    Raises:
        BadInputError: an episode has no frame manifest.
    """
    index = HashIndex()
    dropped: dict[str, list[int]] = {}
    kept = 0
    order = sorted(set(episode_ids))
    for ep in order:
        manifest = workspace.frames_manifest(ep)
        if not manifest.is_file():
            raise BadInputError(manifest, "frame manifest not found; extract this episode's frames first")
        own: list[str] = []
        dropped[ep] = []
        for row in fsio.read_jsonl(manifest):
            h = str(row.get("phash") or "")
            if h and index.near(h, max_distance):
                dropped[ep].append(int(row["frame_index"]))
                continue
            kept += 1
            if h:
                own.append(h)
        for h in own:  # after the episode: within-episode duplicates were settled at extraction
            index.add(h)
    n_dropped = sum(len(v) for v in dropped.values())
    return {
        "order": order,
        "max_distance": max_distance,
        "dropped": dropped,
        "kept": kept,
        "dropped_frames": n_dropped,
    }
