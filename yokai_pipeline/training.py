"""Built-in LoRA trainer (diffusers + peft) that reads a packaged kohya dataset as sd-scripts would.

No sd-scripts checkout is needed: the training-args TOML (``--config_file``) and its dataset
TOML are read with kohya's own rules (flat keys, subset > dataset > general > args fallbacks,
``{repeats}_{name}`` folders when there is no dataset config, kohya's validation split and
aspect-ratio buckets), a LoRA is trained on a Stable-Diffusion-1.5-style UNet (and optionally
the text encoder), and kohya-format ``.safetensors`` files with ``ss_*`` metadata are saved
every ``save_every_n_epochs`` epochs, so the result loads in sd-webui / ComfyUI / diffusers.

Outputs in ``output_dir`` (names follow sd-scripts):

- ``<output_name>-<epoch:06d>.safetensors`` every N epochs, ``<output_name>.safetensors`` at the end,
  ``<output_name>-step<step:08d>.safetensors`` when a run is cut by ``max_steps``;
- ``<output_name>-builtin-state/``: LoRA weights, optimizer, LR scheduler and position, for resume;
- ``validation_loss.json``: per-epoch validation (and mean training) loss, the best epoch;
- ``.finished``: JSON marker with the final checkpoint; a finished character is skipped;
- tensorboard scalars under ``logging_dir`` when the ``tensorboard`` package is installed
  (kohya's tag names: ``loss/average``, ``loss/validation/epoch_average``).

Randomness is derived from (seed, epoch) and (seed, step) rather than from global RNG state, so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import time
import tomllib
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import BadInputError, ConfigError, YokaiError
from yokai_pipeline.fsio import atomic_write_bytes, atomic_write_json, read_json

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FINISHED_MARKER = ".finished"
VALIDATION_FILE = "validation_loss.json"
# kohya validates at 4 timesteps evenly spread over the schedule (train_network.py).
NUM_VALIDATION_TIMESTEPS = 4
# Target modules of the UNet attention blocks (what diffusers' LoRA scripts train).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

# Defaults of the kohya dataset parameters we use (library/config_util.py dataclasses).
_SUBSET_DEFAULTS: dict[str, Any] = {
    "num_repeats": 1,
    "shuffle_caption": False,
    "keep_tokens": 0,
    "keep_tokens_separator": None,
    "caption_separator": ",",
    "secondary_separator": None,
    "caption_prefix": None,
    "caption_suffix": None,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "caption_extension": ".caption",
    "class_tokens": None,
    "flip_aug": False,
    "random_crop": False,
    "color_aug": False,
    "alpha_mask": False,
    "is_reg": False,
}
_DATASET_DEFAULTS: dict[str, Any] = {
    "resolution": None,
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "validation_split": 0.0,
    "validation_seed": None,
}


class TrainingError(YokaiError):
    """Training failed; the message says how (for kohya: the last lines of its output)."""


# --------------------------------------------------------------------------------------------
# kohya config files
# --------------------------------------------------------------------------------------------


def read_training_args(config_file: str | Path) -> dict[str, Any]:
    """Read a kohya training-args TOML: section names are ignored, all keys merge flat.

    Args:
        config_file: the ``--config_file`` TOML of train_network.py.

    Returns:
        The flat key -> value mapping (values keep their TOML types, as kohya does).
    """
    path = Path(config_file)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BadInputError(path, "training config file not found") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(path, f"not a valid TOML file: {exc}") from exc
    flat: dict[str, Any] = {}
    for key, value in data.items():
        # kohya (read_config_from_file) flattens one level of sections.
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def resolve_config_path(value: str | Path, config_file: str | Path) -> Path:
    """A path from a kohya config: absolute as is; relative to the config's folder if it exists there.

    kohya resolves relative paths against its working directory; our packager writes absolute
    paths, and a relative one most often means "next to the config".
    """
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    beside = Path(config_file).resolve().parent / p
    return beside if beside.exists() else p.resolve()


def _typed(args: dict[str, Any], key: str, kind: type, default: Any, source: Path) -> Any:
    value = args.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadInputError(source, f"{key} must be {kind.__name__}, got {value!r}")
    return value


def _resolution(value: Any, source: Path) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str) and re.fullmatch(r"\d+(,\d+)?", value.replace(" ", "")):
        parts = [int(v) for v in value.replace(" ", "").split(",")]
        return (parts[0], parts[-1])
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise BadInputError(source, f"resolution must be an int or [width, height], got {value!r}")


# --------------------------------------------------------------------------------------------
# Dataset: listing, split, buckets, captions (pure, no pixels)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainItem:
    """One image of a subset, with its caption and bucket."""

    path: Path
    caption: str
    subset: int
    bucket: tuple[int, int]
    resized: tuple[int, int]
    repeats: int = 1


@dataclass
class SubsetSpec:
    image_dir: Path
    params: dict[str, Any]


@dataclass
class DatasetSpec:
    """One kohya ``[[datasets]]`` entry, resolved."""

    resolution: tuple[int, int]
    batch_size: int
    params: dict[str, Any]
    subsets: list[SubsetSpec]
    train: list[TrainItem] = field(default_factory=list)
    validation: list[TrainItem] = field(default_factory=list)


def read_dataset_config(args: dict[str, Any], config_file: str | Path) -> list[DatasetSpec]:
    """Resolve the datasets of a training config as kohya's BlueprintGenerator does.

    With ``dataset_config`` the dataset TOML is read and every parameter falls back
    subset > dataset > general > training args > kohya default; without it ``train_data_dir``
    is read by the ``{repeats}_{class tokens}`` folder convention.

    Args:
        args: flat training args (:func:`read_training_args`).
        config_file: the training-args TOML (names the file in errors, anchors relative paths).

    Returns:
        Datasets with their subsets (images are listed by :func:`list_dataset_images`).
    """
    config_file = Path(config_file)
    fallback = {k: v for k, v in args.items() if v is not None}
    # kohya maps these argparse names onto dataset keys (config_util ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME).
    if args.get("train_batch_size") is not None:
        fallback["batch_size"] = args["train_batch_size"]
    if args.get("dataset_repeats") is not None:
        fallback["num_repeats"] = args["dataset_repeats"]
    if args.get("dataset_config"):
        ds_path = resolve_config_path(args["dataset_config"], config_file)
        try:
            user = tomllib.loads(ds_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise BadInputError(ds_path, "dataset config file not found") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInputError(ds_path, f"not a valid TOML file: {exc}") from exc
        general = user.get("general", {})
        datasets_cfg = user.get("datasets", [])
        if not datasets_cfg:
            raise BadInputError(ds_path, "no [[datasets]] entries")
        source = ds_path
    else:
        if not args.get("train_data_dir"):
            raise BadInputError(config_file, "neither dataset_config nor train_data_dir is set")
        general = {}
        datasets_cfg = [
            {"subsets": _subsets_from_folders(resolve_config_path(args["train_data_dir"], config_file))}
        ]
        source = config_file

    specs = []
    for i, ds in enumerate(datasets_cfg):
        subsets_cfg = ds.get("subsets", [])
        if not subsets_cfg:
            raise BadInputError(source, f"dataset {i} has no [[datasets.subsets]]")
        layers = [ds, general, fallback]
        dparams = {k: _lookup(k, layers, d) for k, d in _DATASET_DEFAULTS.items()}
        if dparams["resolution"] is None:
            raise BadInputError(source, f"dataset {i}: resolution is not set (kohya asserts at start)")
        if not 0.0 <= float(dparams["validation_split"]) < 1.0:
            raise BadInputError(source, f"dataset {i}: validation_split must be in [0, 1)")
        if dparams["validation_seed"] is None:
            dparams["validation_seed"] = args.get("validation_seed", args.get("seed"))
        subsets = []
        for sub in subsets_cfg:
            if "image_dir" not in sub:
                raise BadInputError(source, f"dataset {i}: a subset has no image_dir")
            sparams = {k: _lookup(k, [sub, *layers], d) for k, d in _SUBSET_DEFAULTS.items()}
            subsets.append(SubsetSpec(resolve_config_path(sub["image_dir"], source), sparams))
        specs.append(
            DatasetSpec(
                resolution=_resolution(dparams["resolution"], source),
                batch_size=int(dparams["batch_size"]),
                params=dparams,
                subsets=subsets,
            )
        )
    return specs


def _lookup(key: str, layers: list[dict[str, Any]], default: Any) -> Any:
    for layer in layers:
        if key in layer and layer[key] is not None:
            return layer[key]
    return default


def _subsets_from_folders(train_data_dir: Path) -> list[dict[str, Any]]:
    """kohya's folder convention: immediate subfolders named ``{repeats}_{class tokens}``."""
    if not train_data_dir.is_dir():
        raise BadInputError(train_data_dir, "train_data_dir is not a folder")
    subsets = []
    for sub in sorted(p for p in train_data_dir.iterdir() if p.is_dir()):
        head, _, tokens = sub.name.partition("_")
        if not head.isdigit() or int(head) < 1:
            log.warning("ignore directory without repeats: %s", sub)
            continue
        subsets.append({"image_dir": str(sub), "num_repeats": int(head), "class_tokens": tokens or None})
    return subsets


