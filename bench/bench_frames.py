"""Frame-extraction throughput next to bare OpenCV decode of the same file.

Usage:
    python bench/bench_frames.py                      # a 640x360 sample episode
    python bench/bench_frames.py --size 1920x1080     # also a 1080p episode
    python bench/bench_frames.py --video my.mkv       # your own file(s)

Bare decode is ``cv2.VideoCapture.read()`` in a loop: the ceiling for any extractor that
looks at every frame. Extraction adds downscaling + HSV histograms (shot detection),
sharpness, buffering of candidates, perceptual hashes and PNG writes of the kept frames.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yokai_pipeline import frames, synthetic  # noqa: E402
from yokai_pipeline.config import FramesConfig  # noqa: E402
from yokai_pipeline.workspace import Workspace  # noqa: E402


def bare_decode(video: Path) -> tuple[int, float]:
    """Decode every frame, do nothing with it; returns (frames, seconds)."""
    cap = cv2.VideoCapture(str(video))
    t0 = time.perf_counter()
    n = 0
    while True:
        ok, _ = cap.read()
        if not ok:
            break
        n += 1
    dt = time.perf_counter() - t0
    cap.release()
    return n, dt


def bench_extract(video: Path, work: Path) -> tuple[dict, float]:
    ws = Workspace(work / f"ws_{video.stem}_{time.monotonic_ns()}")
    t0 = time.perf_counter()
    stats = frames.extract_frames(video, ws, FramesConfig())
    return stats, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the generated sample episodes")
    ap.add_argument("--size", action="append", default=[], help="extra generated frame size WxH (repeatable)")
    ap.add_argument(
        "--video", action="append", type=Path, default=[], help="benchmark this file too (repeatable)"
    )
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported")
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp folder)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="yokai-bench-")
    work = args.workdir or Path(tmp.name)
    videos: list[tuple[str, Path]] = []
    for size in ["640x360", *args.size]:
        w, h = (int(v) for v in size.lower().split("x"))
        info = synthetic.generate_series(
            work / f"series_{w}x{h}", seed=0, episodes=1, seconds=args.seconds, width=w, height=h
        )
        videos.append((f"sample {w}x{h}", info.episodes[0]))
    videos += [(v.name, v) for v in args.video]

    print(f"cpu cores: {os.cpu_count()}  opencv {cv2.__version__}  threads {cv2.getNumThreads()}")
    rows = []
    for label, video in videos:
        dec = min((bare_decode(video) for _ in range(args.repeat)), key=lambda r: r[1])
        ext_runs = [bench_extract(video, work) for _ in range(args.repeat)]
        stats, ext_s = min(ext_runs, key=lambda r: r[1])
        rows.append((label, dec[0], dec[0] / dec[1], stats["decoded"] / ext_s, stats["shots"], stats["kept"]))
    hdr = f"{'file':<22}{'frames':>8}{'decode fps':>12}{'extract fps':>13}{'ratio':>7}{'shots':>7}{'kept':>6}"
    print(hdr)
    print("-" * len(hdr))
    for label, n, dfps, efps, shots, kept in rows:
        print(f"{label:<22}{n:>8}{dfps:>12.1f}{efps:>13.1f}{efps / dfps:>7.2f}{shots:>7}{kept:>6}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
