"""The training loop: small functions over one :class:`TrainState`; SD 1.5 and SDXL share it.

Per family only the conditioning differs (:func:`conditioning`: one CLIP encoder, or SDXL's two
plus pooled text and size/crop ids) and the LoRA module names on export (lora_io).

Randomness is derived from (seed, epoch) and (seed, step) rather than from global RNG state, so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import BadInputError, ConfigError
from yokai_pipeline.fsio import atomic_write_bytes, atomic_write_json, read_json
from yokai_pipeline.training import model_cache
from yokai_pipeline.training.captions import process_caption
from yokai_pipeline.training.dataset import (
    DatasetSpec,
    TrainItem,
    list_dataset_images,
    load_training_image,
    plan_epoch,
    plan_validation,
    read_dataset_config,
)
from yokai_pipeline.training.families import (
    BaseModel,
    _require_diffusers,
    encode_prompts,
    encode_sdxl_prompts,
    get_family,
    sdxl_time_ids,
)
from yokai_pipeline.training.kohya_args import TrainingError, read_training_args, resolve_config_path
from yokai_pipeline.training.lora_io import (
    adapter_tensors,
    kohya_lora_state,
    load_adapter_tensors,
    read_finished_marker,
    save_kohya_lora,
    sdxl_unet_module_name,
    text_encoder_module_name,
    training_fingerprint,
    write_finished_marker,
)
from yokai_pipeline.training.metadata import kohya_metadata
from yokai_pipeline.training.settings import Settings, pick_device, read_settings

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation_loss.json"
# kohya validates at 4 timesteps evenly spread over the schedule (train_network.py).
NUM_VALIDATION_TIMESTEPS = 4
# kohya networks.lora's default targets: every Linear / 1x1 Conv of the UNet's Transformer2DModel
# blocks (attention, proj_in / proj_out, feed-forward) and of the text encoders' attention + MLP.
UNET_TARGETS = ["proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class TrainState:
    """Everything one run holds: settings, data, model, optimizer and its position."""

    config_file: Path
    args: dict[str, Any]
    st: Settings
    specs: list[DatasetSpec]
    model: BaseModel
    dev: Any
    weight_dtype: Any
    use_amp: bool
    steps_per_epoch: int
    fingerprint: str | None = None
    te_trained: list[Any] = field(default_factory=list)
    optimizer: Any = None
    lr_sched: Any = None
    scaler: Any = None
    global_step: int = 0
    start_epoch: int = 1
    skip_batches: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    session_id: int = field(default_factory=lambda: random.randint(0, 2**32))
    resumed_from: int | None = None
    recent: list[float] = field(default_factory=list)
    latent_cache: dict[str, Any] = field(default_factory=dict)
    text_cache: dict[str, Any] = field(default_factory=dict)
    cache_latents_ok: bool = False
    val_batches: list[tuple[int, list[TrainItem]]] = field(default_factory=list)
    val_timesteps: list[int] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    writer: Any = None

    @property
    def state_dir(self) -> Path:
        return self.st.output_dir / f"{self.st.output_name}-builtin-state"

    @property
    def sdxl(self) -> bool:
        return self.model.family.name == "sdxl"


# ------------------------------------------------------------------ entry points


def train_lora_builtin(
    config_file: str | Path,
    *,
    base_model_override: str | None = None,
    max_steps: int | None = None,
    device: str = "auto",
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    resolution: int | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    """Train one character's LoRA from its kohya training config with diffusers + peft.

    Args:
        config_file: the training-args TOML (kohya ``--config_file``).
        base_model_override: hub id / diffusers folder / single file used instead of
            ``pretrained_model_name_or_path``.
        max_steps: stop once the global step reaches this (state and a step checkpoint are
            saved; the next call resumes). None trains to the end.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        on_progress: called after every step with ``{step, total_steps, epoch, total_epochs, loss}``
            and after every epoch with ``val_loss`` added.
        resolution: train every dataset at this square size without buckets instead of the
            configured resolution (quick smoke runs on CPU, e.g. the demo's tiny model).
        family: ``sd15`` or ``sdxl``; None reads it from the config (``sdxl = true`` is not a kohya
            option, so a config written for sdxl_train_network.py is recognised by its
            ``no_half_vae`` / ``cache_text_encoder_outputs`` keys), else ``sd15``.

    Returns:
        ``{status: finished|stopped|skipped, checkpoint, global_step, epoch, output_dir, ...}``.
    """
    config_file = Path(config_file)
    args = read_training_args(config_file)
    if not args.get("output_dir"):
        raise BadInputError(config_file, "output_dir is not set")
    output_dir = resolve_config_path(args["output_dir"], config_file)
    fingerprint = training_fingerprint(config_file)
    marker = read_finished_marker(output_dir, fingerprint)
    if marker is not None:
        return {"status": "skipped", "output_dir": str(output_dir), **marker}
    base = base_model_override or args.get("pretrained_model_name_or_path")
    if not base:
        raise ConfigError(
            f"{config_file}: pretrained_model_name_or_path is not set; set it or pass --base-model"
        )
    fam = get_family(family or config_family(args))
    dev = pick_device(device)
    dtype = weight_dtype(dev, str(args.get("mixed_precision", "no")))
    # the frozen base model is loaded once per process per device; this character's adapters go
    # when its training ends, so the next one on this device starts from the same base
    with model_cache.base_model(base, fam.name, str(dev), str(dtype)) as model:
        return train_lora_with_model(
            config_file,
            model,
            max_steps=max_steps,
            device=str(dev),
            on_progress=on_progress,
            resolution=resolution,
            fingerprint=fingerprint,
        )


def config_family(args: dict[str, Any]) -> str:
    """The family a kohya training config was written for (keys only sdxl_train_network.py reads)."""
    sdxl_only = ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "no_half_vae")
    return "sdxl" if any(args.get(k) is not None for k in sdxl_only) else "sd15"


def train_lora_with_model(
    config_file: str | Path,
    model: BaseModel,
    *,
    max_steps: int | None = None,
    device: str = "auto",
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    resolution: int | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """:func:`train_lora_builtin` with an already loaded base model (benchmarks, tests)."""
    _require_diffusers()
    config_file = Path(config_file)
    if fingerprint is None:
        fingerprint = training_fingerprint(config_file)
    state = prepare_state(config_file, model, device=device, resolution=resolution)
    state.fingerprint = fingerprint
    marker = read_finished_marker(state.st.output_dir, fingerprint)
    if marker is not None:
        return {"status": "skipped", "output_dir": str(state.st.output_dir), **marker}
    setup_training(state)
    resume(state)
    begin_run(state)
    return run(state, max_steps, on_progress)


# ------------------------------------------------------------------ set-up


def prepare_state(config_file: Path, model: BaseModel, *, device: str, resolution: int | None) -> TrainState:
    """Read the config and its datasets; choose device and dtypes."""

    args = read_training_args(config_file)
    specs = read_dataset_config(args, config_file)
    if resolution is not None:
        for spec in specs:
            spec.resolution = (resolution, resolution)
            spec.params["enable_bucket"] = False
    specs = list_dataset_images(specs)
    steps_per_epoch = len(plan_epoch(specs, 0, 1))
    st = read_settings(args, config_file, steps_per_epoch)
    dev = pick_device(device)
    st.output_dir.mkdir(parents=True, exist_ok=True)
    use_amp = dev.type == "cuda" and st.mixed_precision in ("bf16", "fp16")
    dtype = weight_dtype(dev, st.mixed_precision)
    return TrainState(config_file, args, st, specs, model, dev, dtype, use_amp, steps_per_epoch)


def weight_dtype(dev: Any, mixed_precision: str) -> Any:
    """dtype of the frozen weights: bf16/fp16 under CUDA mixed precision, else float32."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return dtypes.get(mixed_precision, torch.float32) if dev.type == "cuda" else torch.float32


def setup_training(state: TrainState) -> None:
    """Freeze the base model, add LoRA adapters, build optimizer, LR schedule and grad scaler."""
    import torch
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    st, model = state.st, state.model
    frozen = [model.unet, model.vae, *model.text_encoders]
    for m in frozen:
        m.requires_grad_(False)
        m.to(state.dev)
        if state.weight_dtype != torch.float32:
            m.to(dtype=state.weight_dtype)
    if state.sdxl and state.weight_dtype == torch.float16:
        model.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16 (kohya's no_half_vae)
    torch.manual_seed(st.seed)
    _inject_lora(model.unet, UNET_TARGETS, st)
    state.te_trained = list(model.text_encoders) if st.train_te else []
    for te in state.te_trained:
        _inject_lora(te, TEXT_ENCODER_TARGETS, st)
    trained = [model.unet, *state.te_trained]
    cast_training_params(trained, dtype=torch.float32)
    if st.gradient_checkpointing:
        _enable_checkpointing(model.unet, state.te_trained)
    model.unet.train()
    for te in model.text_encoders:
        te.train(te in state.te_trained)
    model.vae.eval()

    groups = [{"params": _trainable(model.unet), "lr": st.unet_lr}]
    groups += [{"params": _trainable(te), "lr": st.te_lr} for te in state.te_trained]
    if st.optimizer_type.lower() not in ("adamw", "adamw8bit"):
        log.warning(
            "optimizer_type %s is not supported by the built-in trainer; using AdamW", st.optimizer_type
        )
    state.optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    state.lr_sched = get_scheduler(
        st.lr_scheduler,
        state.optimizer,
        num_warmup_steps=st.lr_warmup_steps,
        num_training_steps=st.max_train_steps,
    )
    if state.use_amp and state.weight_dtype == torch.float16:
        state.scaler = torch.amp.GradScaler("cuda")


def _trainable(module: Any) -> list[Any]:
    return [p for p in module.parameters() if p.requires_grad]


def _inject_lora(module: Any, targets: list[str], st: Settings) -> None:
    # peft directly for every part: transformers' add_adapter demands a newer peft than diffusers.
    from peft import LoraConfig, inject_adapter_in_model

    if adapter_tensors(module):
        return  # already injected (a benchmark or test reusing the model)
    inject_adapter_in_model(
        LoraConfig(r=st.network_dim, lora_alpha=st.network_alpha, target_modules=targets), module
    )


def _enable_checkpointing(unet: Any, text_encoders: list[Any]) -> None:
    unet.enable_gradient_checkpointing()
    for te in text_encoders:
        # Non-reentrant: frozen embeddings give inputs without grad, which reentrant checkpointing drops.
        te_ckpt = getattr(te, "activation_checkpointing_enable", None)  # transformers >= 5.2x
        if te_ckpt is not None:
            te_ckpt(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_parts(state: TrainState) -> list[tuple[str, Any, Any]]:
    """(kohya prefix, model, sd-scripts namer) of every trained part, for lora_io."""
    unet = state.model.unet
    if state.sdxl:
        lpb = int(unet.config.layers_per_block)
        parts = [("lora_unet", unet, lambda n: sdxl_unet_module_name(n, lpb))]
    else:
        parts = [("lora_unet", unet, lambda n: n)]
    prefixes = state.model.family.te_prefixes
    parts += [
        (prefixes[i], te, text_encoder_module_name)
        for i, te in enumerate(state.model.text_encoders)
        if te in state.te_trained
    ]
    return parts


def _state_parts(state: TrainState) -> dict[str, Any]:
    names = ["text_encoder", "text_encoder_2"]
    parts = {"unet": state.model.unet}
    parts.update({names[i]: te for i, te in enumerate(state.model.text_encoders) if te in state.te_trained})
    return parts


def resume(state: TrainState) -> None:
    """Continue from ``<output_name>-builtin-state`` when it belongs to the same data and config."""
    import torch
    from safetensors.torch import load_file

    state_dir = state.state_dir
    if not (state_dir / "train_state.json").is_file():
        return
    ts = read_json(state_dir / "train_state.json")
    if state.fingerprint is not None and ts.get("fingerprint", state.fingerprint) != state.fingerprint:
        log.info("%s: saved state is for other data or another config; starting over", state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        return
    lora = load_file(str(state_dir / "lora.safetensors"))
    for part, module in _state_parts(state).items():
        n = len(part) + 1
        load_adapter_tensors(module, {k[n:]: v for k, v in lora.items() if k.startswith(f"{part}.")})
    dev = state.dev
    state.optimizer.load_state_dict(
        torch.load(state_dir / "optimizer.pt", map_location=dev, weights_only=True)
    )
    state.lr_sched.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=True))
    if state.scaler is not None and (state_dir / "scaler.pt").is_file():
        state.scaler.load_state_dict(torch.load(state_dir / "scaler.pt", weights_only=True))
    state.global_step, state.start_epoch, state.skip_batches = (
        ts["global_step"],
        ts["epoch"],
        ts["step_in_epoch"],
    )
    state.history = ts.get("history", [])
    state.started_at = ts.get("training_started_at", state.started_at)
    state.session_id = ts.get("session_id", state.session_id)
    state.resumed_from = state.global_step
    log.info(
        "resuming %s from step %d (epoch %d)", state.st.output_name, state.global_step, state.start_epoch
    )


def begin_run(state: TrainState) -> None:
    """Metadata, resolved-args file, tensorboard writer, caches and the validation plan."""
    import numpy as np

    st = state.st
    state.writer = _summary_writer(st.logging_dir, st.output_name)
    state.metadata = kohya_metadata(state)
    atomic_write_json(
        st.output_dir / f"{st.output_name}_builtin_args.json",
        {
            "config_file": str(state.config_file),
            "base_model": state.model.name,
            "family": state.model.family.name,
            "resolved": st.__dict__,
            "args": state.args,
        },
    )
    augmenting = any(
        s.params["flip_aug"] or s.params["random_crop"] or s.params["color_aug"]
        for d in state.specs
        for s in d.subsets
    )
    if st.cache_latents and augmenting:
        log.warning("cache_latents with flip/crop/colour augmentation: latents are not cached")
    state.cache_latents_ok = st.cache_latents and not augmenting
    state.val_batches = plan_validation(state.specs)
    n_t = state.model.noise_scheduler.config.num_train_timesteps
    ts = np.linspace(0, n_t, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]
    state.val_timesteps = [int(t) for t in ts]


# ------------------------------------------------------------------ one batch


def load_batch(
    state: TrainState, di: int, items: list[TrainItem], epoch: int, training: bool, pos: int
) -> dict:
    """Pixels, loss masks, captions and SDXL size/crop ids of one batch (runs in a loader thread)."""
    import numpy as np
    import torch

    st, spec = state.st, state.specs[di]
    pix, masks, caps, time_ids = [], [], [], []
    for j, item in enumerate(items):
        sp = spec.subsets[item.subset].params
        rng = random.Random(f"{st.seed}-{epoch}-{pos}-{j}")
        flip = training and sp["flip_aug"] and rng.random() < 0.5
        use_mask = bool(sp["alpha_mask"]) and st.masked_loss
        arr, mask = load_training_image(item.path, item.bucket, item.resized, alpha_mask=use_mask, flip=flip)
        pix.append(arr)
        masks.append(mask if mask is not None else np.ones(arr.shape[:2], np.float32))
        caps.append(process_caption(item.caption, sp, rng, epoch) if training else item.caption)
        original = item.size if item.size != (0, 0) else item.bucket
        crop = ((item.resized[1] - item.bucket[1]) // 2, (item.resized[0] - item.bucket[0]) // 2)
        time_ids.append(sdxl_time_ids((original[1], original[0]), crop, (item.bucket[1], item.bucket[0])))
    return {
        "pixels": torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2),
        "masks": torch.from_numpy(np.stack(masks))[:, None],
        "has_mask": any(spec.subsets[i.subset].params["alpha_mask"] for i in items) and st.masked_loss,
        "captions": caps,
        "time_ids": torch.tensor(time_ids, dtype=torch.float32),
        "keys": [str(i.path) for i in items],
    }


def encode_latents(state: TrainState, batch: dict[str, Any], gen: Any) -> Any:
    """VAE latents of a batch, sampled from the latent distribution; cached per image when allowed."""
    import torch

    keys, vae, cache = batch["keys"], state.model.vae, state.latent_cache
    if state.cache_latents_ok and all(k in cache for k in keys):
        return torch.stack([cache[k] for k in keys]).to(state.dev)
    with torch.no_grad():
        pixels = batch["pixels"].to(state.dev, dtype=vae.dtype)
        if state.cache_latents_ok:
            # One image at a time: a cached latent must not depend on which batch first encoded it.
            dists = [vae.encode(pixels[i : i + 1]).latent_dist for i in range(len(keys))]
            mean = torch.cat([d.mean for d in dists])
            std = torch.cat([d.std for d in dists])
            # Drawn per image (seeded by its path), not from the step's generator, so a resumed run
            # (empty cache) reproduces the same latents and the same noise.
            eps = torch.stack(
                [
                    torch.randn(
                        mean.shape[1:], generator=torch.Generator().manual_seed(_path_seed(state.st.seed, k))
                    )
                    for k in keys
                ]
            )
        else:
            dist = vae.encode(pixels).latent_dist
            mean, std = dist.mean, dist.std
            eps = torch.randn(mean.shape, generator=gen)
        eps = eps.to(state.dev, dtype=mean.dtype)
        latents = (mean + std * eps) * vae.config.scaling_factor
    if state.cache_latents_ok:
        for k, lat in zip(keys, latents, strict=True):
            cache[k] = lat.detach().cpu()
    return latents


def conditioning(state: TrainState, batch: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """Text conditioning of a batch: (encoder hidden states, SDXL's added_cond_kwargs or None)."""
    import torch

    caps, model, dev = batch["captions"], state.model, state.dev
    frozen = not state.te_trained
    cached = frozen and state.st.cache_text_encoder_outputs
    if cached and all(c in state.text_cache for c in caps):
        hidden = torch.stack([state.text_cache[c][0] for c in caps]).to(dev)
        pooled = torch.stack([state.text_cache[c][1] for c in caps]).to(dev) if state.sdxl else None
    else:
        # A frozen text encoder needs no autograd graph.
        with torch.no_grad() if frozen else contextlib.nullcontext():
            if state.sdxl:
                hidden, pooled = encode_sdxl_prompts(model, caps, device=dev)
            else:
                hidden, pooled = (
                    encode_prompts(
                        model.tokenizer, model.text_encoder, caps, clip_skip=state.st.clip_skip, device=dev
                    ),
                    None,
                )
        if cached:
            for i, c in enumerate(caps):
                state.text_cache[c] = (
                    hidden[i].detach().cpu(),
                    None if pooled is None else pooled[i].detach().cpu(),
                )
    if not state.sdxl:
        return hidden, None
    dt = state.weight_dtype
    return hidden, {"text_embeds": pooled.to(dt), "time_ids": batch["time_ids"].to(dev, dtype=dt)}


def snr_weight(snr: Any, gamma: float, v_prediction: bool) -> Any:
    """kohya's apply_snr_weight: min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    import torch

    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def batch_loss(state: TrainState, batch: dict[str, Any], gen: Any, timesteps: Any | None = None) -> Any:
    """Diffusion loss of one batch (masked, min-SNR weighted as configured)."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    st, sched, dev = state.st, state.model.noise_scheduler, state.dev
    latents = encode_latents(state, batch, gen).float()
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen)
    if st.noise_offset:
        noise = noise + st.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=gen)
    noise = noise.to(dev)
    if timesteps is None:
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
    timesteps = timesteps.to(dev).long()
    noisy = sched.add_noise(latents, noise, timesteps)
    amp = (
        torch.autocast(device_type="cuda", dtype=state.weight_dtype)
        if state.use_amp
        else contextlib.nullcontext()
    )
    with amp:
        hidden, added = conditioning(state, batch)
        extra = {"added_cond_kwargs": added} if added is not None else {}
        pred = state.model.unet(
            noisy.to(state.weight_dtype), timesteps, hidden.to(state.weight_dtype), **extra
        ).sample
    target = sched.get_velocity(latents, noise, timesteps) if st.v_parameterization else noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if batch["has_mask"]:
        mask = F.interpolate(batch["masks"].to(dev, torch.float32), size=loss.shape[2:], mode="area")
        loss = loss * mask
    loss = loss.mean([1, 2, 3])
    if st.min_snr_gamma:
        loss = loss * snr_weight(compute_snr(sched, timesteps), st.min_snr_gamma, st.v_parameterization)
    return loss.mean()


def optimizer_step(state: TrainState, loss: Any) -> None:
    """Backward, clip, step, schedule (through the grad scaler for fp16)."""
    import torch

    scaler, opt = state.scaler, state.optimizer
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if state.st.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], state.st.max_grad_norm
        )
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    state.lr_sched.step()
    opt.zero_grad(set_to_none=True)