def glob_images(folder: Path) -> list[Path]:
    """Images directly in ``folder``, sorted by path (kohya's glob_images)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def split_train_val(
    paths: list[Path], validation_split: float, seed: int | None, *, training: bool
) -> list[Path]:
    """kohya's split_train_val: shuffle with ``random.seed(seed)``, train = first ceil((1-s)n)."""
    items = list(paths)
    random.Random(seed).shuffle(items)
    if training:
        return items[: math.ceil(len(items) * (1 - validation_split))]
    return items[len(items) - round(len(items) * validation_split) :]


def read_caption(image_path: Path, caption_extension: str) -> str | None:
    """First line of ``<stem><caption_extension>``; None when the file is missing (kohya's read_caption)."""
    cap = image_path.with_name(image_path.stem + caption_extension)
    if not cap.is_file():
        return None
    try:
        lines = cap.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise BadInputError(cap, "caption is not UTF-8") from exc
    if not lines:
        raise BadInputError(cap, "caption file is empty")
    return lines[0].strip()


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """kohya's bucket list: every (w, h) on the step grid with area <= max area."""
    max_area = max_reso[0] * max_reso[1]
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)  # type: ignore[arg-type]


def select_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Bucket with the nearest aspect ratio and the size the image is resized to before its centre crop."""
    w, h = size
    ar = w / h
    if (w, h) in buckets:
        reso = (w, h)
    else:
        reso = min(buckets, key=lambda r: abs(r[0] / r[1] - ar))
    scale = reso[1] / h if ar > reso[0] / reso[1] else reso[0] / w
    return reso, (int(w * scale + 0.5), int(h * scale + 0.5))


def list_dataset_images(specs: list[DatasetSpec]) -> list[DatasetSpec]:
    """Fill each dataset's train / validation items: listing, split, captions, buckets.

    A missing or unreadable image is reported (BadInputError naming it) only when it is the only
    image; otherwise it is skipped with a warning so one bad file never loses the rest.
    """
    from PIL import Image

    for spec in specs:
        p = spec.params
        if p["enable_bucket"]:
            if p["bucket_no_upscale"]:
                log.warning("bucket_no_upscale is approximated by upscaling buckets in the built-in trainer")
            buckets = make_bucket_resolutions(
                spec.resolution,
                int(p["min_bucket_reso"]),
                int(p["max_bucket_reso"]),
                int(p["bucket_reso_steps"]),
            )
        else:
            buckets = [spec.resolution]
        split = float(p["validation_split"])
        for si, sub in enumerate(spec.subsets):
            sp = sub.params
            repeats = int(sp["num_repeats"])
            if repeats < 1:
                log.warning("ignore subset with num_repeats < 1: %s", sub.image_dir)
                continue
            if not sub.image_dir.is_dir():
                log.warning("not a directory: %s", sub.image_dir)
                continue
            paths = glob_images(sub.image_dir)
            if split > 0 and not sp["is_reg"]:
                train_paths = split_train_val(paths, split, p["validation_seed"], training=True)
                val_paths = split_train_val(paths, split, p["validation_seed"], training=False)
            else:
                train_paths, val_paths = paths, []
            for paths_, target, reps in ((train_paths, spec.train, repeats), (val_paths, spec.validation, 1)):
                for path in paths_:
                    try:
                        with Image.open(path) as im:
                            size = im.size
                    except OSError as exc:
                        log.warning("skipping unreadable image %s: %s", path, exc)
                        continue
                    caption = read_caption(path, sp["caption_extension"])
                    if caption is None:
                        caption = sp["class_tokens"] or ""
                        log.warning("no caption file for %s; using %r", path, caption)
                    bucket, resized = select_bucket(size, buckets)
                    target.append(TrainItem(path, caption, si, bucket, resized, reps))
    if not any(spec.train for spec in specs):
        first = specs[0].subsets[0].image_dir if specs and specs[0].subsets else Path(".")
        raise BadInputError(first, "no training images found in any subset")
    return specs


def process_caption(caption: str, params: dict[str, Any], rng: random.Random, epoch: int = 1) -> str:
    """kohya's process_caption: prefix/suffix, caption dropout, keep_tokens + shuffle, tag dropout."""
    if params.get("caption_prefix"):
        caption = params["caption_prefix"] + " " + caption
    if params.get("caption_suffix"):
        caption = caption + " " + params["caption_suffix"]
    rate = float(params.get("caption_dropout_rate") or 0.0)
    every = int(params.get("caption_dropout_every_n_epochs") or 0)
    if (rate > 0 and rng.random() < rate) or (every > 0 and epoch % every == 0):
        return ""
    caption = caption.split("\n")[0]
    sep = params.get("caption_separator") or ","
    tag_drop = float(params.get("caption_tag_dropout_rate") or 0.0)
    if params.get("shuffle_caption") or tag_drop > 0:
        fixed: list[str] = []
        suffix: list[str] = []
        kts = params.get("keep_tokens_separator")
        if kts and kts in caption:
            fixed_part, flex_part = caption.split(kts, 1)
            if kts in flex_part:
                flex_part, suffix_part = flex_part.split(kts, 1)
                suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
            fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            flex = [t.strip() for t in caption.strip().split(sep)]
            keep = int(params.get("keep_tokens") or 0)
            if keep > 0:
                fixed, flex = flex[:keep], flex[keep:]
        if params.get("shuffle_caption"):
            rng.shuffle(flex)
        if tag_drop > 0:
            flex = [t for t in flex if rng.random() >= tag_drop]
        caption = ", ".join(fixed + flex + suffix)
    if params.get("secondary_separator"):
        caption = caption.replace(params["secondary_separator"], sep)
    return caption


