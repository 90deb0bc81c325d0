"""Benchmark inputs: H.264 episodes built from the sample series (PyAV + libx264).

Real episodes are H.264 (or HEVC) at 1080p; the sample series is MPEG-4 Part 2 at 640x360, so
the benchmarks re-encode it. A long episode is made of several differently seeded sample
series back to back, so its content does not repeat (a looped clip would be removed as
near-duplicates and leave layering and embedding almost nothing to do).
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
    frames: Iterable[object], dest: Path, width: int, height: int, fps: int = 24, limit: int | None = None
) -> int:
    """Encode av.VideoFrames (any size) to an H.264 mp4 at ``width`` x ``height``; returns the frame count."""
    import av

    tmp = dest.with_name(dest.name + ".part.mp4")
    n = 0
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "18", "tune": "animation"}
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


def _series(args: tuple[Path, int]) -> list[Path]:
    root, seed = args
    info = synthetic.generate_series(root / f"seed{seed:02d}", seed=seed, episodes=3, seconds=40.0)
    return sorted(Path(info.episodes_dir).glob("*.mp4"))


def sample_episode(dest: Path, seconds: float, width: int, height: int, fps: int = 24) -> Path:
    """One H.264 episode of ``seconds`` at ``width`` x ``height`` (reused if it exists)."""
    if dest.exists():
        return dest
    info = synthetic.generate_series(dest.parent / "src", seed=0, episodes=1, seconds=seconds)
    encode_h264(decoded([info.episodes[0]]), dest, width, height, fps)
    return dest


def long_episode(
    dest: Path, minutes: float, width: int, height: int, fps: int = 24, workers: int = 8
) -> Path:
    """An H.264 episode of ``minutes`` made of differently seeded 2-minute sample series.

    Reused if it exists. The sample series are rendered in ``workers`` processes.
    """
    if dest.exists():
        return dest
    total = int(minutes * 60 * fps)
    per_seed = 3 * 40 * fps
    seeds = list(range(1, -(-total // per_seed) + 1))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        sources = [p for paths in pool.map(_series, [(dest.parent / "src", s) for s in seeds]) for p in paths]
    t1 = time.perf_counter()
    n = encode_h264(decoded(sources), dest, width, height, fps, limit=total)
    print(
        f"generated {dest.name}: {n} frames from {len(seeds)} seeds "
        f"(render {t1 - t0:.0f} s, encode {time.perf_counter() - t1:.0f} s)",
        flush=True,
    )
    return dest
