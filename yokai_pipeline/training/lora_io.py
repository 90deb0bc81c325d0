"""LoRA files in kohya's format: module names, tensors, ss_* metadata, hashes; the ``.finished`` marker.

Names follow sd-scripts' networks/lora.py: ``<prefix>_<module path with . -> _>`` with
``lora_down`` / ``lora_up`` / ``alpha`` tensors. The module path is the one sd-scripts' own model
has: for SD 1.x its UNet (library/original_unet.py) uses diffusers' names; for SDXL its UNet
(library/sdxl_original_unet.py) uses the original SGM names (``input_blocks.N.1...``), so
diffusers' names are mapped; text encoders use transformers' pre-5 ``text_model.`` layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import atomic_write_bytes, atomic_write_json, read_json
from yokai_pipeline.training.kohya_args import TrainingError

log = logging.getLogger(__name__)

FINISHED_MARKER = ".finished"
ADAPTER = "default"


# ------------------------------------------------------------------ module names


def sdxl_unet_module_name(name: str, layers_per_block: int) -> str:
    """sd-scripts' SDXL UNet name of a diffusers UNet module inside a Transformer2DModel block.

    SGM numbers ``input_blocks`` 1.. as ``layers_per_block`` layers then one downsampler per down
    block (0 is conv_in), ``middle_block`` as resnet / attention / resnet, ``output_blocks`` as
    ``layers_per_block + 1`` layers per up block; inside a layer, 0 is the resnet and 1 the
    attention. Only attention layers are named: kohya's default LoRA targets nothing else.
    """
    parts = name.split(".")
    slots = layers_per_block + 1
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        return ".".join(["input_blocks", str(1 + int(parts[1]) * slots + int(parts[3])), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        return ".".join(["output_blocks", str(int(parts[1]) * slots + int(parts[3])), "1", *parts[4:]])
    raise TrainingError(f"no sd-scripts SDXL name for UNet module {name!r} (not in an attention block)")


def text_encoder_module_name(name: str) -> str:
    """``text_model.``-rooted name (transformers 5 dropped that level from CLIPTextModel)."""
    return name if name.startswith("text_model.") else f"text_model.{name}"


def lora_modules(model: Any) -> dict[str, Any]:
    """Modules of ``model`` carrying a peft LoRA adapter, by their module path."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A}


def kohya_lora_state(parts: list[tuple[str, Any, Any]], network_alpha: float) -> dict[str, Any]:
    """kohya LoRA tensors of peft-injected models.

    Args:
        parts: ``(prefix, model, namer)``: kohya prefix (``lora_unet``, ``lora_te1`` ...), the model,
            and a function from its module path to sd-scripts' module path.
        network_alpha: written as every module's ``alpha`` (kohya's scale is alpha / dim).
    """
    import torch

    out: dict[str, Any] = {}
    for prefix, model, namer in parts:
        for name, module in lora_modules(model).items():
            key = f"{prefix}_{namer(name).replace('.', '_')}"
            out[f"{key}.lora_down.weight"] = module.lora_A[ADAPTER].weight
            out[f"{key}.lora_up.weight"] = module.lora_B[ADAPTER].weight
            out[f"{key}.alpha"] = torch.tensor(float(network_alpha))
    return out


def adapter_tensors(model: Any) -> dict[str, Any]:
    """LoRA tensors of a peft-injected module, adapter name stripped (resume state)."""
    return {k.replace(f".{ADAPTER}.", "."): v for k, v in model.state_dict().items() if ".lora_" in k}


def load_adapter_tensors(model: Any, tensors: dict[str, Any]) -> None:
    """Inverse of :func:`adapter_tensors`; every LoRA tensor of ``model`` must be in ``tensors``."""
    own = {k.replace(f".{ADAPTER}.", "."): k for k in model.state_dict() if ".lora_" in k}
    missing = set(own) - set(tensors)
    if missing:
        raise TrainingError(f"saved state lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict({own[k]: v for k, v in tensors.items() if k in own}, strict=False)


# ------------------------------------------------------------------ files


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


# ------------------------------------------------------------------ finished marker


def read_finished_marker(output_dir: str | Path, fingerprint: str | None = None) -> dict[str, Any] | None:
    """The ``.finished`` marker of a character's output folder, or None when not finished.

    With ``fingerprint`` (:func:`training_fingerprint`), a marker written for other data or
    another config counts as not finished, so a re-packaged character is trained again.
    """
    path = Path(output_dir) / FINISHED_MARKER
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("ignoring unreadable finished marker %s", path)
        return None
    if not isinstance(data, dict):
        return None
    if fingerprint is not None and data.get("fingerprint") != fingerprint:
        log.info("%s: dataset or config changed since it finished; training again", path.parent)
        return None
    return data


def write_finished_marker(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write the ``.finished`` marker (JSON with the final checkpoint) atomically."""
    return atomic_write_json(Path(output_dir) / FINISHED_MARKER, {"finished_at": time.time(), **record})


def training_fingerprint(config_file: str | Path) -> str:
    """sha256 over the training config, its dataset config and every file of its image folders.

    Contents, not times: re-packaging rewrites the same bytes for unchanged data, and any changed
    image, caption or parameter gives a new fingerprint. A command-line base-model override is
    not part of it (as before: the same data and config count as trained).
    """
    from yokai_pipeline.training.dataset import read_dataset_config
    from yokai_pipeline.training.kohya_args import read_training_args, resolve_config_path

    config_file = Path(config_file)
    args = read_training_args(config_file)
    h = hashlib.sha256(config_file.read_bytes())
    try:
        if args.get("dataset_config"):
            h.update(resolve_config_path(args["dataset_config"], config_file).read_bytes())
        specs = read_dataset_config(args, config_file)
    except (OSError, BadInputError):
        return h.hexdigest()  # the trainer reports the unreadable dataset itself
    for spec in specs:
        for sub in spec.subsets:
            files = (
                sorted(p for p in sub.image_dir.iterdir() if p.is_file()) if sub.image_dir.is_dir() else []
            )
            for p in files:
                h.update(p.name.encode() + b"\0")
                with p.open("rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()
