"""Test helper: kohya sd-scripts' real rules, written independently of the product code.

Key sets and types mirror ``library/config_util.py`` (ConfigSanitizer, kohya-ss/sd-scripts main,
2026-02) for DreamBooth-style datasets, the argparse types of ``train_util.py`` /
``train_network.py``, and the folder rules of ``generate_dreambooth_subsets_config_by_subdirs``.
Every function returns a list of problems (empty = kohya accepts it).
"""

from __future__ import annotations

import glob
import math
import os
import random
import tomllib
from pathlib import Path
from typing import Any

PAIR_FLOAT = "pair[float]"
INT_OR_PAIR = "int|pair[int]"
NUMBER = "float|int"

SUBSET_ASCENDABLE = {
    "color_aug": bool,
    "face_crop_aug_range": PAIR_FLOAT,
    "flip_aug": bool,
    "num_repeats": int,
    "random_crop": bool,
    "shuffle_caption": bool,
    "keep_tokens": int,
    "keep_tokens_separator": str,
    "secondary_separator": str,
    "caption_separator": str,
    "enable_wildcard": bool,
    "token_warmup_min": int,
    "token_warmup_step": NUMBER,
    "caption_prefix": str,
    "caption_suffix": str,
    "custom_attributes": dict,
    "resize_interpolation": str,
}
DROPOUT_ASCENDABLE = {
    "caption_dropout_every_n_epochs": int,
    "caption_dropout_rate": NUMBER,
    "caption_tag_dropout_rate": NUMBER,
}
DB_SUBSET_ASCENDABLE = {"caption_extension": str, "class_tokens": str, "cache_info": bool}
DB_SUBSET_ONLY = {"image_dir": str, "is_reg": bool, "alpha_mask": bool}
DATASET_ASCENDABLE = {
    "batch_size": int,
    "bucket_no_upscale": bool,
    "bucket_reso_steps": int,
    "enable_bucket": bool,
    "max_bucket_reso": int,
    "min_bucket_reso": int,
    "validation_seed": int,
    "validation_split": float,
    "resolution": INT_OR_PAIR,
    "network_multiplier": float,
    "resize_interpolation": str,
}
SUBSET_KEYS = {**SUBSET_ASCENDABLE, **DROPOUT_ASCENDABLE, **DB_SUBSET_ASCENDABLE, **DB_SUBSET_ONLY}
DATASET_KEYS = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DROPOUT_ASCENDABLE, **DB_SUBSET_ASCENDABLE}
GENERAL_KEYS = dict(DATASET_KEYS)

# argparse types of train_network.py arguments we may write (store_true flags are bool).
TRAIN_ARG_TYPES: dict[str, Any] = {
    "pretrained_model_name_or_path": str,
    "output_dir": str,
    "output_name": str,
    "save_model_as": str,
    "save_precision": str,
    "save_every_n_epochs": int,
    "max_train_epochs": int,
    "max_train_steps": int,
    "train_batch_size": int,
    "learning_rate": float,
    "unet_lr": float,
    "text_encoder_lr": float,
    "optimizer_type": str,
    "lr_scheduler": str,
    "lr_warmup_steps": NUMBER,
    "network_module": str,
    "network_dim": int,
    "network_alpha": float,
    "network_args": list,
    "network_train_unet_only": bool,
    "mixed_precision": str,
    "gradient_checkpointing": bool,
    "noise_offset": float,
    "min_snr_gamma": float,
    "seed": int,
    "clip_skip": int,
    "logging_dir": str,
    "log_with": str,
    "sample_prompts": str,
    "sample_every_n_epochs": int,
    "sample_sampler": str,
    "cache_latents": bool,
    "cache_latents_to_disk": bool,
    "dataset_config": str,
    "masked_loss": bool,
    "alpha_mask": bool,
    "validation_split": float,
    "validation_seed": int,
    "validate_every_n_epochs": int,
    "max_validation_steps": int,
    "train_data_dir": str,
    "resolution": str,
    "caption_extension": str,
    "enable_bucket": bool,
    "bucket_no_upscale": bool,
    "color_aug": bool,
    "random_crop": bool,
    "flip_aug": bool,
    "keep_tokens": int,
    "no_half_vae": bool,
    "cache_text_encoder_outputs": bool,
    "cache_text_encoder_outputs_to_disk": bool,
    "v_parameterization": bool,
}

