"""Embedding throughput: the offline descriptor, and CLIP from PNG files vs the bare model.

Timed, as users run it: ``get_embedder(cfg).embed(paths)`` over RGBA character layers saved
as PNG files (decode, composite on grey, open_clip resize/crop on CPU workers, uint8 to the
device, normalise + encode under bf16 autocast, L2-normalised float32 out). The baseline is
the bare model: ``encode_image`` on a batch already on the device, same batch size and
precision. CLIP models are built with random weights (``pretrained=None``); speed does not
depend on the weights. Examples::

    python bench/bench_embedding.py                                  # CPU: offline + small CLIP run
    python bench/bench_embedding.py --device cuda --n 20000 --workers 14   # H100
    python bench/bench_embedding.py --device cuda --models ViT-L-14 --batch-size 256
"""

from __future__ import annotations

import argparse
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
from yokai_pipeline.embedding import get_embedder  # noqa: E402


def make_layers(folder: Path, n: int, distinct: int = 400) -> list[Path]:
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
            scale=float(rng.uniform(0.6, 2.0)),
            facing=int(rng.choice([-1, 1])),
            pose=float(rng.uniform()),
        )
        base.append(save_image(folder / f"layer_{i:06d}.png", rgba))
    paths = list(base)
    for i in range(len(base), n):
        p = folder / f"layer_{i:06d}.png"
        os.link(base[i % len(base)], p)
        paths.append(p)
    return paths


def time_embed(cfg: EmbeddingConfig, paths: list[Path], warmup: int) -> float:
    emb = get_embedder(cfg)
    emb.embed(paths[:warmup])
    t0 = time.perf_counter()
    out = emb.embed(paths)
    seconds = time.perf_counter() - t0
    assert out.shape[0] == len(paths) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-3)
    return len(paths) / seconds


def time_bare(cfg: EmbeddingConfig, n: int) -> float:
    """encode_image on a device-resident batch, bf16 autocast on CUDA (fp32 on CPU)."""
    import torch

    emb = get_embedder(cfg)
    b = emb.bundle
    on_cuda = b.device.startswith("cuda")
    x = torch.randn(cfg.batch_size, 3, *b.image_size, device=b.device)
    steps = max(1, n // cfg.batch_size)

    def run(k: int) -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            for _ in range(k):
                torch.nn.functional.normalize(b.model.encode_image(x).float(), dim=-1)
        if on_cuda:
            torch.cuda.synchronize()

    run(2)
    t0 = time.perf_counter()
    run(steps)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--n", type=int, default=None, help="images per timed run (default 2000 CPU / 20000 CUDA)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: CPU count - 2)")
    ap.add_argument("--clip-n-cpu", type=int, default=64, help="images per CLIP run on CPU (slow)")
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
    console = Console()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_layers(Path(tmp) / "layers", n)
        for w in sorted({1, workers}):
            ips = time_embed(EmbeddingConfig(backend="offline", num_workers=w), paths, warmup=50)
            rows.append(
                {"backend": "offline", "model": "-", "workers": w, "batch": "-", "from_disk": round(ips, 1)}
            )
            console.print(rows[-1])
        for model in args.models:
            clip_n = n if on_cuda else args.clip_n_cpu
            cfg = EmbeddingConfig(
                backend="clip",
                model=model,
                pretrained=None,
                device=device,
                batch_size=batch,
                num_workers=workers,
            )
            disk = time_embed(cfg, paths[:clip_n], warmup=min(clip_n, 2 * batch))
            bare = time_bare(cfg, clip_n)
            rows.append(
                {
                    "backend": "clip",
                    "model": model,
                    "workers": workers,
                    "batch": batch,
                    "from_disk": round(disk, 1),
                    "bare_model": round(bare, 1),
                    "ratio": round(disk / bare, 3),
                }
            )
            console.print(rows[-1])
    t = Table(
        title=f"Embedding images/s on {card} ({'bf16 autocast' if on_cuda else 'fp32'}), {n} PNG layers"
    )
    cols = ["backend", "model", "workers", "batch", "from_disk", "bare_model", "ratio"]
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r.get(c, "-")) for c in cols))
    console.print(t)
    if args.json:
        args.json.write_text(json.dumps({"device": card, "n": n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
