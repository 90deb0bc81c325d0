"""Frame extraction: streaming decode, shot detection, sharp-frame picking, near-duplicate removal.

One pass over the video with ``cv2.VideoCapture`` (any container FFmpeg reads). Per frame we
keep only a downscaled analysis image; the full-resolution frames held in memory are a
bounded set of candidates of the (at most two) shots still open, so memory does not grow
with the episode length.

- Shots: a hard cut is a large HSV-histogram distance between consecutive downscaled frames.
  Shots shorter than ``min_shot_frames`` are merged into the previous shot (flashes, glitches).
- Sharp frames: each shot is split into ``frames_per_shot`` parts and the frame with the highest
  variance of the Laplacian near the middle of each part is kept, so the picks are spread out.
- Duplicates: a 64-bit perceptual hash (imagehash.phash, 16 hex digits) per picked frame; a frame
  within ``dedup_hamming`` bits of a frame kept earlier in this episode, or of a frame of an
  earlier episode (``reference_hashes``), is dropped. That is how a repeated opening is kept once.

Outputs (docs/data-formats.md): ``episodes/<id>/frames/*.png``, ``frames.jsonl`` and
``extract.json`` (statistics; also the completion marker used to skip a finished episode).
"""

from __future__ import annotations

import math
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
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

ALGORITHM_VERSION = 1
_SHARPNESS_WIDTH = 320  # sharpness is measured at this width at most: enough to rank blur, cheap at 4K
_MAX_PENDING_WRITES = 8  # PNG encodes overlap decoding in threads; bounded so frames don't pile up
_PROGRESS_EVERY = 48


def episode_id_for(video: str | Path) -> str:
    """The workspace id of an episode: its file stem made path-safe."""
    return fsio.safe_name(Path(video).stem, fallback="episode")


# --------------------------------------------------------------------------------------
# Small pure per-image functions