def plan_epoch(specs: list[DatasetSpec], seed: int, epoch: int) -> list[tuple[int, list[TrainItem]]]:
    """The batches of one epoch: per dataset and bucket, items x repeats shuffled and chunked; all
    batches shuffled together (kohya's BucketManager + DataLoader(shuffle=True)).

    Deterministic in (seed, epoch), so a resumed run replays the same order.
    """
    rng = random.Random(f"{seed}-epoch-{epoch}")
    batches: list[tuple[int, list[TrainItem]]] = []
    for di, spec in enumerate(specs):
        buckets: dict[tuple[int, int], list[TrainItem]] = {}
        for item in spec.train:
            buckets.setdefault(item.bucket, []).extend([item] * item.repeats)
        for reso in sorted(buckets):
            items = buckets[reso]
            rng.shuffle(items)
            for i in range(0, len(items), spec.batch_size):
                batches.append((di, items[i : i + spec.batch_size]))
    rng.shuffle(batches)
    return batches


def plan_validation(specs: list[DatasetSpec]) -> list[tuple[int, list[TrainItem]]]:
    """Validation batches in a fixed order (same batches every epoch, so losses compare)."""
    batches = []
    for di, spec in enumerate(specs):
        buckets: dict[tuple[int, int], list[TrainItem]] = {}
        for item in spec.validation:
            buckets.setdefault(item.bucket, []).append(item)
        for reso in sorted(buckets):
            items = buckets[reso]
            for i in range(0, len(items), spec.batch_size):
                batches.append((di, items[i : i + spec.batch_size]))
    return batches


# --------------------------------------------------------------------------------------------
# Pixels (small pure functions)
# --------------------------------------------------------------------------------------------


