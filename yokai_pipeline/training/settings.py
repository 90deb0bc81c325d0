"""The built-in trainer's resolved settings: kohya training args read with kohya's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import BadInputError
from yokai_pipeline.training.kohya_args import _typed, resolve_config_path


@dataclass
class Settings:
    output_dir: Path
    output_name: str
    seed: int
    epochs: int
    max_train_steps: int
    save_every_n_epochs: int
    unet_lr: float
    te_lr: float
    train_te: bool
    network_dim: int
    network_alpha: float
    mixed_precision: str
    gradient_checkpointing: bool
    noise_offset: float
    min_snr_gamma: float
    clip_skip: int
    v_parameterization: bool
    max_grad_norm: float
    lr_scheduler: str
    lr_warmup_steps: int
    optimizer_type: str
    save_dtype_name: str
    logging_dir: Path | None
    cache_latents: bool
    masked_loss: bool
    # Frozen text encoders: their output per caption is reused (sd-scripts' option name).
    cache_text_encoder_outputs: bool = False


def read_settings(args: dict[str, Any], src: Path, steps_per_epoch: int) -> Settings:
    lr = _typed(args, "learning_rate", float, 1e-4, src)
    unet_lr = _typed(args, "unet_lr", float, lr, src)
    te_lr = _typed(args, "text_encoder_lr", float, lr, src)
    epochs_arg = _typed(args, "max_train_epochs", int, None, src)
    if epochs_arg:
        epochs = epochs_arg
        max_steps = epochs * steps_per_epoch
    else:
        max_steps = _typed(args, "max_train_steps", int, 1600, src)
        epochs = math.ceil(max_steps / steps_per_epoch)
    warmup: Any = args.get("lr_warmup_steps", 0) or 0
    if isinstance(warmup, float) and warmup < 1:
        warmup = int(warmup * max_steps)  # kohya: a float below 1 is a ratio of the total steps
    output_dir = args.get("output_dir")
    if not output_dir:
        raise BadInputError(src, "output_dir is not set")
    mp = str(args.get("mixed_precision", "no"))
    if mp not in ("no", "fp16", "bf16"):
        raise BadInputError(src, f"mixed_precision must be no, fp16 or bf16, got {mp!r}")
    logging_dir = args.get("logging_dir")
    return Settings(
        output_dir=resolve_config_path(output_dir, src),
        output_name=str(args.get("output_name") or "last"),
        seed=_typed(args, "seed", int, 42, src),
        epochs=epochs,
        max_train_steps=max_steps,
        save_every_n_epochs=_typed(args, "save_every_n_epochs", int, 0, src),
        unet_lr=unet_lr,
        te_lr=te_lr,
        train_te=not _typed(args, "network_train_unet_only", bool, False, src) and te_lr > 0,
        network_dim=_typed(args, "network_dim", int, 4, src),
        network_alpha=float(_typed(args, "network_alpha", float, 1.0, src)),
        mixed_precision=mp,
        gradient_checkpointing=_typed(args, "gradient_checkpointing", bool, False, src),
        noise_offset=_typed(args, "noise_offset", float, 0.0, src),
        min_snr_gamma=_typed(args, "min_snr_gamma", float, 0.0, src),
        clip_skip=_typed(args, "clip_skip", int, 1, src),
        v_parameterization=_typed(args, "v_parameterization", bool, False, src),
        max_grad_norm=_typed(args, "max_grad_norm", float, 1.0, src),
        lr_scheduler=str(args.get("lr_scheduler", "constant")),
        lr_warmup_steps=int(warmup),
        optimizer_type=str(args.get("optimizer_type", "AdamW")),
        save_dtype_name=str(args.get("save_precision") or "float"),
        logging_dir=resolve_config_path(logging_dir, src) if logging_dir else None,
        cache_latents=_typed(args, "cache_latents", bool, False, src),
        masked_loss=_typed(args, "masked_loss", bool, False, src)
        or _typed(args, "alpha_mask", bool, False, src),
        cache_text_encoder_outputs=_typed(args, "cache_text_encoder_outputs", bool, False, src)
        or _typed(args, "cache_text_encoder_outputs_to_disk", bool, False, src),
    )


def pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
