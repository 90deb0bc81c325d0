"""Captioning throughput: BLIP-2 (random weights, real architecture) and the offline captioner.

What is timed, per batch size, is the whole stage as users run it: ``caption_folder`` over
PNG files on disk (decode + composite + preprocess on CPU threads, overlapping generation;
caption files written), against the bare model (``generate`` on inputs already on the
device, the same prompt and token count). Generation is forced to exactly
``--new-tokens`` tokens (random weights never stop early, real ones do).

On CUDA the model is BLIP-2 opt-2.7b sized (ViT-g, 12-layer Q-Former, OPT-2.7b; bf16),
built from configs with random weights; on CPU a tiny one. Examples::

    python bench/bench_captioning.py                       # CPU: tiny BLIP-2 + offline
    python bench/bench_captioning.py --device cuda         # H100: opt-2.7b, batch 8/32/64
    python bench/bench_captioning.py --device cuda --batch-sizes 64 128 --modes compiled
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yokai_pipeline.captioning import PROMPTS, Blip2Captioner, caption_folder  # noqa: E402
from yokai_pipeline.config import CaptionConfig  # noqa: E402


def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` RGBA character layers (the synthetic series' characters) as PNG files."""
    from PIL import Image, ImageDraw

    try:
        from yokai_pipeline.synthetic import CHARACTERS, render_character
    except ImportError:  # no OpenCV on this machine: plain drawn figures of similar size
        CHARACTERS, render_character = None, None
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        if render_character is not None:
            c = CHARACTERS[i % len(CHARACTERS)]
            a = render_character(
                c.id, scale=1.5 + (i % 5) * 0.3, facing=1 if i % 2 else -1, pose=(i % 11) / 11
            )
            im = Image.fromarray(a, "RGBA")
        else:
            w, h = (int(v) for v in rng.integers(120, 260, 2))
            im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
            ImageDraw.Draw(im).ellipse(
                (4, 4, w - 4, h - 4),
                fill=tuple(int(v) for v in rng.integers(0, 255, 3)) + (255,),
                outline=(0, 0, 0, 255),
                width=3,
            )
        p = folder / f"img{i:05d}.png"
        im.save(p, compress_level=1)
        paths.append(p)
    return paths


def clear_captions(folder: Path) -> None:
    for t in folder.glob("*.txt"):
        t.unlink()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bench_bare(cap: Blip2Captioner, images: list, bs: int, reps: int, device: str) -> float:
    """Images/s of the model alone: ``generate`` on pixel values and tokens already on the device."""
    from yokai_pipeline.captioning import composite_on_white
    from yokai_pipeline.models.blip2 import generate_captions, preprocess

    inputs = preprocess(cap.bundle, [composite_on_white(im) for im in images[:bs]], [PROMPTS["yokai"]] * bs)
    inputs = {k: v.to(cap.bundle.device) for k, v in inputs.items()}

    def run() -> None:
        generate_captions(
            cap.bundle,
            inputs,
            max_new_tokens=cap.max_new_tokens,
            min_new_tokens=cap.min_new_tokens,
            static_cache=cap.static,
        )

    run()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    sync(device)
    return reps * bs / (time.perf_counter() - t0)