# Every option train_network.py's parser defines (pinned from kohya-ss/sd-scripts 48d368fa, 2026-02-16:
# the add_argument names of setup_parser and the add_*_arguments helpers it calls). A key outside
# this set is kept silently by sd-scripts and never used.
TRAIN_NETWORK_OPTIONS = frozenset(
    """
    adaptive_noise_scale alpha_mask async_upload base_weights base_weights_multiplier bucket_no_upscale
    bucket_reso_steps cache_info cache_latents cache_latents_to_disk caption_dropout_every_n_epochs
    caption_dropout_rate caption_extension caption_extention caption_prefix caption_separator
    caption_suffix caption_tag_dropout_rate clip_skip color_aug conditioning_data_dir config_file
    console_log_file console_log_level console_log_simple cpu_offload_checkpointing dataset_class
    dataset_config dataset_repeats ddp_gradient_as_bucket_view ddp_static_graph ddp_timeout
    debiased_estimation_loss debug_dataset deepspeed dim_from_weights dynamo_backend enable_bucket
    enable_wildcard face_crop_aug_range flip_aug fp16_master_weights_and_gradients fp8_base
    fp8_base_unet full_bf16 full_fp16 fused_backward_pass gradient_accumulation_steps
    gradient_checkpointing highvram huber_c huber_scale huber_schedule huggingface_path_in_repo
    huggingface_repo_id huggingface_repo_type huggingface_repo_visibility huggingface_token in_json
    initial_epoch initial_step ip_noise_gamma ip_noise_gamma_random_strength keep_tokens
    keep_tokens_separator learning_rate log_config log_prefix log_tracker_config log_tracker_name
    log_with logging_dir loss_type lowram lr_decay_steps lr_scheduler lr_scheduler_args
    lr_scheduler_min_lr_ratio lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_timescale
    lr_scheduler_type lr_warmup_steps masked_loss max_bucket_reso max_data_loader_n_workers
    max_grad_norm max_timestep max_token_length max_train_epochs max_train_steps max_validation_steps
    mem_eff_attn metadata_author metadata_description metadata_is_negative_embedding metadata_license
    metadata_merged_from metadata_preprocessor metadata_tags metadata_thumbnail metadata_title
    metadata_trigger_phrase metadata_usage_hint min_bucket_reso min_snr_gamma min_timestep
    mixed_precision multires_noise_discount multires_noise_iterations network_alpha network_args
    network_dim network_dropout network_module network_train_text_encoder_only network_train_unet_only
    network_weights no_half_vae no_metadata noise_offset noise_offset_random_strength
    offload_optimizer_device offload_optimizer_nvme_path offload_param_device offload_param_nvme_path
    optimizer_args optimizer_type output_config output_dir output_name persistent_data_loader_workers
    pretrained_model_name_or_path prior_loss_weight random_crop reg_data_dir resize_interpolation
    resolution resume resume_from_huggingface sample_at_first sample_every_n_epochs sample_every_n_steps
    sample_prompts sample_sampler save_every_n_epochs save_every_n_steps save_last_n_epochs
    save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_model_as save_n_epoch_ratio
    save_precision save_state save_state_on_train_end save_state_to_huggingface
    scale_v_pred_loss_like_noise_pred scale_weight_norms sdpa secondary_separator seed shuffle_caption
    skip_cache_check skip_until_initial_step text_encoder_lr token_warmup_min token_warmup_step
    tokenizer_cache_dir torch_compile train_batch_size train_data_dir training_comment unet_lr
    use_8bit_adam use_lion_optimizer v2 v_parameterization v_pred_like_loss vae vae_batch_size
    validate_every_n_epochs validate_every_n_steps validation_seed validation_split wandb_api_key
    wandb_run_name weighted_captions xformers zero3_init_flag zero3_save_16bit_model zero_stage
    zero_terminal_snr
    """.split()
)

# Options sdxl_train_network.py adds (sdxl_train_util.add_sdxl_training_arguments, its setup_parser).
SDXL_ONLY_OPTIONS = frozenset(
    """
    cache_text_encoder_outputs cache_text_encoder_outputs_to_disk disable_mmap_load_safetensors
    """.split()
)
SDXL_TRAIN_NETWORK_OPTIONS = TRAIN_NETWORK_OPTIONS | SDXL_ONLY_OPTIONS
SCRIPT_OPTIONS = {
    "train_network.py": TRAIN_NETWORK_OPTIONS,
    "sdxl_train_network.py": SDXL_TRAIN_NETWORK_OPTIONS,
}

TRAIN_ARG_CHOICES = {
    "save_model_as": {"ckpt", "pt", "safetensors"},
    "save_precision": {"float", "fp16", "bf16"},
    "mixed_precision": {"no", "fp16", "bf16"},
    "log_with": {"tensorboard", "wandb", "all"},
    "sample_sampler": {
        "ddim",
        "pndm",
        "lms",
        "euler",
        "euler_a",
        "heun",
        "dpm_2",
        "dpm_2_a",
        "dpmsolver",
        "dpmsolver++",
        "dpmsingle",
        "k_lms",
        "k_euler",
        "k_euler_a",
        "k_dpm_2",
        "k_dpm_2_a",
    },
}
KOHYA_IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]


