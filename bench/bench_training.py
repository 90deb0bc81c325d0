"""Benchmark of the built-in LoRA trainer: steps/s and peak GPU memory.

On CUDA: an SD-1.5-sized UNet (diffusers' default UNet2DConditionModel config: block_out_channels
(320, 640, 1280, 1280), cross_attention_dim 768), the SD VAE and a CLIP-L-sized text encoder, all
with random weights (nothing downloaded), LoRA dim 32 / alpha 16 on UNet attention and the text
encoder, 512x512 images (64x64 latents), batch 4, bf16 autocast, gradient checkpointing; the
real trainer (train_lora_with_model) runs on a generated kohya dataset. On CPU: the tiny model
at 32x32 so the path can be checked anywhere.

    python bench/bench_training.py                  # CUDA if available, else the tiny CPU pass
    python bench/bench_training.py --device cpu --steps 6
    python bench/bench_training.py --steps 60 --warmup 10 --batch 4 --cache-latents

Prints one JSON line: device, steps/s (after warm-up), images/s, peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tomli_w
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yokai_pipeline import training  # noqa: E402


def write_dataset(
    root: Path, *, n_images: int, resolution: int, batch: int, repeats: int, args: dict
) -> Path:
    img_dir = root / "data" / f"{repeats}_char000"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        arr = rng.integers(0, 255, (resolution, resolution, 4), dtype=np.uint8)
        arr[..., 3] = 0
        m = resolution // 8
        arr[m:-m, m:-m, 3] = 255
        Image.fromarray(arr, "RGBA").save(img_dir / f"img_{i:03d}.png")
        (img_dir / f"img_{i:03d}.txt").write_text(f"char000, pose {i}, red hat, smiling\n", encoding="utf-8")
    ds = {
        "general": {"caption_extension": ".txt", "shuffle_caption": True, "keep_tokens": 1},
        "datasets": [
            {
                "resolution": resolution,
                "batch_size": batch,
                "subsets": [{"image_dir": str(img_dir), "num_repeats": repeats, "alpha_mask": True}],
            }
        ],
    }
    (root / "dataset.toml").write_bytes(tomli_w.dumps(ds).encode())
    cfg = {
        "output_dir": str(root / "out"),
        "output_name": "bench",
        "dataset_config": str(root / "dataset.toml"),
        "max_train_epochs": 100,
        "save_every_n_epochs": 1000,
        "train_batch_size": batch,
        "learning_rate": 1e-4,
        "unet_lr": 1e-4,
        "text_encoder_lr": 5e-5,
        "network_module": "networks.lora",
        "network_dim": 32,
        "network_alpha": 16.0,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "noise_offset": 0.05,
        "masked_loss": True,
        "alpha_mask": True,
        "seed": 0,
        **args,
    }
    path = root / "config.toml"
    path.write_bytes(tomli_w.dumps(cfg).encode())
    return path


def sd15_sized_model() -> training.BaseModel:
    """SD-1.5-shaped UNet / VAE / text encoder with random weights, and the byte-level tokenizer."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tiny = training.build_tiny_sd_model(Path(tmp) / "tok")
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(tiny), subfolder="tokenizer")
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet parameters: {n_params / 1e6:.1f} M", file=sys.stderr)
    return training.BaseModel(
        tokenizer, text_encoder, vae, unet, training.kohya_noise_scheduler(), "random-sd15-sized"
    )


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--cache-latents", action="store_true")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads (CPU pass)")
    ns = ap.parse_args()

    cuda = torch.cuda.is_available() and ns.device != "cpu"
    device = "cuda" if cuda and ns.device == "auto" else ns.device if ns.device != "auto" else "cpu"
    resolution = ns.resolution or (512 if cuda else 32)
    batch = ns.batch or (4 if cuda else 2)
    steps = ns.steps or (50 if cuda else 6)
    warmup = ns.warmup if ns.warmup is not None else (10 if cuda else 2)
    if not cuda:
        torch.set_num_threads(ns.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = write_dataset(
            root,
            n_images=8,
            resolution=resolution,
            batch=batch,
            repeats=max(1, (steps + warmup) * batch // 8 + 1),
            args={
                "gradient_checkpointing": not ns.no_gradient_checkpointing,
                "cache_latents": ns.cache_latents,
            },
        )
        model = (
            sd15_sized_model()
            if cuda
            else training.load_base_model(training.build_tiny_sd_model(root / "tiny"))
        )
        stamps: dict[int, float] = {}

        def on_progress(p: dict) -> None:
            if "val_loss" not in p:
                if cuda:
                    torch.cuda.synchronize()
                stamps[p["step"]] = time.perf_counter()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = training.train_lora_with_model(
            cfg, model, max_steps=warmup + steps, device=device, on_progress=on_progress
        )
        timed = (
            stamps[warmup + steps] - stamps[warmup] if warmup > 0 else stamps[steps] - min(stamps.values())
        )
        n = steps if warmup > 0 else steps - 1
        out = {
            "bench": "builtin_lora_training",
            "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "model": "SD-1.5-sized random UNet/VAE/CLIP-L"
            if cuda
            else "tiny random SD (build_tiny_sd_model)",
            "resolution": resolution,
            "batch": batch,
            "mixed_precision": "bf16" if cuda else "fp32",
            "gradient_checkpointing": not ns.no_gradient_checkpointing,
            "cache_latents": ns.cache_latents,
            "timed_steps": n,
            "steps_per_s": round(n / timed, 3),
            "images_per_s": round(n * batch / timed, 2),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "status": result["status"],
            "torch": torch.__version__,
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