def load_training_image(
    path: Path, bucket: tuple[int, int], resized: tuple[int, int], *, alpha_mask: bool, flip: bool = False
) -> tuple[Any, Any]:
    """Load one image as kohya would, resized to cover its bucket and centre-cropped.

    RGBA with ``alpha_mask``: RGB kept as stored, alpha returned as the loss mask.
    RGBA without it: composited onto white (kohya would drop the alpha and train on whatever
    colour lies under transparent pixels; a flat background is what the guide asks for).

    Returns:
        (float32 HxWx3 array in [-1, 1], float32 HxW mask in [0, 1] or None).
    """
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            rgba = im.convert("RGBA") if has_alpha else None
            rgb = im.convert("RGB") if not has_alpha else None
    except OSError as exc:
        raise BadInputError(path, f"cannot read image: {exc}") from exc
    mask_img = None
    if rgba is not None:
        if alpha_mask:
            rgb = rgba.convert("RGB")
            mask_img = rgba.getchannel("A")
        else:
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(bg, rgba).convert("RGB")
    assert rgb is not None
    if rgb.size != resized:
        # Area filter down, Lanczos up (kohya's resize_image defaults).
        down = resized[0] * resized[1] < rgb.size[0] * rgb.size[1]
        method = Image.Resampling.BOX if down else Image.Resampling.LANCZOS
        rgb = rgb.resize(resized, method)
        if mask_img is not None:
            mask_img = mask_img.resize(resized, method)
    left, top = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    box = (left, top, left + bucket[0], top + bucket[1])
    arr = np.asarray(rgb.crop(box), dtype=np.float32) / 127.5 - 1.0
    mask = None
    if alpha_mask:
        mask = (
            np.asarray(mask_img.crop(box), dtype=np.float32) / 255.0
            if mask_img is not None
            else np.ones(arr.shape[:2], np.float32)
        )
    if flip:
        arr = arr[:, ::-1]
        mask = mask[:, ::-1] if mask is not None else None
    return np.ascontiguousarray(arr), (np.ascontiguousarray(mask) if mask is not None else None)


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------


@dataclass
class BaseModel:
    """The pieces of a Stable-Diffusion-1.5-style model the trainer needs."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    name: str
    version: str = "sd_v1"


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the built-in trainer needs diffusers and peft: pip install 'diffusers>=0.42' 'peft>=0.21'"
        ) from exc


def load_base_model(name_or_path: str | Path) -> BaseModel:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise schedule.

    Args:
        name_or_path: a hub id, a local diffusers folder (``model_index.json``), or a single-file
            checkpoint (``.safetensors``; ``.ckpt`` is read by diffusers with weights_only).

    Returns:
        The components in float32 on the CPU.
    """
    _require_diffusers()
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    name = str(name_or_path)
    path = Path(name).expanduser()
    try:
        if path.is_file():
            if path.suffix.lower() not in (".safetensors", ".ckpt"):
                raise BadInputError(path, "a single-file base model must be .safetensors or .ckpt")
            pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None)
            sched = DDPMScheduler.from_config(pipe.scheduler.config)
            return BaseModel(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, sched, name)
        if path.is_dir() and not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise BadInputError(path, "not a diffusers model folder (no model_index.json or unet/)")
        src = str(path) if path.is_dir() else name
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
        try:
            sched = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
        except (OSError, ValueError):
            sched = kohya_noise_scheduler()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load base model {name!r}: {exc}. Set pretrained_model_name_or_path in the training "
            "config or pass --base-model (a hub id, a local diffusers folder or a .safetensors file)."
        ) from exc
    return BaseModel(tokenizer, text_encoder, vae, unet, sched, name)


def kohya_noise_scheduler() -> Any:
    """The DDPM schedule sd-scripts trains SD 1.x with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
    )


# --------------------------------------------------------------------------------------------
# kohya-format LoRA files
# --------------------------------------------------------------------------------------------


def lora_state_dict(unet: Any, text_encoder: Any | None) -> dict[str, Any]:
    """PEFT state dict of the trained adapters, keys prefixed ``unet.`` / ``text_encoder.``."""
    from peft import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    if text_encoder is not None:
        state.update({f"text_encoder.{k}": v for k, v in _adapter_tensors(text_encoder).items()})
    return state


def _adapter_tensors(model: Any) -> dict[str, Any]:
    """LoRA tensors of a module injected with peft.inject_adapter_in_model, adapter name stripped."""
    return {k.replace(".default.", "."): v for k, v in model.state_dict().items() if ".lora_" in k}


def _load_adapter_tensors(model: Any, tensors: dict[str, Any]) -> None:
    own = {k.replace(".default.", "."): k for k in model.state_dict() if ".lora_" in k}
    missing = set(own) - set(tensors)
    if missing:
        raise TrainingError(f"saved state lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict({own[k]: v for k, v in tensors.items() if k in own}, strict=False)


def to_kohya_state_dict(
    peft_state: dict[str, Any], network_alpha: float, version: str = "sd_v1"
) -> dict[str, Any]:
    """Convert a PEFT LoRA state dict to kohya keys (``lora_unet_*``, ``lora_te_*``) with real alphas.

    diffusers' convert_state_dict_to_kohya writes alpha = rank (scale 1); kohya's scale is
    alpha / dim, so the trained network_alpha is written instead.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    # transformers 5 flattened CLIPTextModel (no .text_model); kohya names keep text_model_.
    fixed = {}
    for key, value in peft_state.items():
        if key.startswith("text_encoder.") and not key.startswith("text_encoder.text_model."):
            key = "text_encoder.text_model." + key[len("text_encoder.") :]
        fixed[key] = value
    kohya = convert_state_dict_to_kohya(fixed)
    out = {}
    for key, value in kohya.items():
        if version == "sd_v1" and key.startswith("lora_te1_"):
            # SD 1.x LoRAs name the single text encoder lora_te_ (sd-scripts networks/lora.py).
            key = "lora_te_" + key[len("lora_te1_") :]
        if key.endswith(".alpha"):
            value = torch.tensor(float(network_alpha))
        out[key] = value
    return out


