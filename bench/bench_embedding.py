"""Embedding throughput: the offline descriptor, and CLIP from PNG files vs the bare model.

Timed, as users run it: ``get_embedder(cfg).embed(paths)`` over RGBA character layers saved
as PNG files (decode, composite on grey, open_clip resize/crop in the decode pool, uint8 to
the device, normalise + encode under bf16 autocast, L2-normalised float32 out). Per CLIP model:

* ``cold``: the first ``embed`` of a freshly built embedder in a process with no decode pool
  running. Building the embedder starts the pool while the model loads (as a fresh worker
  process does), so ``cold`` holds whatever start-up the load did not hide, plus the first
  device calls at this batch size.
* ``warm``: the same call again (pool and device warm): an embedding worker's steady state.
* ``input``: the input side alone: ``pixel_batches`` over all ``--n`` layers, each batch copied
  into a host tensor as ``embed`` does, no model. What the decode pool can feed a device.
* ``bare``: ``encode_image`` on a batch already on the device, same batch size and precision.
* ``pool_start_s``: a one-image call that has to start the pool itself (printed once).

CLIP models are built with random weights (``pretrained=None``); speed does not depend on them.
``--layers realistic`` (default) renders layers 50-630 px a side (mean 180 x 305) with a soft
matte edge, as a segmentation model leaves it, and video grain (about 2 bytes per pixel as
PNG, like crops of real frames); ``small`` is the earlier set of 30-250 px flat renders with
hard edges (about 2 KB files). Examples::

    python bench/bench_embedding.py --device cpu --n 300 --clip-n-cpu 64 --workers 2
    python bench/bench_embedding.py --device cuda --n 10000 --workers 14      # H100, 16 CPUs
    python bench/bench_embedding.py --device cuda --models ViT-L-14 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yokai_pipeline.config import EmbeddingConfig  # noqa: E402
from yokai_pipeline.embedding import get_embedder, shutdown_decode_pools  # noqa: E402


def make_layers(folder: Path, n: int, distinct: int = 400, realistic: bool = True) -> list[Path]:
    """``n`` PNG character layers; ``distinct`` rendered files, the rest hard links to them
    (the page cache serves both alike; rendering 20k crops would dominate the bench)."""
    from yokai_pipeline.fsio import save_image
    from yokai_pipeline.synthetic import CHARACTERS, render_character

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    base = []
    for i in range(min(n, distinct)):
        rgba = render_character(
            i % len(CHARACTERS),
            scale=float(rng.uniform(1.0, 5.0) if realistic else rng.uniform(0.6, 2.0)),
            facing=int(rng.choice([-1, 1])),
            pose=float(rng.uniform()),
        )
        if realistic:  # flat renders with hard edges decode and compress unlike real crops
            import cv2

            rgba[..., 3] = cv2.GaussianBlur(rgba[..., 3], (5, 5), 1.5)
            rgb = rgba[..., :3] + rng.normal(0, 2.0, rgba[..., :3].shape)
            rgba[..., :3] = np.clip(rgb, 0, 255).astype(np.uint8)
        base.append(save_image(folder / f"layer_{i:06d}.png", rgba))
    paths = list(base)
    for i in range(len(base), n):
        p = folder / f"layer_{i:06d}.png"
        os.link(base[i % len(base)], p)
        paths.append(p)
    return paths


def time_call(emb, paths: list[Path]) -> float:
    t0 = time.perf_counter()
    out = emb.embed(paths)
    seconds = time.perf_counter() - t0
    assert out.shape[0] == len(paths) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-3)
    return len(paths) / seconds


def time_offline(cfg: EmbeddingConfig, paths: list[Path], warmup: int) -> float:
    emb = get_embedder(cfg)
    emb.embed(paths[:warmup])
    return time_call(emb, paths)


def time_input(emb, paths: list[Path]) -> float:
    """The decode pool alone, each batch copied into a host tensor (pinned on CUDA) as embed does."""
    import torch

    on_cuda = emb.bundle.device.startswith("cuda")
    shape = (emb.cfg.batch_size, *emb.bundle.image_size, 3)
    host = emb._pinned(shape)[0] if on_cuda else torch.empty(shape, dtype=torch.uint8)
    n = 0
    t0 = time.perf_counter()
    with contextlib.closing(emb.pixel_batches(paths)) as batches:
        for _, pixels, _ in batches:
            host.numpy()[: len(pixels)] = pixels
            n += len(pixels)
    return n / (time.perf_counter() - t0)


def time_bare(emb, batch_size: int, n: int) -> float:
    """encode_image on a device-resident batch, bf16 autocast on CUDA (fp32 on CPU)."""
    import torch

    b = emb.bundle
    on_cuda = b.device.startswith("cuda")
    x = torch.randn(batch_size, 3, *b.image_size, device=b.device)
    steps = max(1, n // batch_size)

    def run(k: int) -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            for _ in range(k):
                torch.nn.functional.normalize(b.model.encode_image(x).float(), dim=-1)
        if on_cuda:
            torch.cuda.synchronize()

    run(2)
    t0 = time.perf_counter()
    run(steps)
    return steps * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--n", type=int, default=None, help="images per timed run (default 2000 CPU / 20000 CUDA)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: CPU count - 2)")
    ap.add_argument("--clip-n-cpu", type=int, default=64, help="images per CLIP embed run on CPU (slow)")
    ap.add_argument("--offline-n", type=int, default=2000, help="images per offline-descriptor run")
    ap.add_argument("--layers", choices=["realistic", "small"], default="realistic")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    on_cuda = device.startswith("cuda")
    n = args.n or (20000 if on_cuda else 2000)
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 2)
    batch = args.batch_size or (256 if on_cuda else 16)
    card = torch.cuda.get_device_name(device) if on_cuda else f"CPU x{os.cpu_count()}"
    console = Console(width=170)  # the table has 11 columns: do not let rich truncate them
    rows: list[dict] = []
    pool_start = None
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_layers(Path(tmp) / "layers", n, realistic=args.layers == "realistic")
        offline_paths = paths[: min(n, args.offline_n)]
        for w in sorted({1, workers}):
            ips = time_offline(EmbeddingConfig(backend="offline", num_workers=w), offline_paths, warmup=50)
            rows.append({"backend": "offline", "model": "-", "workers": w, "warm": round(ips, 1)})
            console.print(rows[-1])
        for model in args.models:
            clip_n = n if on_cuda else min(n, args.clip_n_cpu)
            cfg = EmbeddingConfig(
                backend="clip",
                model=model,
                pretrained=None,
                device=device,
                batch_size=batch,
                num_workers=workers,
            )
            shutdown_decode_pools()  # cold means cold: no pool left over from the previous model
            t0 = time.perf_counter()
            emb = get_embedder(cfg)
            build_s = time.perf_counter() - t0
            cold = time_call(emb, paths[:clip_n])
            warm = time_call(emb, paths[:clip_n])
            feed = time_input(emb, paths)
            bare = time_bare(emb, batch, clip_n)
            if pool_start is None and workers:
                shutdown_decode_pools()
                t0 = time.perf_counter()
                emb.embed(paths[:1])
                pool_start = time.perf_counter() - t0
            rows.append(
                {
                    "backend": "clip",
                    "model": model,
                    "workers": workers,
                    "batch": batch,
                    "build_s": round(build_s, 1),
                    "cold": round(cold, 1),
                    "warm": round(warm, 1),
                    "input": round(feed, 1),
                    "bare": round(bare, 1),
                    "cold/bare": round(cold / bare, 3),
                    "warm/bare": round(warm / bare, 3),
                }
            )
            console.print(rows[-1])
    t = Table(
        title=(
            f"Embedding images/s on {card} ({'bf16 autocast' if on_cuda else 'fp32'}), {args.layers} PNG layers: "
            f"CLIP embed on {n if on_cuda else min(n, args.clip_n_cpu)}, input side on {n}, "
            f"offline on {min(n, args.offline_n)}"
        )
    )
    cols = ["backend", "model", "workers", "batch", "build_s", "cold", "warm", "input", "bare"]
    cols += ["cold/bare", "warm/bare"]
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r.get(c, "-")) for c in cols))
    console.print(t)
    if pool_start is not None:
        console.print(
            f"decode pool start-up ({workers} workers) + one image: {pool_start:.2f} s, once per process"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": card, "n": n, "layers": args.layers, "pool_start_s": pool_start, "rows": rows},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
