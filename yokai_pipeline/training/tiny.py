"""Tiny randomly initialised SD 1.5 / SDXL diffusers folders (demo, tests, CPU benchmark; nothing downloaded).

Shapes follow diffusers' own test components (``get_dummy_components``): the same block types and
conditioning as the real models, a few channels wide.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from yokai_pipeline.training.families import _require_diffusers


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet; needed to write a self-contained tokenizer vocabulary.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _tiny_tokenizer() -> tuple[Any, dict[str, int]]:
    """A byte-level CLIP tokenizer whose vocabulary is the 256 byte symbols (and word-end forms)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    return tokenizer, vocab


def _tiny_text_config(vocab: dict[str, int], **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        **extra,
    )


def _tiny_vae(block_out_channels: tuple[int, int]) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[min(8, block_out_channels[0]), min(16, block_out_channels[1])],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=min(8, block_out_channels[0]),
    )


def _sd_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd_model(
    dest: str | Path, *, seed: int = 0, block_out_channels: tuple[int, int] = (32, 64)
) -> Path:
    """Save a tiny randomly initialised SD-1.5-style diffusers folder (nothing is downloaded).

    UNet / VAE / CLIP text encoder built from small configs (diffusers' get_dummy_components
    shape) and a byte-level CLIP tokenizer whose vocabulary is the 256 byte symbols. Used by the
    demo to prove the training path end to end on CPU, and by tests.

    Args:
        dest: folder to create (a StableDiffusionPipeline ``save_pretrained`` layout).
        seed: weight initialisation seed.
        block_out_channels: UNet/VAE widths.

    Returns:
        ``dest``.
    """
    _require_diffusers()
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    dest = Path(dest)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=block_out_channels,
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=min(32, block_out_channels[0]),
    )
    vae = _tiny_vae(block_out_channels)
    tokenizer, vocab = _tiny_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(vocab))
    pipe = StableDiffusionPipeline(
        unet=unet,
        scheduler=_sd_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(dest), safe_serialization=True)
    return dest


def sdxl_unet_config(block_out_channels: tuple[int, ...] = (32, 64), **overrides: Any) -> dict[str, Any]:
    """An SDXL-shaped UNet config (text_time conditioning, linear projections, GEGLU feed-forward).

    The defaults are diffusers' tiny SDXL test UNet; the benchmark passes SDXL-base's own sizes.
    """
    cfg: dict[str, Any] = {
        "block_out_channels": block_out_channels,
        "layers_per_block": 2,
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        # 6 time ids x addition_time_embed_dim + the pooled text width (text_encoder_2 projection).
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
        "cross_attention_dim": 64,
        "norm_num_groups": 1,
    }
    cfg.update(overrides)
    return cfg


def build_tiny_sdxl_model(dest: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny randomly initialised SDXL diffusers folder: two CLIP encoders (32 wide each, so
    the UNet's cross-attention is 64), a text_time UNet and a small VAE. Nothing is downloaded.

    Returns:
        ``dest`` (a StableDiffusionXLPipeline ``save_pretrained`` layout).
    """
    _require_diffusers()
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    dest = Path(dest)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sdxl_unet_config())
    vae = _tiny_vae((32, 64))
    tokenizer, vocab = _tiny_tokenizer()
    tokenizer_2, _ = _tiny_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(vocab))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(vocab, projection_dim=32))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(dest), safe_serialization=True)
    return dest
