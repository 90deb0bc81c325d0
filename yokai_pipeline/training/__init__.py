"""Built-in LoRA trainer (diffusers + peft) that reads a packaged kohya dataset as sd-scripts would.

No sd-scripts checkout is needed: the training-args TOML (``--config_file``) and its dataset
TOML are read with kohya's own rules (flat keys, subset > dataset > general > args fallbacks,
``{repeats}_{name}`` folders when there is no dataset config, kohya's validation split and
aspect-ratio buckets), a LoRA is trained on an SD 1.5 or SDXL UNet (and optionally the text
encoders), and kohya-format ``.safetensors`` files with ``ss_*`` metadata are saved every
``save_every_n_epochs`` epochs, so the result loads in sd-scripts / sd-webui / ComfyUI / diffusers.

The package, one concern a module:

- ``kohya_args``: the training-args TOML read flat, typed values, relative paths;
- ``dataset``, ``buckets``, ``captions``: subsets, validation split, buckets, captions, pixels;
- ``families``: SD 1.5 / SDXL defaults, detection from a model's config, loading, text encoding;
- ``lora_io``, ``metadata``: kohya LoRA names and tensors, ss_* metadata, hashes, ``.finished``;
- ``settings``, ``loop``: the resolved settings and the loop (small functions over a TrainState);
- ``tiny``: tiny random SD 1.5 / SDXL models for the demo and tests.

Outputs in ``output_dir`` (names follow sd-scripts):

- ``<output_name>-<epoch:06d>.safetensors`` every N epochs, ``<output_name>.safetensors`` at the end,
  ``<output_name>-step<step:08d>.safetensors`` when a run is cut by ``max_steps``;
- ``<output_name>-builtin-state/``: LoRA weights, optimizer, LR scheduler and position, for resume;
- ``validation_loss.json``: per-epoch validation (and mean training) loss, the best epoch;
- ``.finished``: JSON marker with the final checkpoint and the fingerprint of the config and data
  it was trained on; a finished character is skipped until its data or config changes;
- tensorboard scalars under ``logging_dir`` when the ``tensorboard`` package is installed
  (kohya's tag names: ``loss/average``, ``loss/validation/epoch_average``).
"""

from yokai_pipeline.training.buckets import make_bucket_resolutions, select_bucket
from yokai_pipeline.training.captions import process_caption, read_caption
from yokai_pipeline.training.dataset import (
    IMAGE_EXTENSIONS,
    DatasetSpec,
    SubsetSpec,
    TrainItem,
    glob_images,
    list_dataset_images,
    load_training_image,
    plan_epoch,
    plan_validation,
    read_dataset_config,
    split_train_val,
)
from yokai_pipeline.training.families import (
    FAMILIES,
    KNOWN_SDXL_ANIME,
    SD15_DEFAULT_BASE,
    SDXL_DEFAULT_BASE,
    BaseModel,
    Family,
    check_base_model,
    detect_family,
    encode_prompts,
    encode_sdxl_prompts,
    get_family,
    kohya_noise_scheduler,
    load_base_model,
)
from yokai_pipeline.training.kohya_args import TrainingError, read_training_args, resolve_config_path
from yokai_pipeline.training.loop import (
    NUM_VALIDATION_TIMESTEPS,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    VALIDATION_FILE,
    TrainState,
    config_family,
    snr_weight,
    train_lora_builtin,
    train_lora_with_model,
)
from yokai_pipeline.training.lora_io import (
    FINISHED_MARKER,
    kohya_lora_state,
    read_finished_marker,
    safetensors_hashes,
    save_kohya_lora,
    sdxl_unet_module_name,
    training_fingerprint,
    write_finished_marker,
)
from yokai_pipeline.training.tiny import build_tiny_sd_model, build_tiny_sdxl_model, sdxl_unet_config

__all__ = [
    "FAMILIES",
    "FINISHED_MARKER",
    "IMAGE_EXTENSIONS",
    "KNOWN_SDXL_ANIME",
    "NUM_VALIDATION_TIMESTEPS",
    "SD15_DEFAULT_BASE",
    "SDXL_DEFAULT_BASE",
    "TEXT_ENCODER_TARGETS",
    "UNET_TARGETS",
    "VALIDATION_FILE",
    "BaseModel",
    "DatasetSpec",
    "Family",
    "SubsetSpec",
    "TrainItem",
    "TrainState",
    "TrainingError",
    "build_tiny_sd_model",
    "build_tiny_sdxl_model",
    "check_base_model",
    "config_family",
    "detect_family",
    "encode_prompts",
    "encode_sdxl_prompts",
    "get_family",
    "glob_images",
    "kohya_lora_state",
    "kohya_noise_scheduler",
    "list_dataset_images",
    "load_base_model",
    "load_training_image",
    "make_bucket_resolutions",
    "plan_epoch",
    "plan_validation",
    "process_caption",
    "read_caption",
    "read_dataset_config",
    "read_finished_marker",
    "read_training_args",
    "resolve_config_path",
    "safetensors_hashes",
    "save_kohya_lora",
    "sdxl_unet_config",
    "sdxl_unet_module_name",
    "select_bucket",
    "snr_weight",
    "split_train_val",
    "train_lora_builtin",
    "train_lora_with_model",
    "training_fingerprint",
    "write_finished_marker",
]
