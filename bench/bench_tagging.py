"""WD14 tagging throughput: PNG files on disk through the tagger vs the bare model on device tensors.

Timed, as users run it: ``Wd14Tagger(folder).predict(paths)`` over RGBA layers saved as PNG
files (decode in the decode pool, composite on white, pad square, bicubic resize to 448, uint8
to the device through pinned memory, normalise + BGR + forward under bf16 autocast, sigmoid,
float32 probabilities back on the host). ``bare`` is the model's forward on a batch already on
the device, same batch size and precision. The goal: tagger >= 90 % of bare; wd-eva02-large
>= 500 images/s on one GPU.

The models are SmilingWolf's v3 architectures at their published sizes (10,861 tags, 448 px)
with random weights (speed does not depend on them), written to a temporary folder as the
timm export (``config.json`` + ``model.safetensors`` + ``selected_tags.csv``) and loaded through
:func:`yokai_pipeline.models.wd14.load_wd14`, so the bench times the loading path users take.

Needs torch, timm, safetensors, Pillow and numpy only (no prefect, no pydantic). Examples::

    python bench/bench_tagging.py --device cuda --n 8192 --workers 14          # one H200, 16 CPUs
    python bench/bench_tagging.py --device cuda --models wd-eva02-large-tagger-v3 --batch-size 128
    python bench/bench_tagging.py --device cpu --n 64 --batch-size 8 --models wd-vit-tagger-v3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_TAGS = 10861  # selected_tags.csv of the v3 taggers: 8,106 general + 2,751 character + 4 rating
SIZE = 448
#: The v3 architectures as their config.json describe them (timm names and model_args).
ARCHS = {
    "wd-vit-tagger-v3": (
        "vit_base_patch16_224",
        {"img_size": SIZE, "class_token": False, "global_pool": "avg", "fc_norm": False},
    ),
    "wd-swinv2-tagger-v3": ("swinv2_base_window8_256", {"img_size": SIZE, "window_size": 14}),
    "wd-eva02-large-tagger-v3": ("eva02_large_patch14_448", {"img_size": SIZE}),
}


def make_layers(folder: Path, n: int, distinct: int = 256) -> list[Path]:
    """``n`` PNG character layers (100-600 px a side, soft alpha, grain); ``distinct`` files, the rest
    hard links to them (the page cache serves both alike)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    base = []
    for i in range(min(n, distinct)):
        w, h = int(rng.integers(100, 400)), int(rng.integers(150, 600))
        im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
            x1, y1 = x0 + rng.integers(w // 4, w // 2), y0 + rng.integers(h // 4, h // 2)
            d.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)) + (255,),
                      outline=(20, 20, 20, 255), width=2)  # fmt: skip
        arr = np.asarray(im.filter(ImageFilter.GaussianBlur(0.8))).copy()
        arr[..., :3] = np.clip(arr[..., :3] + rng.normal(0, 2.0, arr[..., :3].shape), 0, 255).astype(np.uint8)
        p = folder / f"layer_{i:06d}.png"
        Image.fromarray(arr, "RGBA").save(p)
        base.append(p)
    paths = list(base)
    for i in range(len(base), n):
        p = folder / f"layer_{i:06d}.png"
        if not p.exists():
            os.link(base[i % len(base)], p)
        paths.append(p)
    return paths


def write_tagger(folder: Path, name: str) -> Path:
    """A random-weight timm export of one v3 architecture, as the hub repo lays it out."""
    import timm
    from safetensors.torch import save_file

    arch, args = ARCHS[name]
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    model = timm.create_model(arch, pretrained=False, num_classes=N_TAGS, **args)
    pcfg = {"input_size": [3, SIZE, SIZE], "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": N_TAGS}  # fmt: skip
    (out / "config.json").write_text(
        json.dumps({"architecture": arch, "num_classes": N_TAGS, "model_args": args, "pretrained_cfg": pcfg})
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    with open(out / "selected_tags.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["tag_id", "name", "category", "count"])
        for i in range(N_TAGS):
            w.writerow([i, f"tag_{i}", 9 if i < 4 else (4 if i >= 8110 else 0), 1000])
    return out


def time_bare(bundle, batch_size: int, n: int) -> float:
    """Forward + sigmoid on a device-resident batch, bf16 autocast on CUDA."""
    import torch

    on_cuda = bundle.device.startswith("cuda")
    x = torch.randn(batch_size, 3, *bundle.size, device=bundle.device)
    steps = max(1, n // batch_size)

    def run(k: int) -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            for _ in range(k):
                torch.sigmoid(bundle.model(x).float())
        if on_cuda:
            torch.cuda.synchronize()

    run(2)
    t0 = time.perf_counter()
    run(steps)
    return steps * batch_size / (time.perf_counter() - t0)


def time_tagger(tagger, paths: list[Path]) -> float:
    t0 = time.perf_counter()
    probs = tagger.predict(paths)
    seconds = time.perf_counter() - t0
    assert probs.shape == (len(paths), N_TAGS) and np.isfinite(probs).all()
    return len(paths) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192, help="images per timed run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["wd-vit-tagger-v3", "wd-eva02-large-tagger-v3"],
                    choices=sorted(ARCHS))  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 4) - 2), help="decode processes")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where PNGs and weights go (default: a temp dir)"
    )
    args = ap.parse_args()

    import torch

    from yokai_pipeline.models.wd14 import Wd14Tagger, load_wd14
    from yokai_pipeline.runtime import shutdown_decode_pools

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tagging_"))
    paths = make_layers(work / "layers", args.n)
    print(f"{len(paths)} PNG layers in {work / 'layers'}; {args.workers} decode workers", flush=True)
    for name in args.models:
        folder = write_tagger(work / "models", name)
        t0 = time.perf_counter()
        bundle = load_wd14(folder, args.device)
        load_s = time.perf_counter() - t0
        tagger = Wd14Tagger(folder, args.device, batch_size=args.batch_size, num_workers=args.workers)
        tagger.predict(paths[: args.batch_size * 4])  # warm: pool started, kernels chosen
        files = time_tagger(tagger, paths)
        bare = time_bare(bundle, args.batch_size, min(args.n, 4096))
        row = {
            "model": name,
            "device": torch.cuda.get_device_name() if bundle.device.startswith("cuda") else "cpu",
            "batch_size": args.batch_size,
            "workers": args.workers,
            "n": len(paths),
            "load_s": round(load_s, 2),
            "files_images_per_s": round(files, 1),
            "bare_images_per_s": round(bare, 1),
            "ratio": round(files / bare, 3),
        }
        print(json.dumps(row), flush=True)
        del tagger, bundle
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    shutdown_decode_pools()


if __name__ == "__main__":
    main()