def safetensors_hashes(data: bytes) -> tuple[str, str]:
    """kohya's sshs_model_hash (sha256 of the tensor bytes after the header) and legacy hash."""
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n :]).hexdigest()
    legacy = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


def save_kohya_lora(dest: Path, state: dict[str, Any], metadata: dict[str, Any], save_dtype: Any) -> Path:
    """Write a kohya-format LoRA .safetensors atomically, metadata as strings plus sshs_* hashes."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().to("cpu", dtype=save_dtype).contiguous() for k, v in state.items()}
    meta = {k: ("None" if v is None else str(v)) for k, v in metadata.items()}
    model_hash, legacy_hash = safetensors_hashes(
        st_save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    )
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    return atomic_write_bytes(dest, st_save(tensors, meta))


# --------------------------------------------------------------------------------------------
# Finished marker
# --------------------------------------------------------------------------------------------


def read_finished_marker(output_dir: str | Path) -> dict[str, Any] | None:
    """The ``.finished`` marker of a character's output folder, or None when not finished."""
    path = Path(output_dir) / FINISHED_MARKER
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("ignoring unreadable finished marker %s", path)
        return None
    return data if isinstance(data, dict) else None


def write_finished_marker(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write the ``.finished`` marker (JSON with the final checkpoint) atomically."""
    return atomic_write_json(Path(output_dir) / FINISHED_MARKER, {"finished_at": time.time(), **record})


def encode_prompts(
    tokenizer: Any, text_encoder: Any, prompts: list[str], *, clip_skip: int = 1, device: Any = None
) -> Any:
    """CLIP text embeddings as sd-scripts computes them (clip_skip 2 = penultimate layer + final norm).

    Shared by the trainer and the sampler; diffusers' own clip_skip path expects the pre-5
    transformers CLIPTextModel layout (``.text_model``).
    """
    max_len = getattr(tokenizer, "model_max_length", 77)
    if not isinstance(max_len, int) or max_len > 1000:
        max_len = 77
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
    ).input_ids
    ids = ids.to(device if device is not None else text_encoder.device)
    if clip_skip > 1:
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
    return text_encoder(ids)[0]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class _Settings:
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


def _settings(args: dict[str, Any], src: Path, steps_per_epoch: int) -> _Settings:
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
    return _Settings(
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
    )


def _pick_device(device: str) -> Any:
    import torch

    from yokai_pipeline.runtime import resolve_auto

    return torch.device(resolve_auto(device, torch.cuda.is_available()))


def train_lora_builtin(
    config_file: str | Path,
    *,
    base_model_override: str | None = None,
    max_steps: int | None = None,
    device: str = "auto",
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    resolution: int | None = None,
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

    Returns:
        ``{status: finished|stopped|skipped, checkpoint, global_step, epoch, output_dir, ...}``.
    """
    config_file = Path(config_file)
    args = read_training_args(config_file)
    if not args.get("output_dir"):
        raise BadInputError(config_file, "output_dir is not set")
    output_dir = resolve_config_path(args["output_dir"], config_file)
    marker = read_finished_marker(output_dir)
    if marker is not None:
        return {"status": "skipped", "output_dir": str(output_dir), **marker}
    base = base_model_override or args.get("pretrained_model_name_or_path")
    if not base:
        raise ConfigError(
            f"{config_file}: pretrained_model_name_or_path is not set; set it or pass --base-model"
        )
    model = load_base_model(base)
    return train_lora_with_model(
        config_file, model, max_steps=max_steps, device=device, on_progress=on_progress, resolution=resolution
    )


def train_lora_with_model(
    config_file: str | Path,
    model: BaseModel,
    *,
    max_steps: int | None = None,
    device: str = "auto",
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    resolution: int | None = None,
) -> dict[str, Any]:
    """:func:`train_lora_builtin` with an already loaded base model (benchmarks, tests)."""
    _require_diffusers()
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config_file = Path(config_file)
    args = read_training_args(config_file)
    specs = read_dataset_config(args, config_file)
    if resolution is not None:
        for spec in specs:
            spec.resolution = (resolution, resolution)
            spec.params["enable_bucket"] = False
    specs = list_dataset_images(specs)
    steps_per_epoch = len(plan_epoch(specs, 0, 1))
    st = _settings(args, config_file, steps_per_epoch)
    dev = _pick_device(device)
    st.output_dir.mkdir(parents=True, exist_ok=True)
    marker = read_finished_marker(st.output_dir)
    if marker is not None:
        return {"status": "skipped", "output_dir": str(st.output_dir), **marker}

    use_amp = dev.type == "cuda" and st.mixed_precision in ("bf16", "fp16")
    weight_dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(st.mixed_precision, torch.float32)
        if use_amp
        else torch.float32
    )
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(st.save_dtype_name, torch.float32)

    tokenizer, text_encoder, vae, unet, sched = (
        model.tokenizer,
        model.text_encoder,
        model.vae,
        model.unet,
        model.noise_scheduler,
    )
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False)
    # Frozen weights in the compute dtype, LoRA weights in fp32 (diffusers' LoRA scripts do the same).
    for m in (unet, vae, text_encoder):
        m.to(dev)
        if weight_dtype != torch.float32:
            m.to(dtype=weight_dtype)
    torch.manual_seed(st.seed)
    if "default" not in getattr(unet, "peft_config", {}):
        unet.add_adapter(
            LoraConfig(r=st.network_dim, lora_alpha=st.network_alpha, target_modules=UNET_TARGETS)
        )
    te_lora = None
    if st.train_te:
        if not _adapter_tensors(text_encoder):
            # peft directly: transformers' add_adapter demands a newer peft than diffusers needs.
            inject_adapter_in_model(
                LoraConfig(
                    r=st.network_dim, lora_alpha=st.network_alpha, target_modules=TEXT_ENCODER_TARGETS
                ),
                text_encoder,
            )
        te_lora = text_encoder
    trained = [unet] + ([text_encoder] if te_lora is not None else [])
    cast_training_params(trained, dtype=torch.float32)
    if st.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if te_lora is not None:
            # Non-reentrant: frozen embeddings give inputs without grad, which reentrant checkpointing drops.
            te_ckpt = getattr(text_encoder, "activation_checkpointing_enable", None)  # transformers >= 5.2x
            if te_ckpt is not None:
                te_ckpt(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
    unet.train()
    text_encoder.train(te_lora is not None)
    vae.eval()

    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": st.unet_lr}]
    if te_lora is not None:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": st.te_lr})
    if st.optimizer_type.lower() not in ("adamw", "adamw8bit"):
        log.warning(
            "optimizer_type %s is not supported by the built-in trainer; using AdamW", st.optimizer_type
        )
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    lr_sched = get_scheduler(
        st.lr_scheduler, optimizer, num_warmup_steps=st.lr_warmup_steps, num_training_steps=st.max_train_steps
    )
    scaler = torch.amp.GradScaler("cuda") if use_amp and weight_dtype == torch.float16 else None

    # ---- resume ----
    state_dir = st.output_dir / f"{st.output_name}-builtin-state"
    history: list[dict[str, Any]] = []
    global_step, start_epoch, skip_batches = 0, 1, 0
    started_at = time.time()
    session_id = random.randint(0, 2**32)
    resumed_from = None
    if (state_dir / "train_state.json").is_file():
        ts = read_json(state_dir / "train_state.json")
        from safetensors.torch import load_file

        lora = load_file(str(state_dir / "lora.safetensors"))
        set_peft_model_state_dict(unet, {k[5:]: v for k, v in lora.items() if k.startswith("unet.")})
        if te_lora is not None:
            _load_adapter_tensors(
                text_encoder, {k[13:]: v for k, v in lora.items() if k.startswith("text_encoder.")}
            )
        optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location=dev, weights_only=True))
        lr_sched.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=True))
        if scaler is not None and (state_dir / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(state_dir / "scaler.pt", weights_only=True))
        global_step, start_epoch, skip_batches = ts["global_step"], ts["epoch"], ts["step_in_epoch"]
        history = ts.get("history", [])
        started_at, session_id = ts.get("training_started_at", started_at), ts.get("session_id", session_id)
        resumed_from = global_step
        log.info("resuming %s from step %d (epoch %d)", st.output_name, global_step, start_epoch)

    writer = _summary_writer(st.logging_dir, st.output_name)
    metadata = _metadata(args, st, specs, model, steps_per_epoch, started_at, session_id)
    write_args = {
        "config_file": str(config_file),
        "base_model": model.name,
        "resolved": st.__dict__,
        "args": args,
    }
    atomic_write_json(st.output_dir / f"{st.output_name}_builtin_args.json", write_args)

    latent_cache: dict[tuple[str, bool], Any] = {}
    augmenting = any(
        s.params["flip_aug"] or s.params["random_crop"] or s.params["color_aug"]
        for d in specs
        for s in d.subsets
    )
    if st.cache_latents and augmenting:
        log.warning("cache_latents with flip/crop/colour augmentation: latents are not cached")
    cache_ok = st.cache_latents and not augmenting
    amp = torch.autocast(device_type="cuda", dtype=weight_dtype) if use_amp else contextlib.nullcontext()

    def load_batch(di: int, items: list[TrainItem], epoch: int, training: bool, pos: int) -> dict[str, Any]:
        spec = specs[di]
        pix, masks, caps = [], [], []
        for j, item in enumerate(items):
            sp = spec.subsets[item.subset].params
            rng = random.Random(f"{st.seed}-{epoch}-{pos}-{j}")
            flip = training and sp["flip_aug"] and rng.random() < 0.5
            use_mask = bool(sp["alpha_mask"]) and st.masked_loss
            arr, mask = load_training_image(
                item.path, item.bucket, item.resized, alpha_mask=use_mask, flip=flip
            )
            pix.append(arr)
            masks.append(mask if mask is not None else np.ones(arr.shape[:2], np.float32))
            caps.append(process_caption(item.caption, sp, rng, epoch) if training else item.caption)
        return {
            "pixels": torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2),
            "masks": torch.from_numpy(np.stack(masks))[:, None],
            "has_mask": any(spec.subsets[i.subset].params["alpha_mask"] for i in items) and st.masked_loss,
            "captions": caps,
            "keys": [(str(i.path), False) for i in items],
        }

    def encode_text(captions: list[str]) -> Any:
        return encode_prompts(tokenizer, text_encoder, captions, clip_skip=st.clip_skip, device=dev)

    def encode_latents(batch: dict[str, Any], gen: Any) -> Any:
        keys = batch["keys"]
        if cache_ok and all(k in latent_cache for k in keys):
            return torch.stack([latent_cache[k] for k in keys]).to(dev)
        with torch.no_grad():
            pixels = batch["pixels"].to(dev, dtype=weight_dtype)
            if cache_ok:
                # One image at a time: a cached latent must not depend on which batch first encoded it.
                dists = [vae.encode(pixels[i : i + 1]).latent_dist for i in range(len(keys))]
                mean = torch.cat([d.mean for d in dists])
                std = torch.cat([d.std for d in dists])
            else:
                dist = vae.encode(pixels).latent_dist
                mean, std = dist.mean, dist.std
            if cache_ok:
                # Cached latents are drawn per image (seeded by its path), not from the step's generator,
                # so a resumed run (empty cache) reproduces the same latents and the same noise.
                eps = torch.stack(
                    [
                        torch.randn(
                            mean.shape[1:],
                            generator=torch.Generator().manual_seed(_path_seed(st.seed, k[0])),
                        )
                        for k in keys
                    ]
                )
            else:
                eps = torch.randn(mean.shape, generator=gen)
            eps = eps.to(dev, dtype=mean.dtype)
            latents = (mean + std * eps) * vae.config.scaling_factor
        if cache_ok:
            for k, lat in zip(keys, latents, strict=True):
                latent_cache[k] = lat.detach().cpu()
        return latents

    def batch_loss(batch: dict[str, Any], gen: Any, timesteps: Any | None = None) -> Any:
        latents = encode_latents(batch, gen).float()
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen)
        if st.noise_offset:
            noise = noise + st.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=gen)
        noise = noise.to(dev)
        if timesteps is None:
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        timesteps = timesteps.to(dev).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        with amp:
            # A frozen text encoder needs no autograd graph.
            with torch.no_grad() if te_lora is None else contextlib.nullcontext():
                hidden = encode_text(batch["captions"])
            pred = unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype)).sample
        target = sched.get_velocity(latents, noise, timesteps) if st.v_parameterization else noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        if batch["has_mask"]:
            mask = F.interpolate(batch["masks"].to(dev, torch.float32), size=loss.shape[2:], mode="area")
            loss = loss * mask
        loss = loss.mean([1, 2, 3])
        if st.min_snr_gamma:
            snr = compute_snr(sched, timesteps)
            loss = loss * torch.clamp(snr, max=st.min_snr_gamma) / snr
        return loss.mean()

    val_batches = plan_validation(specs)
    n_t = sched.config.num_train_timesteps
    val_timesteps = [int(t) for t in np.linspace(0, n_t, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]]
    vseed = specs[0].params["validation_seed"] if specs[0].params["validation_seed"] is not None else st.seed

    def validate() -> float | None:
        if not val_batches:
            return None
        unet.eval()
        text_encoder.eval()
        gen = torch.Generator().manual_seed(int(vseed))
        losses = []
        with torch.no_grad():
            for vi, (di, items) in enumerate(val_batches):
                batch = load_batch(di, items, 0, False, vi)
                for t in val_timesteps:
                    losses.append(float(batch_loss(batch, gen, torch.full((len(items),), t))))
        unet.train()
        text_encoder.train(te_lora is not None)
        return float(np.mean(losses))

    def save_state(epoch: int, step_in_epoch: int) -> None:
        from safetensors.torch import save as st_save

        tmp = st.output_dir / f".tmp-{state_dir.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lora = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(unet, te_lora).items()}
        atomic_write_bytes(tmp / "lora.safetensors", st_save(lora))
        for name, obj in (("optimizer.pt", optimizer), ("scheduler.pt", lr_sched), ("scaler.pt", scaler)):
            if obj is not None:
                buf = io.BytesIO()
                torch.save(obj.state_dict(), buf)
                atomic_write_bytes(tmp / name, buf.getvalue())
        atomic_write_json(
            tmp / "train_state.json",
            {
                "global_step": global_step,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "history": history,
                "training_started_at": started_at,
                "session_id": session_id,
            },
        )
        old = st.output_dir / f".tmp-old-{state_dir.name}"
        shutil.rmtree(old, ignore_errors=True)
        if state_dir.exists():
            os.replace(state_dir, old)
        os.replace(tmp, state_dir)
        shutil.rmtree(old, ignore_errors=True)

    def save_lora(name: str, epoch: int) -> Path:
        meta = {
            **metadata,
            "ss_epoch": epoch,
            "ss_steps": global_step,
            "ss_training_finished_at": time.time(),
        }
        state = to_kohya_state_dict(lora_state_dict(unet, te_lora), st.network_alpha, model.version)
        return save_kohya_lora(st.output_dir / f"{name}.safetensors", state, meta, save_dtype)

    def write_validation() -> None:
        scored = [h for h in history if h.get("val_loss") is not None]
        best = min(scored, key=lambda h: h["val_loss"])["epoch"] if scored else None
        atomic_write_json(
            st.output_dir / VALIDATION_FILE,
            {
                "output_name": st.output_name,
                "timesteps": val_timesteps,
                "epochs": history,
                "best_epoch": best,
            },
        )

    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="yokai-train-io")
    checkpoint: Path | None = None
    status = "finished"
    recent: list[float] = []
    t0 = time.time()
    try:
        for epoch in range(start_epoch, st.epochs + 1):
            batches = plan_epoch(specs, st.seed, epoch)
            epoch_losses: list[float] = []
            first = skip_batches if epoch == start_epoch else 0
            nxt = (
                pool.submit(load_batch, *batches[first], epoch, True, first) if first < len(batches) else None
            )
            for pos in range(first, len(batches)):
                if global_step >= st.max_train_steps:
                    break
                if max_steps is not None and global_step >= max_steps:
                    status = "stopped"
                    break
                assert nxt is not None
                batch = nxt.result()
                nxt = (
                    pool.submit(load_batch, *batches[pos + 1], epoch, True, pos + 1)
                    if pos + 1 < len(batches)
                    else None
                )
                gen = torch.Generator().manual_seed(st.seed * 1_000_003 + global_step)
                loss = batch_loss(batch, gen)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                params = [p for g in optimizer.param_groups for p in g["params"]]
                if st.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, st.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"{config_file}: loss became {value} at step {global_step}")
                epoch_losses.append(value)
                recent = (recent + [value])[-steps_per_epoch:]
                if writer is not None:
                    writer.add_scalar("loss/current", value, global_step)
                    writer.add_scalar("loss/average", float(np.mean(recent)), global_step)
                if on_progress:
                    on_progress(
                        {
                            "step": global_step,
                            "total_steps": st.max_train_steps,
                            "epoch": epoch,
                            "total_epochs": st.epochs,
                            "loss": float(np.mean(recent)),
                        }
                    )
            if nxt is not None:
                nxt.cancel()
            if status == "stopped":
                save_state(epoch, pos)
                checkpoint = save_lora(f"{st.output_name}-step{global_step:08d}", epoch)
                break
            # ---- end of epoch ----
            val = validate()
            last = epoch == st.epochs or global_step >= st.max_train_steps
            name = st.output_name if last else f"{st.output_name}-{epoch:06d}"
            ckpt = None
            if last or (st.save_every_n_epochs and epoch % st.save_every_n_epochs == 0):
                ckpt = save_lora(name, epoch)
                checkpoint = ckpt
            history = [h for h in history if h["epoch"] != epoch]
            history.append(
                {
                    "epoch": epoch,
                    "step": global_step,
                    "val_loss": val,
                    "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                    "checkpoint": ckpt.name if ckpt else None,
                }
            )
            write_validation()
            if writer is not None and val is not None:
                writer.add_scalar("loss/validation/epoch_average", val, epoch)
                writer.add_scalar("loss/epoch", history[-1]["train_loss"] or 0.0, epoch)
            save_state(epoch + 1, 0)
            if on_progress:
                on_progress(
                    {
                        "step": global_step,
                        "total_steps": st.max_train_steps,
                        "epoch": epoch,
                        "total_epochs": st.epochs,
                        "loss": float(np.mean(recent)) if recent else None,
                        "val_loss": val,
                    }
                )
            if last:
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if writer is not None:
            writer.close()

    scored = [h for h in history if h.get("val_loss") is not None]
    result = {
        "status": status,
        "backend": "builtin",
        "output_dir": str(st.output_dir),
        "output_name": st.output_name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "global_step": global_step,
        "total_steps": st.max_train_steps,
        "epoch": history[-1]["epoch"] if history else start_epoch,
        "resumed_from_step": resumed_from,
        "best_epoch": min(scored, key=lambda h: h["val_loss"])["epoch"] if scored else None,
        "validation_file": str(st.output_dir / VALIDATION_FILE),
        "seconds": time.time() - t0,
        "device": str(dev),
    }
    if status == "finished":
        write_finished_marker(
            st.output_dir, {k: result[k] for k in ("checkpoint", "backend", "global_step", "best_epoch")}
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


def _metadata(
    args: dict[str, Any],
    st: _Settings,
    specs: list[DatasetSpec],
    model: BaseModel,
    steps_per_epoch: int,
    started_at: float,
    session_id: int,
) -> dict[str, Any]:
    """The ss_* metadata sd-scripts writes into a LoRA (names and meanings as in train_network.py)."""
    from collections import Counter

    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, dict[str, int]] = {}
    for spec in specs:
        for si, sub in enumerate(spec.subsets):
            items = [i for i in spec.train if i.subset == si]
            dirs[sub.image_dir.name] = {"n_repeats": int(sub.params["num_repeats"]), "img_count": len(items)}
            counter: Counter[str] = Counter()
            for i in items:
                counter.update(t.strip() for t in i.caption.split(",") if t.strip())
            tags[sub.image_dir.name] = dict(counter)
    reso = specs[0].resolution
    return {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_output_name": st.output_name,
        "ss_learning_rate": args.get("learning_rate"),
        "ss_text_encoder_lr": st.te_lr if st.train_te else None,
        "ss_unet_lr": st.unet_lr,
        "ss_num_train_images": sum(i.repeats for s in specs for i in s.train),
        "ss_num_validation_images": sum(len(s.validation) for s in specs),
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": steps_per_epoch,
        "ss_num_epochs": st.epochs,
        "ss_gradient_checkpointing": st.gradient_checkpointing,
        "ss_gradient_accumulation_steps": 1,
        "ss_max_train_steps": st.max_train_steps,
        "ss_lr_warmup_steps": st.lr_warmup_steps,
        "ss_lr_scheduler": st.lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": st.network_dim,
        "ss_network_alpha": st.network_alpha,
        "ss_network_train_unet_only": not st.train_te,
        "ss_mixed_precision": st.mixed_precision,
        "ss_v2": False,
        "ss_base_model_version": model.version,
        "ss_clip_skip": st.clip_skip if st.clip_skip > 1 else None,
        "ss_resolution": f"({reso[0]}, {reso[1]})",
        "ss_seed": st.seed,
        "ss_noise_offset": st.noise_offset or None,
        "ss_min_snr_gamma": st.min_snr_gamma or None,
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_max_grad_norm": st.max_grad_norm,
        "ss_sd_model_name": os.path.basename(str(model.name)),
        "ss_validation_seed": specs[0].params["validation_seed"],
        "ss_validation_split": specs[0].params["validation_split"],
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_tag_frequency": json.dumps(tags),
        "ss_training_comment": "trained by yokai_pipeline built-in trainer (diffusers + peft)",
    }


# --------------------------------------------------------------------------------------------
# Tiny random model (demo, tests, CPU benchmark)
# --------------------------------------------------------------------------------------------


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
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
    vae = AutoencoderKL(
        block_out_channels=[min(8, block_out_channels[0]), min(16, block_out_channels[1])],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=min(8, block_out_channels[0]),
    )
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
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
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
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(dest), safe_serialization=True)
    return dest
