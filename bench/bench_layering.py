"""Layering throughput (images/s): offline backend, and U^2-Net / U^2-NetP naive vs ours.

Usage:
    python bench/bench_layering.py                       # CPU: small counts
    python bench/bench_layering.py --frames 4096 --compile   # on a GPU
    python bench/bench_layering.py --models u2netp --batch-size 256

Frames are 640x360 frames of the generated sample series (cycled to ``--frames``).
The U2Net models have random weights (same cost as the official ones) saved to and loaded
from a safetensors file. Rows:

- ``naive model``: fp32, batch 1, NCHW, batch norms unfused, on 320x320 tensors already on
  the device (the usual reference loop; the issue's anchor is 69 images/s on an H100).
- ``ours model``: ``predict_masks`` on uint8 batches already on the device (normalise,
  bf16 autocast + channels_last + folded batch norms on CUDA, fp32 on CPU, min-max).
- ``ours masks``: decoded frames in host memory -> batched model (pinned-memory prefetch
  thread; on CUDA batches queued ahead, masks thresholded on the GPU and downloaded
  asynchronously) -> 1-bit mask PNGs written by ``--workers`` threads, a few masks per
  task: "decoded frames to written masks".
- ``ours stage``: ``segment_layers`` from frame PNGs on disk to every output (masks,
  RGBA character crops, inpainted backgrounds), with ``--workers`` worker processes cutting
  and writing the layers (and as many threads decoding frames for the model). The stage is
  warmed up on a few frames first (worker start-up, shapes), and that time is printed.
  ``--stage-threads`` adds the same stage with the work in threads (``worker_processes`` off).

``--compile`` adds the ``torch.compile`` variants (compile time is reported separately).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yokai_pipeline import layering, synthetic  # noqa: E402
from yokai_pipeline.config import LayeringConfig  # noqa: E402
from yokai_pipeline.fsio import atomic_write_bytes  # noqa: E402
from yokai_pipeline.workspace import Workspace  # noqa: E402

NO_FSYNC_ENV = "YOKAI_BENCH_NO_FSYNC"


def no_fsync() -> None:
    """Diagnostic: make os.fsync a no-op (what per-file fsync costs)."""
    os.fsync = lambda fd: None


if os.environ.get(NO_FSYNC_ENV):
    no_fsync()


def sample_frames(work: Path) -> list[np.ndarray]:
    """Decoded RGB frames of a short generated episode (one per video frame)."""
    info = synthetic.generate_series(work / "series", seed=0, episodes=1, seconds=8.0)
    cap = cv2.VideoCapture(str(info.episodes[0]))
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def write_frame_pngs(frames: list[np.ndarray], n: int, ws: Workspace, workers: int) -> list[dict]:
    """``n`` frame PNGs + manifest rows (frames cycled), as the frames stage writes them."""
    h, w = frames[0].shape[:2]
    rows = [
        {"episode": "bench.mp4", "episode_id": "bench", "frame_index": i, "timestamp": i / 24, "shot_id": 0,
         "phash": "0" * 16, "sharpness": 1.0, "width": w, "height": h,
         "path": f"episodes/bench/frames/bench_f{i:06d}.png"}
        for i in range(n)
    ]  # fmt: skip
    ws.abs("episodes/bench/frames").mkdir(parents=True, exist_ok=True)

    def save(i: int) -> None:
        cv2.imwrite(str(ws.abs(rows[i]["path"])), cv2.cvtColor(frames[i % len(frames)], cv2.COLOR_RGB2BGR))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(save, range(n)))
    return rows


def timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def bench_stage(rows: list[dict], work: Path, cfg: LayeringConfig, tag: str) -> float:
    """Seconds for segment_layers over all rows into a fresh layer tree (frames are shared).

    A warm-up call on a few frames first starts the worker processes (kept for the process,
    as in a long-lived GPU worker) and runs the model on the frame size.
    """
    ws = Workspace(work)
    shutil.rmtree(ws.layered_frames, ignore_errors=True)
    warm = rows[: min(len(rows), max(2 * cfg.num_workers, cfg.batch_size) + 1)]
    t = timed(layering.segment_layers, warm, ws, cfg)
    print(f"  [{tag}] warm-up ({len(warm)} frames, worker start-up): {t:.2f} s", flush=True)
    shutil.rmtree(ws.layered_frames, ignore_errors=True)
    t = timed(layering.segment_layers, rows, ws, cfg)
    n_layers = sum(1 for _ in (ws.layered_frames / "character" / "bench").glob("*.png"))
    print(f"  [{tag}] {len(rows)} frames -> {n_layers} character layers in {t:.2f} s", flush=True)
    return t


def bench_masks(
    seg: layering.U2NetSegmenter, frames: list[np.ndarray], n: int, out: Path, workers: int
) -> float:
    """Decoded frames in memory -> model -> 1-bit mask PNGs on disk; seconds.

    Masks come back thresholded (0/255, on the device); each batch is split into about
    ``workers`` write tasks.
    """
    out.mkdir(parents=True, exist_ok=True)

    def write(first: int, masks: np.ndarray) -> None:
        for j, m in enumerate(masks):
            atomic_write_bytes(out / f"m{first + j:06d}.png", layering._encode_png(m, True))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        items = ((i, frames[i % len(frames)]) for i in range(n))
        for pairs, masks in seg.predict_batches(items, binarize_above=127):
            per = -(-len(pairs) // workers)
            for s in range(0, len(pairs), per):
                pending.append(pool.submit(write, pairs[s][0], masks[s : s + per]))
            while len(pending) > 4 * workers:  # writers behind: hold the model back
                pending.popleft().result()
        for f in pending:
            f.result()
    return time.perf_counter() - t0


def bench_models(args, frames, rows, work: Path, results: list) -> None:
    import torch

    from yokai_pipeline.models import u2net

    device = u2net.resolve_device(args.device)
    cuda = device.startswith("cuda")
    n_naive = args.naive_frames or (256 if cuda else 2)
    n = args.frames
    for variant in args.models:
        torch.manual_seed(0)
        model = u2net.build_u2net(variant).eval()
        weights = u2net.save_u2net_safetensors(model, work / f"{variant}.safetensors")

        # naive: fp32, batch 1, NCHW, unfused, preprocessed tensors already on the device
        model = model.to(device)
        model.fused_only = True
        x = torch.randn(1, 3, 320, 320, device=device)
        with torch.inference_mode():
            for _ in range(3 if cuda else 1):
                model(x)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n_naive):
                model(x)
            sync(device)
        naive = n_naive / (time.perf_counter() - t0)
        results.append((variant, "naive model", "fp32, batch 1", n_naive, naive, 1.0))
        del model

        variants = [False, True] if (args.compile and cuda) else [False]
        if args.compile and cuda and args.compiled_only:
            variants = [True]
        for compiled in variants:
            u2net._cache.clear()
            label = "bf16 channels_last" if cuda else "fp32"
            label += f", batch {args.batch_size}" + (", compiled" if compiled else "")
            t0 = time.perf_counter()
            m = u2net.load_u2net(weights, variant, device=device, compile=compiled)
            batch = torch.from_numpy(np.stack([cv2.resize(f, (320, 320)) for f in frames[: args.batch_size]]))
            reps = max(1, -(-args.batch_size // len(frames)))
            batch = batch.repeat(reps, 1, 1, 1)[: args.batch_size].to(device)
            u2net.predict_masks(m, batch, resize_back=False)  # warm-up (and compilation)
            sync(device)
            if compiled:
                print(
                    f"  [{variant}] torch.compile + first batch: {time.perf_counter() - t0:.1f} s", flush=True
                )
            iters = max(1, n // args.batch_size)
            t0 = time.perf_counter()
            for _ in range(iters):
                u2net.predict_masks(m, batch, resize_back=False)
            sync(device)
            ours = iters * args.batch_size / (time.perf_counter() - t0)
            results.append((variant, "ours model", label, iters * args.batch_size, ours, ours / naive))

            # decoded frames -> written masks
            seg = layering.U2NetSegmenter(weights, variant, device, args.batch_size, compiled)
            bench_masks(
                seg, frames, args.batch_size, work / "warm", args.workers
            )  # warm-up (frame-size shapes)
            t = bench_masks(seg, frames, n, work / f"masks_{variant}_{compiled}", args.workers)
            results.append((variant, "ours masks", label, n, n / t, n / t / naive))

            cfg = LayeringConfig(
                backend=variant, weights=weights, device=device, batch_size=args.batch_size,
                num_workers=args.workers, compile=compiled,
            )  # fmt: skip
            for procs in [True, False] if args.stage_threads else [True]:
                cfg = cfg.model_copy(update={"worker_processes": procs})
                how = stage_workers(cfg, n)
                t = bench_stage(rows[:n], work / "ws", cfg, f"{variant} stage, {how}")
                results.append((variant, "ours stage", f"{label}, {how}", n, n / t, n / t / naive))


def stage_workers(cfg: LayeringConfig, n: int) -> str:
    """How segment_layers will run the per-frame work: "N processes" or "N threads"."""
    return f"{cfg.num_workers} {'processes' if layering._use_processes(cfg, n) else 'threads'}"


class Results(list):
    """Rows of the final table, each also printed as soon as it is measured."""

    def append(self, row: tuple) -> None:
        super().append(row)
        backend, measure, setting, n, rate, _ = row
        print(f"  {backend:7s} {measure:12s} {setting:45s} {n:6d} images {rate:10.1f} images/s", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--frames", type=int, default=None, help="frames per measurement (default 2048 on CUDA, 16 on CPU)"
    )
    ap.add_argument(
        "--naive-frames", type=int, default=None, help="frames for the naive loop (default 256 / 2)"
    )
    ap.add_argument(
        "--models", nargs="*", default=["u2netp", "u2net"], help="u2net and/or u2netp (none: offline only)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=None, help="U2Net batch (default 128 on CUDA, 4 on CPU)"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="stage: worker processes cutting/writing layers, and decode threads; masks: writer threads "
        "(default: CPU count)",
    )
    ap.add_argument(
        "--stage-threads", action="store_true", help="also measure the stage with its work in threads"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (CUDA)")
    ap.add_argument("--compiled-only", action="store_true", help="with --compile: skip the eager rows")
    ap.add_argument("--cv2-threads", type=int, default=None, help="cv2.setNumThreads (default: OpenCV's)")
    ap.add_argument(
        "--no-fsync", action="store_true", help="diagnostic: make os.fsync a no-op (cost of per-file fsync)"
    )
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.cv2_threads is not None:
        cv2.setNumThreads(args.cv2_threads)
    if args.no_fsync:
        # Through the environment so that the stage's worker processes, which import this
        # script as their __main__ module, skip it too.
        os.environ[NO_FSYNC_ENV] = "1"
        no_fsync()

    cuda = False
    try:
        import torch

        cuda = torch.cuda.is_available() and args.device != "cpu"
        device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "CPU"
        torch_version = torch.__version__
    except ImportError:
        args.models, device_name, torch_version = [], platform.processor() or "CPU", "-"
    args.frames = args.frames or (2048 if cuda else 16)
    args.batch_size = args.batch_size or (128 if cuda else 4)
    args.workers = args.workers or (os.cpu_count() or 2)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_layering_"))
    work.mkdir(parents=True, exist_ok=True)
    frames = sample_frames(work)
    n_off = args.frames if cuda else max(args.frames, 48)
    rows = write_frame_pngs(frames, max(args.frames, n_off), Workspace(work / "ws"), args.workers)
    size = f"{frames[0].shape[1]}x{frames[0].shape[0]}"
    print(f"{len(frames)} distinct {size} frames; device: {device_name}; torch {torch_version}; "
          f"{args.workers} workers; {os.cpu_count()} CPUs; cv2 threads {cv2.getNumThreads()}; "
          f"fsync {'off (diagnostic)' if args.no_fsync else 'on'}", flush=True)  # fmt: skip

    results = Results()
    seg = layering.OfflineSegmenter()
    t0 = time.perf_counter()
    for i in range(n_off):
        seg.segment(frames[i % len(frames)])
    results.append(
        ("offline", "masks only", "1 thread, in memory", n_off, n_off / (time.perf_counter() - t0), None)
    )
    for procs in [True, False] if args.stage_threads else [True]:
        cfg = LayeringConfig(num_workers=args.workers, worker_processes=procs)
        how = stage_workers(cfg, n_off)
        t = bench_stage(rows[:n_off], work / "ws", cfg, f"offline stage, {how}")
        results.append(("offline", "ours stage", f"{how}, all layers", n_off, n_off / t, None))

    if args.models:
        bench_models(args, frames, rows, work, results)

    print()
    print(f"Layering throughput, {frames[0].shape[1]}x{frames[0].shape[0]} frames, {device_name}, "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    print()
    print("| backend | measure | setting | images | images/s | x naive |")
    print("|---|---|---|---:|---:|---:|")
    for backend, measure, setting, n, rate, speedup in results:
        sp = f"{speedup:.1f}x" if speedup is not None else ""
        print(f"| {backend} | {measure} | {setting} | {n} | {rate:,.1f} | {sp} |")


if __name__ == "__main__":
    main()