def bench_stage(folder: Path, cfg: CaptionConfig, captioner) -> dict:
    clear_captions(folder)
    res = caption_folder(folder, cfg, trigger="char000", char_type="yokai", captioner=captioner)
    assert res["captioned"] == res["images"] and not res["failed"], res["failed"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--preset", default=None, help="tiny or opt-2.7b (default: opt-2.7b on CUDA, tiny on CPU)"
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--batches", type=int, default=4, help="batches per stage measurement")
    ap.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=["eager", "compiled"],
        help="eager: dynamic KV cache; compiled: static KV cache + compiled decode step (CUDA only; "
        "default: both on CUDA, eager on CPU)",
    )
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument(
        "--cpu-preprocess", action="store_true", help="resize/normalise on CPU threads, not the GPU"
    )
    ap.add_argument(
        "--ragged", action="store_true", help="leave the last batch half full (as a folder's last batch is)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()

    import torch

    from yokai_pipeline.models.blip2 import build_random_blip2

    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    args.modes = args.modes or (["eager", "compiled"] if device.startswith("cuda") else ["eager"])
    preset = args.preset or ("opt-2.7b" if device.startswith("cuda") else "tiny")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    card = (
        torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_caption_"))
    rows: list[dict] = []
    try:
        n_max = max(args.batch_sizes) * args.batches
        paths = make_images(tmp / "images", n_max)
        from PIL import Image

        pil = [Image.open(p).convert("RGBA") for p in paths[: max(args.batch_sizes)]]

        t0 = time.perf_counter()
        bundle = build_random_blip2(preset, device=device)
        build_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in bundle.model.parameters())
        print(
            f"BLIP-2 {preset}: {n_params / 1e9:.2f} B params, {bundle.dtype}, "
            f"built in {build_s:.1f} s on {card}"
        )
        for mode in args.modes:
            for bs in args.batch_sizes:
                cap = Blip2Captioner(
                    "random",
                    device,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    compile=mode == "compiled",
                    batch_size=bs,
                    device_preprocess=False if args.cpu_preprocess else None,
                    bundle=bundle,
                )
                n = bs * args.batches - (bs // 2 if args.ragged else 0)
                folder = tmp / f"{mode}_bs{bs}"
                folder.mkdir()
                for p in paths[:n]:
                    shutil.copyfile(p, folder / p.name)
                cfg = CaptionConfig(
                    backend="blip2", device=device, batch_size=bs, max_new_tokens=args.new_tokens
                )
                first = bench_stage(folder, cfg, cap)  # warm-up: allocator, kernels, compile
                bare = bench_bare(cap, pil, bs, reps=max(2, args.batches // 2), device=device)
                res = bench_stage(folder, cfg, cap)
                rows.append(
                    {
                        "captioner": f"blip2 {preset} {mode}"
                        + (" (GPU preprocess)" if cap.device_preprocess else ""),
                        "batch": bs,
                        "images": n,
                        "stage_img_s": res["images_per_s"],
                        "bare_img_s": round(bare, 2),
                        "first_run_s": first["seconds"],
                        "stage_seconds": res["seconds"],
                        "timing": res.get("timing"),
                        "new_tokens": args.new_tokens,
                    }
                )
                print(
                    f"  {mode:8s} batch {bs:4d}: stage {res['images_per_s']:8.2f} img/s   "
                    f"bare generate {bare:8.2f} img/s   first run {first['seconds']:.1f} s   "
                    f"[{res['seconds']:.2f} s = wait input {res['timing']['wait_input_s']:.2f} + model "
                    f"{res['timing']['model_s']:.2f} + last writes {res['timing']['write_tail_s']:.2f} + rest]"
                )
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        cap = None
        del cap, bundle
        if not args.skip_offline:
            folder = tmp / "offline"
            folder.mkdir()
            for p in paths:
                shutil.copyfile(p, folder / p.name)
            cfg = CaptionConfig(backend="offline", batch_size=32)
            res = bench_stage(folder, cfg, None)
            rows.append(
                {
                    "captioner": "offline",
                    "batch": 32,
                    "images": len(paths),
                    "stage_img_s": res["images_per_s"],
                    "bare_img_s": None,
                    "first_run_s": None,
                    "new_tokens": None,
                }
            )
            print(f"  offline   : stage {res['images_per_s']:8.2f} img/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(
        "| captioner | batch | images | stage img/s (PNG on disk -> .txt) | bare generate img/s "
        "| first run s | card |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        bare = "-" if r["bare_img_s"] is None else f"{r['bare_img_s']:.2f}"
        first = "-" if r["first_run_s"] is None else f"{r['first_run_s']:.1f}"
        print(
            f"| {r['captioner']} | {r['batch']} | {r['images']} | {r['stage_img_s']:.2f} | {bare} "
            f"| {first} | {card} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"card": card, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
