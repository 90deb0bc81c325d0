"""Model families (SD 1.5, SDXL): defaults, detection from a model's own config, loading, text encoding.

A family says which kohya script trains it, its native resolution, which text encoders it has
(and their LoRA prefixes) and how a caption becomes the UNet's conditioning. Everything the loop
does differently per family goes through :class:`BaseModel` and :func:`encode_text`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)

# Hub ids checked on huggingface.co (2026): runwayml/stable-diffusion-v1-5 was removed in 2024;
# stable-diffusion-v1-5/stable-diffusion-v1-5 is its maintained copy (diffusers layout).
# cagliostrolab/animagine-xl-3.1 is an anime SDXL checkpoint in the diffusers layout.
SD15_DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_DEFAULT_BASE = "cagliostrolab/animagine-xl-3.1"
# Known to work as SDXL bases (diffusers folders or single .safetensors files; the
# config description lists them for users).
KNOWN_SDXL_ANIME = (
    "cagliostrolab/animagine-xl-3.1",
    "Laxhar/noobai-XL-1.0",
    "OnomaAIResearch/Illustrious-xl-early-release-v0 (single file Illustrious-XL-v0.1.safetensors)",
    "stabilityai/stable-diffusion-xl-base-1.0",
)


@dataclass(frozen=True)
class Family:
    """What differs between SD 1.5 and SDXL for packaging and training."""

    name: str
    kohya_script: str
    resolution: int
    default_base_model: str
    # ss_base_model_version as sd-scripts writes it (train_network.py / sdxl_train_network.py).
    model_version: str
    # networks/lora.py prefixes of the text encoders, in order.
    te_prefixes: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", "train_network.py", 512, SD15_DEFAULT_BASE, "sd_v1", ("lora_te",)),
    "sdxl": Family(
        "sdxl", "sdxl_train_network.py", 1024, SDXL_DEFAULT_BASE, "sdxl_base_v1-0", ("lora_te1", "lora_te2")
    ),
}
VERSION_TO_FAMILY = {f.model_version: f.name for f in FAMILIES.values()}


def get_family(name: str) -> Family:
    """The family named ``name``; a ConfigError listing the known ones otherwise."""
    try:
        return FAMILIES[str(name)]
    except KeyError:
        raise ConfigError(
            f"unknown model family {name!r}: training.family must be one of {sorted(FAMILIES)}"
        ) from None


@dataclass
class BaseModel:
    """The pieces of a Stable Diffusion model the trainer needs (SDXL: two tokenizers / encoders)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    name: str
    version: str = "sd_v1"
    tokenizer_2: Any = None
    text_encoder_2: Any = None

    @property
    def family(self) -> Family:
        return FAMILIES[VERSION_TO_FAMILY.get(self.version, "sd15")]

    @property
    def text_encoders(self) -> list[Any]:
        return [te for te in (self.text_encoder, self.text_encoder_2) if te is not None]


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the built-in trainer needs diffusers and peft: pip install 'diffusers>=0.42' 'peft>=0.21'"
        ) from exc


# ------------------------------------------------------------------ detection (configs only)


def _family_of_folder(path: Path) -> str:
    index = path / "model_index.json"
    if index.is_file():
        cls = str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
        if "XL" in cls:
            return "sdxl"
    unet_cfg = path / "unet" / "config.json"
    if unet_cfg.is_file():
        # SDXL's UNet is conditioned on pooled text + size/crop ids ("text_time").
        if json.loads(unet_cfg.read_text(encoding="utf-8")).get("addition_embed_type") == "text_time":
            return "sdxl"
    return "sdxl" if (path / "text_encoder_2").is_dir() else "sd15"


def _family_of_file(path: Path) -> str | None:
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        return None  # a .ckpt is a pickle: not opened just to look
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    # Single-file layouts (SGM / LDM): SDXL has two embedders under conditioner.
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd15"
    return None


def _hub_config(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename))
    except EntryNotFoundError:
        return None


