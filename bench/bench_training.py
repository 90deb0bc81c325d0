"""Benchmark of the built-in LoRA trainer: steps/s and peak GPU memory.

On CUDA: an SD-1.5-sized UNet (diffusers' default UNet2DConditionModel config: block_out_channels
(320, 640, 1280, 1280), cross_attention_dim 768), the SD VAE and a CLIP-L-sized text encoder, all
with random weights (nothing downloaded), LoRA dim 32 / alpha 16 on UNet attention and the text
encoder, 512x512 images (64x64 latents), batch 4, bf16 autocast, gradient checkpointing; the
real trainer (train_lora_with_model) runs on a generated kohya dataset. On CPU: the tiny model
at 32x32 so the path can be checked anywhere.

``--family sdxl``: an SDXL-base-sized UNet (2.6 B parameters: block_out_channels (320, 640, 1280),
transformer depths (1, 2, 10), cross-attention 2048, text_time conditioning), the SDXL VAE shape
and CLIP-L + OpenCLIP-bigG-sized text encoders, random weights; 1024x1024 (128x128 latents),
batch 4, bf16, gradient checkpointing, LoRA dim 32 on the UNet only with cached text-encoder
outputs (sdxl_train_network.py's usual set-up, as our SDXL configs).

    python bench/bench_training.py                  # CUDA if available, else the tiny CPU pass
    python bench/bench_training.py --family sdxl    # SDXL-sized on CUDA, tiny SDXL on CPU
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

SDXL_ARGS = {"network_train_unet_only": True, "cache_text_encoder_outputs": True, "no_half_vae": True}
MODEL_NAMES = {
    ("sd15", True): "SD-1.5-sized random UNet/VAE/CLIP-L",
    ("sd15", False): "tiny random SD (build_tiny_sd_model)",
    ("sdxl", True): "SDXL-base-sized random UNet/VAE/CLIP-L+bigG, UNet-only LoRA",
    ("sdxl", False): "tiny random SDXL (build_tiny_sdxl_model)",
}


def write_dataset(
    root: Path, *, n_images: int, resolution: int, batch: int, repeats: int, args: dict, shuffle: bool = True
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
        "general": {"caption_extension": ".txt", "shuffle_caption": shuffle, "keep_tokens": 1},
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


def sd_vae(sample_size: int, scaling_factor: float) -> object:
    """The SD / SDXL VAE shape (both use the same architecture; SDXL rescales latents by 0.13025)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def sd15_sized_model() -> training.BaseModel:
    """SD-1.5-shaped UNet / VAE / text encoder with random weights, and the byte-level tokenizer."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )
    vae = sd_vae(512, 0.18215)
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
    tokenizer = _tokenizer()
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet parameters: {n_params / 1e6:.1f} M", file=sys.stderr)
    return training.BaseModel(
        tokenizer, text_encoder, vae, unet, training.kohya_noise_scheduler(), "random-sd15-sized"
    )


def _tokenizer() -> object:
    # The byte-level tokenizer of the tiny model (token ids < 514 fit any CLIP vocabulary).
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tiny = training.build_tiny_sd_model(Path(tmp) / "tok")
        return CLIPTokenizer.from_pretrained(str(tiny), subfolder="tokenizer")


def sdxl_sized_model() -> training.BaseModel:
    """SDXL-base-shaped UNet / VAE / two text encoders with random weights (sizes of SDXL 1.0's configs)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **training.sdxl_unet_config(
            (320, 640, 1280),
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            cross_attention_dim=2048,
            norm_num_groups=32,
        )
    )
    vae = sd_vae(1024, 0.13025)
    ids = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513, "vocab_size": 49408}
    te1 = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, **ids
        )
    )
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            projection_dim=1280,
            hidden_act="gelu",
            **ids,
        )
    )
    tok = _tokenizer()
    print(f"UNet parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M", file=sys.stderr)
    model = training.BaseModel(tok, te1, vae, unet, training.kohya_noise_scheduler(), "random-sdxl-sized")
    model.version, model.tokenizer_2, model.text_encoder_2 = "sdxl_base_v1-0", tok, te2
    return model


def _model(family: str, cuda: bool, root: Path) -> training.BaseModel:
    if cuda:
        return sdxl_sized_model() if family == "sdxl" else sd15_sized_model()
    if family == "sdxl":
        return training.load_base_model(training.build_tiny_sdxl_model(root / "tiny"), "sdxl")
    return training.load_base_model(training.build_tiny_sd_model(root / "tiny"))


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
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    ns = ap.parse_args()
    sdxl = ns.family == "sdxl"

    cuda = torch.cuda.is_available() and ns.device != "cpu"
    device = "cuda" if cuda and ns.device == "auto" else ns.device if ns.device != "auto" else "cpu"
    resolution = ns.resolution or ((1024 if sdxl else 512) if cuda else 32)
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
                **(SDXL_ARGS if sdxl else {}),
            },
            shuffle=not sdxl,  # cached text-encoder outputs: captions are not shuffled (kohya asserts)
        )
        model = _model(ns.family, cuda, root)
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
            "family": ns.family,
            "model": MODEL_NAMES[(ns.family, cuda)],
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