def _type_ok(value: Any, kind: Any) -> bool:
    if kind == PAIR_FLOAT:
        return isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value)
    if kind == INT_OR_PAIR:
        return _type_ok(value, int) or (
            isinstance(value, list) and len(value) == 2 and all(_type_ok(v, int) for v in value)
        )
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_keys(where: str, table: dict, allowed: dict) -> list[str]:
    out = []
    for key, value in table.items():
        if key not in allowed:
            out.append(f"{where}: extra keys not allowed: {key!r}")
        elif not _type_ok(value, allowed[key]):
            out.append(
                f"{where}: {key!r} must be {getattr(allowed[key], '__name__', allowed[key])}, got {value!r}"
            )
    return out


def check_dataset_config(doc: dict[str, Any]) -> list[str]:
    """Problems kohya's dataset-config schema and loader would raise for ``doc``."""
    problems = [f"top level: extra keys not allowed: {k!r}" for k in doc if k not in ("general", "datasets")]
    general = doc.get("general", {})
    if not isinstance(general, dict):
        return problems + ["[general] must be a table"]
    problems += _check_keys("[general]", general, GENERAL_KEYS)
    datasets = doc.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        return problems + ["no [[datasets]]"]
    for i, ds in enumerate(datasets):
        subsets = ds.get("subsets", [])
        problems += _check_keys(
            f"datasets[{i}]", {k: v for k, v in ds.items() if k != "subsets"}, DATASET_KEYS
        )
        if "resolution" not in ds and "resolution" not in general:
            problems.append(f"datasets[{i}]: resolution missing (train_util asserts for DreamBooth datasets)")
        if not subsets:
            problems.append(f"datasets[{i}]: no [[datasets.subsets]]")
        for j, sub in enumerate(subsets):
            where = f"datasets[{i}].subsets[{j}]"
            problems += _check_keys(where, sub, SUBSET_KEYS)
            if "image_dir" not in sub:
                problems.append(f"{where}: required key not provided: 'image_dir'")
            ext = sub.get("caption_extension", ds.get("caption_extension", general.get("caption_extension")))
            if ext is None:
                problems.append(
                    f"{where}: caption_extension missing (kohya defaults to '.caption', .txt ignored)"
                )
            elif ext != ".txt":
                problems.append(f"{where}: caption_extension is {ext!r}, our captions are '.txt'")
            aug = any(
                sub.get(k, ds.get(k, general.get(k, False))) is True for k in ("color_aug", "random_crop")
            )
            if aug:
                problems.append(f"{where}: color_aug/random_crop set (cannot be used with cache_latents)")
    return problems


def check_dataset_files(doc: dict[str, Any]) -> list[str]:
    """Each subset's image_dir exists, holds images directly, and every image has a caption."""
    problems = []
    for i, ds in enumerate(doc.get("datasets", [])):
        for j, sub in enumerate(ds.get("subsets", [])):
            d = sub.get("image_dir")
            if not d or not os.path.isdir(d):
                problems.append(f"datasets[{i}].subsets[{j}]: image_dir {d!r} is not a folder")
                continue
            images = kohya_glob_images(d)
            if not images:
                problems.append(f"datasets[{i}].subsets[{j}]: no images directly in {d}")
            for img in images:
                if not os.path.exists(os.path.splitext(img)[0] + ".txt"):
                    problems.append(f"{img}: no .txt caption")
    return problems


def check_training_args(
    args: dict[str, Any], dataset_doc: dict[str, Any] | None = None, script: str = "train_network.py"
) -> list[str]:
    """Problems of a train_network.py / sdxl_train_network.py --config_file TOML (sections flattened)."""
    flat: dict[str, Any] = {}
    for key, value in args.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    problems = []
    for key, value in flat.items():
        if key not in SCRIPT_OPTIONS[script]:
            problems.append(f"{key!r} is not an option of {script} (kohya keeps it silently and ignores it)")
        elif key not in TRAIN_ARG_TYPES:
            problems.append(f"unknown argument {key!r} (kohya keeps it silently and ignores it)")
        elif not _type_ok(value, TRAIN_ARG_TYPES[key]):
            problems.append(
                f"{key!r} must be {getattr(TRAIN_ARG_TYPES[key], '__name__', TRAIN_ARG_TYPES[key])}, "
                f"got {value!r}"
            )
        elif key in TRAIN_ARG_CHOICES and value not in TRAIN_ARG_CHOICES[key]:
            problems.append(f"{key!r} = {value!r} not one of {sorted(TRAIN_ARG_CHOICES[key])}")
    for key in ("pretrained_model_name_or_path", "output_dir", "network_module"):
        if key not in flat:
            problems.append(f"{key!r} missing")
    if "dataset_config" not in flat and "train_data_dir" not in flat:
        problems.append("neither dataset_config nor train_data_dir")
    if flat.get("cache_latents") and (flat.get("color_aug") or flat.get("random_crop")):
        problems.append("cache_latents with color_aug/random_crop")
    if dataset_doc is not None and flat.get("cache_latents"):
        for ds in dataset_doc.get("datasets", []):
            for sub in ds.get("subsets", []):
                if sub.get("color_aug") or sub.get("random_crop"):
                    problems.append("cache_latents with a color_aug/random_crop subset")
    if flat.get("masked_loss"):
        alpha = flat.get("alpha_mask") or any(
            sub.get("alpha_mask")
            for ds in (dataset_doc or {}).get("datasets", [])
            for sub in ds.get("subsets", [])
        )
        if not alpha:
            problems.append("masked_loss without alpha_mask: the mask is never loaded")
    if script == "sdxl_train_network.py":
        problems += check_sdxl_rules(flat, dataset_doc)
    return problems


