"""Frame-extraction throughput next to bare decode of the same file.

Usage:
    python bench/bench_frames.py                      # 640x360 and 1920x1080 H.264 sample episodes
    python bench/bench_frames.py --size 3840x2160     # another generated size
    python bench/bench_frames.py --video my.mkv       # your own file(s)

Bare decode is the fastest loop that decodes every frame and does nothing with it, the ceiling
for any extractor that looks at every frame: PyAV with FFmpeg's frame threading (frames stay in
the decoder's YUV format), and, for reference, ``cv2.VideoCapture.read()`` (which also converts
every frame to BGR). The ratio is against the faster of the two. Extraction adds the per-frame
analysis (histograms, sharpness), candidate buffering, perceptual hashes and the PNG writes of
the kept frames, and hashes the file (cache key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.videos import sample_episode  # noqa: E402
from yokai_pipeline import frames  # noqa: E402
from yokai_pipeline.config import FramesConfig  # noqa: E402
from yokai_pipeline.workspace import Workspace  # noqa: E402


def bare_decode_cv2(video: Path) -> tuple[int, float]:
    """cv2.VideoCapture.read() in a loop; returns (frames, seconds)."""
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


def bare_decode_av(video: Path) -> tuple[int, float]:
    """PyAV decode of every frame with FFmpeg's threads; returns (frames, seconds)."""
    import av

    t0 = time.perf_counter()
    n = 0
    with av.open(str(video)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in c.decode(stream):
            n += 1
    return n, time.perf_counter() - t0


def bench_extract(video: Path, work: Path) -> tuple[dict, float]:
    ws = Workspace(work / f"ws_{video.stem}_{time.monotonic_ns()}")
    t0 = time.perf_counter()
    stats = frames.extract_frames(video, ws, FramesConfig())
    return stats, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=40.0, help="length of the generated sample episodes")
    ap.add_argument(
        "--size",
        action="append",
        default=None,
        help="generated frame size WxH (repeatable; default 640x360 and 1920x1080)",
    )
    ap.add_argument(
        "--video", action="append", type=Path, default=[], help="benchmark this file too (repeatable)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="yokai-bench-")
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    videos: list[tuple[str, Path]] = []
    for size in args.size or ["640x360", "1920x1080"]:
        w, h = (int(v) for v in size.lower().split("x"))
        path = sample_episode(work / f"sample_{w}x{h}_{args.seconds:g}s.mp4", args.seconds, w, h)
        videos.append((f"sample {w}x{h} h264", path))
    videos += [(v.name, v) for v in args.video]

    print(f"cpu cores: {os.cpu_count()}  opencv {cv2.__version__}", flush=True)
    rows = []
    for label, video in videos:
        dec_cv2 = min((bare_decode_cv2(video) for _ in range(args.repeat)), key=lambda r: r[1])
        dec_av = min((bare_decode_av(video) for _ in range(args.repeat)), key=lambda r: r[1])
        stats, ext_s = min((bench_extract(video, work) for _ in range(args.repeat)), key=lambda r: r[1])
        n = stats["decoded"]
        bare = max(dec_cv2[0] / dec_cv2[1], dec_av[0] / dec_av[1])
        rows.append(
            {
                "file": label,
                "frames": n,
                "bare_cv2_fps": round(dec_cv2[0] / dec_cv2[1], 1),
                "bare_pyav_fps": round(dec_av[0] / dec_av[1], 1),
                "extract_fps": round(n / ext_s, 1),
                "extract_over_bare": round(n / ext_s / bare, 3),
                "shots": stats["shots"],
                "kept": stats["kept"],
            }
        )
    hdr = f"{'file':<26}{'frames':>8}{'cv2 fps':>10}{'pyav fps':>10}{'extract fps':>13}{'ratio':>7}{'shots':>7}{'kept':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['file']:<26}{r['frames']:>8}{r['bare_cv2_fps']:>10.1f}{r['bare_pyav_fps']:>10.1f}"
            f"{r['extract_fps']:>13.1f}{r['extract_over_bare']:>7.2f}{r['shots']:>7}{r['kept']:>6}"
        )
    print("ratio = extraction frames/s / the faster bare decode (target >= 0.77, i.e. within 1.3x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