def validate(state: TrainState) -> float | None:
    """Mean loss over the held-out images at kohya's fixed validation timesteps."""
    import numpy as np
    import torch

    if not state.val_batches:
        return None
    model = state.model
    model.unet.eval()
    for te in model.text_encoders:
        te.eval()
    vseed = state.specs[0].params["validation_seed"]
    gen = torch.Generator().manual_seed(int(vseed if vseed is not None else state.st.seed))
    losses = []
    with torch.no_grad():
        for vi, (di, items) in enumerate(state.val_batches):
            batch = load_batch(state, di, items, 0, False, vi)
            for t in state.val_timesteps:
                losses.append(float(batch_loss(state, batch, gen, torch.full((len(items),), t))))
    model.unet.train()
    for te in model.text_encoders:
        te.train(te in state.te_trained)
    return float(np.mean(losses))


# ------------------------------------------------------------------ saving


def save_state(state: TrainState, epoch: int, step_in_epoch: int) -> None:
    """Write the resume state folder (LoRA, optimizer, schedule, position) by swapping a temp folder in."""
    import torch
    from safetensors.torch import save as st_save

    st, state_dir = state.st, state.state_dir
    tmp = st.output_dir / f".tmp-{state_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora = {
        f"{part}.{k}": v.detach().cpu().contiguous()
        for part, module in _state_parts(state).items()
        for k, v in adapter_tensors(module).items()
    }
    atomic_write_bytes(tmp / "lora.safetensors", st_save(lora))
    for name, obj in (
        ("optimizer.pt", state.optimizer),
        ("scheduler.pt", state.lr_sched),
        ("scaler.pt", state.scaler),
    ):
        if obj is not None:
            buf = io.BytesIO()
            torch.save(obj.state_dict(), buf)
            atomic_write_bytes(tmp / name, buf.getvalue())
    record = {
        "global_step": state.global_step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "history": state.history,
        "training_started_at": state.started_at,
        "session_id": state.session_id,
        "fingerprint": state.fingerprint,
    }
    atomic_write_json(tmp / "train_state.json", record)
    old = st.output_dir / f".tmp-old-{state_dir.name}"
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_lora(state: TrainState, name: str, epoch: int) -> Path:
    """One kohya-format checkpoint ``<name>.safetensors`` with the ss_* metadata of this point."""
    import torch

    meta = {
        **state.metadata,
        "ss_epoch": epoch,
        "ss_steps": state.global_step,
        "ss_training_finished_at": time.time(),
    }
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(state.st.save_dtype_name, torch.float32)
    tensors = kohya_lora_state(lora_parts(state), state.st.network_alpha)
    return save_kohya_lora(state.st.output_dir / f"{name}.safetensors", tensors, meta, save_dtype)