def check_sdxl_rules(flat: dict[str, Any], dataset_doc: dict[str, Any] | None) -> list[str]:
    """sdxl_train_network.py's assertions (KOHYA_FACTS.md, SDXL section)."""
    problems = []
    if flat.get("v2"):
        problems.append("v2 must be off for SDXL")
    caching = flat.get("cache_text_encoder_outputs") or flat.get("cache_text_encoder_outputs_to_disk")
    if caching and not flat.get("network_train_unet_only"):
        problems.append("cache_text_encoder_outputs needs network_train_unet_only")
    if not dataset_doc:
        return problems
    general = dataset_doc.get("general", {})
    for i, ds in enumerate(dataset_doc.get("datasets", [])):
        steps = ds.get("bucket_reso_steps", general.get("bucket_reso_steps", 64))
        if steps % 32:
            problems.append(f"datasets[{i}]: bucket_reso_steps {steps} is not a multiple of 32")
        for sub in ds.get("subsets", []):
            for key in (
                "shuffle_caption",
                "caption_dropout_rate",
                "caption_tag_dropout_rate",
                "token_warmup_step",
            ):
                value = sub.get(key, ds.get(key, general.get(key, flat.get(key))))
                if caching and value:
                    problems.append(f"datasets[{i}]: cache_text_encoder_outputs with {key} = {value!r}")
    return problems


def check_config_files(config_path: str | Path, script: str = "train_network.py") -> list[str]:
    """Load a training TOML + its dataset TOML the way kohya does (``toml`` library) and check both."""
    import toml

    config_path = Path(config_path)
    args = toml.load(config_path)
    assert args == tomllib.loads(config_path.read_text(encoding="utf-8"))
    flat = {k: v for sec in args.values() if isinstance(sec, dict) for k, v in sec.items()}
    ds_doc = None
    problems = []
    if "dataset_config" in flat:
        ds_path = Path(flat["dataset_config"])
        if not ds_path.exists():
            return [f"dataset_config {ds_path} does not exist"]
        ds_doc = toml.load(ds_path)
        problems += check_dataset_config(ds_doc) + check_dataset_files(ds_doc)
    return problems + check_training_args(args, ds_doc, script)


def kohya_subdirs(train_data_dir: str | Path) -> tuple[list[tuple[str, int, str]], list[str]]:
    """Folders kohya reads from a train_data_dir: ([(name, repeats, class_tokens)], skipped names)."""
    used, skipped = [], []
    for entry in sorted(os.listdir(train_data_dir)):
        if not os.path.isdir(os.path.join(train_data_dir, entry)):
            continue
        tokens = entry.split("_", 1)
        try:
            repeats = int(tokens[0])
        except ValueError:
            skipped.append(entry)
            continue
        if repeats < 1:
            skipped.append(entry)
            continue
        used.append((entry, repeats, tokens[1] if len(tokens) > 1 else ""))
    return used, skipped


def kohya_glob_images(directory: str | Path) -> list[str]:
    """kohya's glob_images: images directly in ``directory``, de-duplicated and sorted."""
    paths: list[str] = []
    for ext in KOHYA_IMAGE_EXTENSIONS:
        paths.extend(glob.glob(os.path.join(glob.escape(str(directory)), "*" + ext)))
    return sorted(set(paths))


def kohya_split(image_dir: str | Path, validation_split: float, seed: int) -> tuple[list[str], list[str]]:
    """The (train, validation) file names kohya's dataset-level validation_split produces."""
    paths = kohya_glob_images(image_dir)
    if validation_split <= 0:
        return [os.path.basename(p) for p in paths], []
    shuffled = list(paths)
    state = random.getstate()
    random.seed(seed)
    random.shuffle(shuffled)
    random.setstate(state)
    train = shuffled[: math.ceil(len(shuffled) * (1 - validation_split))]
    val = shuffled[len(shuffled) - round(len(shuffled) * validation_split) :]
    return [os.path.basename(p) for p in train], [os.path.basename(p) for p in val]