def detect_family(name_or_path: str | Path) -> str | None:
    """``sd15`` / ``sdxl`` read from the model's own config files (no weights are loaded).

    Args:
        name_or_path: a local diffusers folder, a single ``.safetensors`` file or a hub id (only
            its ``model_index.json`` / ``unet/config.json`` are fetched).

    Returns:
        The family, or None when the files do not say (e.g. a ``.ckpt``).

    Raises:
        BadInputError: a local path that does not exist or is not a model.
        ConfigError: a hub id that cannot be resolved.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise BadInputError(path, "not a diffusers model folder (no model_index.json or unet/)")
        return _family_of_folder(path)
    if path.is_file():
        if path.suffix.lower() not in (".safetensors", ".ckpt"):
            raise BadInputError(path, "a single-file base model must be .safetensors or .ckpt")
        return _family_of_file(path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise BadInputError(path, "base model not found (no such file or folder, and not a hub id)")
    try:
        index = _hub_config(name, "model_index.json")
        unet_cfg = None if index is None else _hub_config(name, "unet/config.json")
    except Exception as exc:  # huggingface_hub raises many kinds (offline, 404, gated)
        raise ConfigError(
            f"base model {name!r} cannot be resolved on the hub or in its cache: {exc}. Pass a local "
            "diffusers folder or a .safetensors file, or set HF_HOME to a cache that holds it."
        ) from exc
    if index is None:
        return None
    folder = index.parent
    if unet_cfg is not None and unet_cfg.parent.parent != folder:
        folder = unet_cfg.parent.parent
    return _family_of_folder(folder)


def check_base_model(name_or_path: str | Path, family: str) -> None:
    """Fail before training when the base model is missing or of another family than ``family``."""
    get_family(family)
    found = detect_family(name_or_path)
    if found is not None and found != family:
        raise ConfigError(
            f"base model {str(name_or_path)!r} is an {'SDXL' if found == 'sdxl' else 'SD 1.x'} model "
            f"(read from its config) but the training family is {family!r}: set training.family = "
            f"{found!r} or choose a {family} base model"
        )


# ------------------------------------------------------------------ loading


def load_base_model(name_or_path: str | Path, family: str = "sd15") -> BaseModel:
    """Load tokenizer(s), text encoder(s), VAE, UNet and a DDPM noise schedule.

    The family is checked against the model's own config first, so a wrong or missing model
    fails here, before any training step.

    Args:
        name_or_path: a hub id, a local diffusers folder (``model_index.json``), or a single-file
            checkpoint (``.safetensors``; ``.ckpt`` is read by diffusers with weights_only).
        family: ``sd15`` or ``sdxl``.

    Returns:
        The components in float32 on the CPU.
    """
    _require_diffusers()
    check_base_model(name_or_path, family)
    name = str(name_or_path)
    path = Path(name).expanduser()
    try:
        if path.is_file():
            return _load_single_file(path, family)
        return _load_folder(str(path) if path.is_dir() else name, family)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load base model {name!r}: {exc}. Set pretrained_model_name_or_path in the training "
            "config or pass --base-model (a hub id, a local diffusers folder or a .safetensors file)."
        ) from exc


def _load_single_file(path: Path, family: str) -> BaseModel:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None}
    pipe = cls.from_single_file(str(path), **extra)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    model = BaseModel(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, sched, str(path))
    model.version = FAMILIES[family].model_version
    if family == "sdxl":
        model.tokenizer_2, model.text_encoder_2 = pipe.tokenizer_2, pipe.text_encoder_2
    return model


def _load_folder(src: str, family: str) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model = BaseModel(
        tokenizer=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(src, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(src, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(src, subfolder="unet"),
        noise_scheduler=None,
        name=src,
        version=FAMILIES[family].model_version,
    )
    if family == "sdxl":
        model.tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2")
        model.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2")
    try:
        model.noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
    except (OSError, ValueError):
        model.noise_scheduler = kohya_noise_scheduler()
    return model


def kohya_noise_scheduler() -> Any:
    """The DDPM schedule sd-scripts trains SD 1.x and SDXL with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
    )


# ------------------------------------------------------------------ text conditioning


def _token_ids(tokenizer: Any, prompts: list[str], device: Any) -> Any:
    max_len = getattr(tokenizer, "model_max_length", 77)
    if not isinstance(max_len, int) or max_len > 1000:
        max_len = 77
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


def encode_prompts(
    tokenizer: Any, text_encoder: Any, prompts: list[str], *, clip_skip: int = 1, device: Any = None
) -> Any:
    """CLIP text embeddings as sd-scripts computes them (clip_skip 2 = penultimate layer + final norm).

    Shared by the trainer and the sampler; diffusers' own clip_skip path expects the pre-5
    transformers CLIPTextModel layout (``.text_model``).
    """
    ids = _token_ids(tokenizer, prompts, device if device is not None else text_encoder.device)
    if clip_skip > 1:
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
    return text_encoder(ids)[0]


def encode_sdxl_prompts(model: BaseModel, prompts: list[str], *, device: Any = None) -> tuple[Any, Any]:
    """SDXL conditioning as sd-scripts and diffusers build it.

    Both encoders' penultimate hidden states (no final norm) concatenated on the feature axis, and
    the second encoder's projected pooled output (``text_embeds``).

    Returns:
        (hidden states B x 77 x (d1 + d2), pooled B x d2).
    """
    import torch

    dev = device if device is not None else model.text_encoder.device
    out1 = model.text_encoder(_token_ids(model.tokenizer, prompts, dev), output_hidden_states=True)
    out2 = model.text_encoder_2(_token_ids(model.tokenizer_2, prompts, dev), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return hidden, out2.text_embeds


def sdxl_time_ids(
    original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]
) -> list[int]:
    """SDXL's size / crop micro-conditioning (``add_time_ids``): original size, crop, target size (h, w)."""
    return [*original_hw, *crop_top_left, *target_hw]