def write_validation(state: TrainState) -> None:
    scored = [h for h in state.history if h.get("val_loss") is not None]
    best = min(scored, key=lambda h: h["val_loss"])["epoch"] if scored else None
    atomic_write_json(
        state.st.output_dir / VALIDATION_FILE,
        {
            "output_name": state.st.output_name,
            "timesteps": state.val_timesteps,
            "epochs": state.history,
            "best_epoch": best,
        },
    )


# ------------------------------------------------------------------ epochs


def _progress(state: TrainState, epoch: int, **extra: Any) -> dict[str, Any]:
    import numpy as np

    return {
        "step": state.global_step,
        "total_steps": state.st.max_train_steps,
        "epoch": epoch,
        "total_epochs": state.st.epochs,
        "loss": float(np.mean(state.recent)) if state.recent else None,
        **extra,
    }


def run_epoch(
    state: TrainState, epoch: int, pool: ThreadPoolExecutor, max_steps: int | None, on_progress: Any
) -> tuple[bool, list[float], int]:
    """Train one epoch, prefetching the next batch in ``pool``.

    Returns:
        (stopped by ``max_steps``, the step losses, position in the epoch where it stopped).
    """
    import numpy as np
    import torch

    st = state.st
    batches = plan_epoch(state.specs, st.seed, epoch)
    losses: list[float] = []
    first = state.skip_batches if epoch == state.start_epoch else 0
    submit = lambda p: pool.submit(load_batch, state, *batches[p], epoch, True, p)  # noqa: E731
    nxt = submit(first) if first < len(batches) else None
    pos = first
    try:
        for pos in range(first, len(batches)):
            if state.global_step >= st.max_train_steps:
                break
            if max_steps is not None and state.global_step >= max_steps:
                return True, losses, pos
            assert nxt is not None
            batch = nxt.result()
            nxt = submit(pos + 1) if pos + 1 < len(batches) else None
            gen = torch.Generator().manual_seed(st.seed * 1_000_003 + state.global_step)
            loss = batch_loss(state, batch, gen)
            optimizer_step(state, loss)
            state.global_step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"{state.config_file}: loss became {value} at step {state.global_step}")
            losses.append(value)
            state.recent = (state.recent + [value])[-state.steps_per_epoch :]
            if state.writer is not None:
                state.writer.add_scalar("loss/current", value, state.global_step)
                state.writer.add_scalar("loss/average", float(np.mean(state.recent)), state.global_step)
            if on_progress:
                on_progress(_progress(state, epoch))
    finally:
        if nxt is not None:
            nxt.cancel()
    return False, losses, pos


