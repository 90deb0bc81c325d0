"""Benchmark inputs: H.264 episodes built from the sample series (PyAV + libx264).

Real episodes are H.264 (or HEVC) at 1080p; the sample series is MPEG-4 Part 2 at 640x360, so
the benchmarks re-encode it. A long episode is made of several differently seeded 2-minute
sample series, encoded in parallel and then repeated (packets copied, not re-encoded) up to
the length asked for. The repeats are removed as near-duplicates by frame extraction, so the
frames kept are those of the distinct part: with 4 distinct series, about what a real
22-minute episode of ~350 shots yields.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yokai_pipeline import synthetic  # noqa: E402


def decoded(paths: Iterable[Path]) -> Iterator[object]:
    """Every decoded av.VideoFrame of ``paths`` in order."""
    import av

    for path in paths:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            yield from c.decode(stream)


def encode_h264(
    frames: Iterable[object],
    dest: Path,
    width: int,
    height: int,
    fps: int = 24,
    limit: int | None = None,
    preset: str = "veryfast",
) -> int:
    """Encode av.VideoFrames (any size) to an H.264 mp4 at ``width`` x ``height``; returns the frame count."""
    import av

    tmp = dest.with_name(dest.name + ".part.mp4")
    n = 0
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": preset, "crf": "18", "tune": "animation"}
        stream.thread_type = "AUTO"
        for frame in frames:
            if limit is not None and n >= limit:
                break
            f = frame.reformat(width=width, height=height, format="yuv420p")
            f.pts, f.time_base = n, Fraction(1, fps)
            for packet in stream.encode(f):
                out.mux(packet)
            n += 1
        for packet in stream.encode(None):
            out.mux(packet)
    tmp.replace(dest)
    return n


def sample_episode(dest: Path, seconds: float, width: int, height: int, fps: int = 24) -> Path:
    """One H.264 episode of ``seconds`` at ``width`` x ``height`` (reused if it exists)."""
    if dest.exists():
        return dest
    info = synthetic.generate_series(dest.parent / "src", seed=0, episodes=1, seconds=seconds)
    encode_h264(decoded([info.episodes[0]]), dest, width, height, fps)
    return dest


def _encode_series(args: tuple[Path, int, int, int, int]) -> Path:
    root, seed, width, height, fps = args
    info = synthetic.generate_series(root / f"seed{seed:02d}", seed=seed, episodes=3, seconds=40.0)
    dest = root / f"seed{seed:02d}_{width}x{height}.mp4"
    if not dest.exists():
        sources = sorted(Path(info.episodes_dir).glob("*.mp4"))
        encode_h264(decoded(sources), dest, width, height, fps, preset="superfast")
    return dest


def concat_repeated(segments: list[Path], dest: Path, total_frames: int) -> int:
    """Copy the packets of ``segments`` (same encoder settings) round-robin into one mp4 of ``total_frames``."""
    import av

    tmp = dest.with_name(dest.name + ".part.mp4")
    n = 0
    with av.open(str(tmp), "w") as out:
        with av.open(str(segments[0])) as first:
            ostream = out.add_stream_from_template(first.streams.video[0])
        offset = 0
        k = 0
        while n < total_frames:
            with av.open(str(segments[k % len(segments)])) as src:
                istream = src.streams.video[0]
                end = offset
                for packet in src.demux(istream):
                    if packet.dts is None or n >= total_frames:
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    end = max(end, packet.pts + (packet.duration or 0))
                    packet.stream = ostream
                    out.mux(packet)
                    n += 1
                offset = end
            k += 1
    tmp.replace(dest)
    return n


def long_episode(
    dest: Path, minutes: float, width: int, height: int, fps: int = 24, distinct: int = 4, workers: int = 4
) -> Path:
    """An H.264 episode of ``minutes``: ``distinct`` 2-minute sample series, repeated to length.

    Reused if it exists. The series are rendered and encoded in ``workers`` processes.
    """
    if dest.exists():
        return dest
    total = int(minutes * 60 * fps)
    t0 = time.perf_counter()
    jobs = [(dest.parent / "src", seed, width, height, fps) for seed in range(1, distinct + 1)]
    with ProcessPoolExecutor(workers) as pool:
        segments = list(pool.map(_encode_series, jobs))
    t1 = time.perf_counter()
    n = concat_repeated(segments, dest, total)
    print(
        f"generated {dest.name}: {n} frames, {distinct} distinct 2-minute series repeated "
        f"(render + encode {t1 - t0:.0f} s, concatenate {time.perf_counter() - t1:.0f} s)",
        flush=True,
    )
    return dest