def decoded_frames(cap: Any, depth: int = 8) -> Any:
    """Yield ``(frame, position_msec)`` from a cv2.VideoCapture, decoding on a reader thread.

    OpenCV releases the GIL while decoding, so the reader overlaps decode with the caller's
    per-frame analysis; the bounded queue keeps at most ``depth`` frames in memory.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def reader() -> None:
        try:
            while not stop.is_set():
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                q.put((frame, cap.get(cv2.CAP_PROP_POS_MSEC)))
        except Exception as exc:  # handed to the consumer, raised there
            q.put(exc)
        finally:
            q.put(done)

    thread = threading.Thread(target=reader, name="frames-decode", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def analysis_image(frame: np.ndarray, width: int) -> np.ndarray:
    """Downscale a BGR frame to ``width`` px wide (aspect kept) for shot detection."""
    h, w = frame.shape[:2]
    if w <= width:
        return frame
    # bilinear, not INTER_AREA: 7x cheaper, and a histogram does not mind the aliasing
    return cv2.resize(frame, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_LINEAR)


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


def perceptual_hash(frame_bgr: np.ndarray) -> str:
    """64-bit DCT perceptual hash as 16 hex digits (imagehash.phash)."""
    import imagehash
    from PIL import Image

    small = cv2.resize(frame_bgr, (64, 64), interpolation=cv2.INTER_AREA)
    return str(imagehash.phash(Image.fromarray(cv2.cvtColor(small, cv2.COLOR_BGR2RGB))))


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
    frame: np.ndarray  # full-resolution BGR


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
            # no copy: VideoCapture.read() returns a fresh array for every frame
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


def _open_video(video: Path) -> cv2.VideoCapture:
    if not video.exists():
        raise BadInputError(video, "file does not exist")
    if not video.is_file():
        raise BadInputError(video, "not a regular file")
    if video.stat().st_size == 0:
        raise BadInputError(video, "file is empty (0 bytes)")
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        cap.release()
        raise BadInputError(
            video, "not a readable video (FFmpeg via OpenCV cannot open it; corrupt or not a video)"
        )
    return cap


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
    cap = _open_video(video)
    try:
        sha = fsio.file_sha256(video)
        key = _config_key(cfg, reference_hashes)
        if stats_path.exists() and manifest.exists():
            try:
                old = fsio.read_json(stats_path)
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict) and old.get("video_sha256") == sha and old.get("config_hash") == key:
                cap.release()
                return {**old, "skipped": True}
        frames_dir = ep_dir / "frames"
        if frames_dir.exists():  # outputs of another config or a killed run
            shutil.rmtree(frames_dir)
        stats_path.unlink(missing_ok=True)
        rows, stats = _scan(
            video, cap, workspace, episode_id, frames_dir, cfg, list(reference_hashes), progress
        )
    finally:
        cap.release()
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


def _scan(
    video: Path,
    cap: cv2.VideoCapture,
    workspace: Workspace,
    episode_id: str,
    frames_dir: Path,
    cfg: FramesConfig,
    references: list[str],
    progress: Callable[[int, int], None] | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        fps = 0.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    total = max(total, 0)
    max_bins = max(6, 3 * cfg.frames_per_shot)
    kept_rows: list[dict[str, Any]] = []
    kept_hashes = HashIndex()
    reference_index = HashIndex(references)
    counters = {"candidates": 0, "dropped_within": 0, "dropped_cross": 0}
    shot_starts: list[int] = []
    size: tuple[int, int] | None = None

    def finalise(shot: _Shot) -> None:
        shot_id = len(shot_starts)
        shot_starts.append(shot.start)
        for cand in shot.pick(cfg.frames_per_shot):
            counters["candidates"] += 1
            h = perceptual_hash(cand.frame)
            if reference_index.near(h, cfg.dedup_hamming):
                counters["dropped_cross"] += 1
                continue
            if kept_hashes.near(h, cfg.dedup_hamming):
                counters["dropped_within"] += 1
                continue
            kept_hashes.add(h)
            row, frame = _frame_row(workspace, video, episode_id, frames_dir, cand, shot_id, h, cfg.max_side)
            kept_rows.append(row)
            pending.append(writer.submit(fsio.save_image, workspace.abs(row["path"]), frame))
            while len(pending) > _MAX_PENDING_WRITES:
                pending.popleft().result()

    writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="frames-png")
    pending: deque[Future] = deque()
    try:
        decoded = 0
        prev_hist: np.ndarray | None = None
        last_ts = -1.0
        closed: _Shot | None = None  # previous shot, kept open until the current one is long enough
        current: _Shot | None = None
        for frame, pos_msec in decoded_frames(cap):
            if frame.ndim == 2:
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            elif frame.shape[2] == 4:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
            if size is None:
                size = (frame.shape[1], frame.shape[0])
            idx = decoded
            decoded += 1
            ts = pos_msec / 1000.0
            if not math.isfinite(ts) or ts < 0 or (ts <= last_ts and idx > 0):
                # containers without timestamps: fall back to the nominal rate
                ts = idx / fps if fps else float(idx)
            last_ts = ts
            # one resize of the full frame feeds both measures (the full-size resize is the costly one)
            base = analysis_image(frame, max(cfg.analysis_width, _SHARPNESS_WIDTH))
            hist = colour_histogram(analysis_image(base, cfg.analysis_width))
            cut = prev_hist is not None and histogram_distance(prev_hist, hist) >= cfg.shot_threshold
            if current is None:
                current = _Shot(start=idx)
            elif cut:
                if idx - current.start < cfg.min_shot_frames:
                    if closed is not None:  # a flash: merge it into the previous shot
                        current.end = idx
                        closed.absorb(current, max_bins)
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
                    current.last_hist = prev_hist
                    if closed is not None:
                        finalise(closed)
                    closed, current = current, _Shot(start=idx)
            elif closed is not None and idx - current.start + 1 >= cfg.min_shot_frames:
                finalise(closed)
                closed = None
            prev_hist = hist
            current.offer(
                _Candidate(idx, ts, sharpness(analysis_image(base, _SHARPNESS_WIDTH)), frame), max_bins
            )
            if progress is not None and decoded % _PROGRESS_EVERY == 0:
                progress(decoded, max(total, decoded))
        if decoded == 0:
            raise BadInputError(
                video, "no video frames could be decoded (audio-only, empty stream or corrupt)"
            )
        if total > 0 and decoded < 0.9 * total:
            raise BadInputError(video, f"truncated or corrupt: decoded {decoded} of {total} frames")
        assert current is not None
        current.end = decoded
        if closed is not None:
            if current.end - current.start < cfg.min_shot_frames:
                closed.absorb(current, max_bins)
                finalise(closed)
            else:
                finalise(closed)
                finalise(current)
        else:
            finalise(current)
        if progress is not None:
            progress(decoded, decoded)
        while pending:
            pending.popleft().result()  # a failed write fails the episode
    finally:
        writer.shutdown(wait=True)
    assert size is not None
    stats = {
        "decoded": decoded,
        "fps": fps,
        "width": size[0],
        "height": size[1],
        "shots": len(shot_starts),
        "shot_starts": shot_starts,
        "kept": len(kept_rows),
        **counters,
    }
    return kept_rows, stats


def _frame_row(
    workspace: Workspace,
    video: Path,
    episode_id: str,
    frames_dir: Path,
    cand: _Candidate,
    shot_id: int,
    phash: str,
    max_side: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """The manifest row of a kept frame and the RGB image to write at its path."""
    frame = cand.frame
    h, w = frame.shape[:2]
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        frame = cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        h, w = frame.shape[:2]
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
    return row, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def read_frame_hashes(manifest_path: str | Path) -> list[str]:
    """Perceptual hashes of the frames listed in a ``frames.jsonl`` manifest."""
    return [str(r["phash"]) for r in fsio.read_jsonl(manifest_path) if r.get("phash")]