def end_epoch(
    state: TrainState, epoch: int, losses: list[float], on_progress: Any
) -> tuple[bool, Path | None]:
    """Validate, checkpoint as configured, record history, save state. Returns (last epoch, checkpoint)."""
    import numpy as np

    st = state.st
    val = validate(state)
    last = epoch == st.epochs or state.global_step >= st.max_train_steps
    ckpt = None
    if last or (st.save_every_n_epochs and epoch % st.save_every_n_epochs == 0):
        ckpt = save_lora(state, st.output_name if last else f"{st.output_name}-{epoch:06d}", epoch)
    state.history = [h for h in state.history if h["epoch"] != epoch]
    train_loss = float(np.mean(losses)) if losses else None
    state.history.append(
        {
            "epoch": epoch,
            "step": state.global_step,
            "val_loss": val,
            "train_loss": train_loss,
            "checkpoint": ckpt.name if ckpt else None,
        }
    )
    write_validation(state)
    if state.writer is not None and val is not None:
        state.writer.add_scalar("loss/validation/epoch_average", val, epoch)
        state.writer.add_scalar("loss/epoch", train_loss or 0.0, epoch)
    save_state(state, epoch + 1, 0)
    if on_progress:
        on_progress(_progress(state, epoch, val_loss=val))
    return last, ckpt


def run(state: TrainState, max_steps: int | None, on_progress: Any) -> dict[str, Any]:
    """All remaining epochs; the result record; the ``.finished`` marker when done."""
    st = state.st
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="yokai-train-io")
    checkpoint: Path | None = None
    status = "finished"
    t0 = time.time()
    try:
        for epoch in range(state.start_epoch, st.epochs + 1):
            stopped, losses, pos = run_epoch(state, epoch, pool, max_steps, on_progress)
            if stopped:
                status = "stopped"
                save_state(state, epoch, pos)
                checkpoint = save_lora(state, f"{st.output_name}-step{state.global_step:08d}", epoch)
                break
            last, ckpt = end_epoch(state, epoch, losses, on_progress)
            checkpoint = ckpt or checkpoint
            if last:
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if state.writer is not None:
            state.writer.close()
    scored = [h for h in state.history if h.get("val_loss") is not None]
    result = {
        "status": status,
        "backend": "builtin",
        "family": state.model.family.name,
        "output_dir": str(st.output_dir),
        "output_name": st.output_name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "global_step": state.global_step,
        "total_steps": st.max_train_steps,
        "epoch": state.history[-1]["epoch"] if state.history else state.start_epoch,
        "resumed_from_step": state.resumed_from,
        "best_epoch": min(scored, key=lambda h: h["val_loss"])["epoch"] if scored else None,
        "validation_file": str(st.output_dir / VALIDATION_FILE),
        "seconds": time.time() - t0,
        "device": str(state.dev),
    }
    if status == "finished":
        keep = ("checkpoint", "backend", "family", "global_step", "best_epoch")
        write_finished_marker(
            st.output_dir, {**{k: result[k] for k in keep}, "fingerprint": state.fingerprint}
        )
    return result


def _path_seed(seed: int, path: str) -> int:
    # Folder + file name only: the same dataset moved elsewhere draws the same latents.
    p = Path(path)
    return (seed * 1_000_003 + zlib.crc32(f"{p.parent.name}/{p.name}".encode())) % (2**63)


def _summary_writer(logging_dir: Path | None, name: str) -> Any:
    if logging_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed; validation loss goes to %s only", VALIDATION_FILE)
        return None
    return SummaryWriter(log_dir=str(logging_dir / f"{name}_builtin"))
