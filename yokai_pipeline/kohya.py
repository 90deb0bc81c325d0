"""Package captioned character clusters as kohya sd-scripts datasets (guide step 5).

Layout written under ``out_dir`` (``training_data/characters`` in a workspace)::

    out_dir/
      {repeat}_{name}/            images (PNG) + captions (.txt) of ONE character,
                                  training and validation images together (see below)
      configs/{name}_config.toml          train_network.py --config_file
      configs/{name}_dataset.toml         --dataset_config (referenced by the file above)
      configs/{name}_sample_prompts.txt   sample prompts with the trigger word
      configs/{name}_split.json           which files kohya holds out for validation
      configs/multi_concept_*.toml        optional: all characters in one LoRA
      configs/preparation_summary.json

How this meets kohya's real rules (``/work/shared/KOHYA_FACTS.md``):

* Each character's dataset config has one subset whose ``image_dir`` is that character's own
  folder, so no character trains on another's images (``train_data_dir`` is never used; the
  ``{repeat}_{name}`` naming is kept so the folder also works as a classic train_data_dir).
* Validation: kohya reads validation images only through ``validation_split`` at dataset level;
  it sorts the folder's images, shuffles them with ``random.seed(validation_seed)`` and holds
  out the tail. We pick the validation images ourselves (seeded, originals only, their augmented
  copies dropped so nothing leaks into training), then name the files so that kohya's seeded
  shuffle holds out exactly those images, and set ``validation_split`` so its two rounding rules
  give exactly our counts. There is no ``validation/`` folder: kohya would silently skip it.
  So a ``{repeat}_{name}`` folder copied into a bare train_data_dir (the guide's multi-concept
  ``cp -r`` recipe) would train its held-out images too; ``packaging.multi_concept`` writes that
  set-up instead: one dataset per character folder, each with its own exact ``validation_split``,
  rank and LR combined per type (:func:`multi_concept_params`).
* ``caption_extension = ".txt"``, ``resolution`` and ``keep_tokens = 1`` (the trigger is the first
  caption token) are always set; every TOML is written with ``tomli_w`` so the types are TOML's.
* RGBA layers: ``alpha_mode="alpha_mask"`` keeps the alpha channel and turns on ``alpha_mask``
  (subset) + ``masked_loss`` (training args), so the loss ignores the transparent area; the RGB
  under transparent pixels is filled with ``composite_color`` so the VAE sees a clean flat
  background. ``"composite"`` flattens onto ``composite_color`` and writes RGB.
* Resolution: every image keeps its source size; buckets are on with ``bucket_no_upscale``, so
  kohya trains each at its own aspect ratio and only downsizes into its area budget. Images whose
  shorter side is below ``min_resolution`` (the guide's validation threshold) are left out and
  listed (``low_resolution="drop"``) or packaged for validation to report (``"keep"``). Only when
  ``upscale_to`` is set are smaller images Lanczos-upscaled to it, and each upscaled file is
  recorded (``upscaled``, ``source_size``) in ``configs/{name}_split.json``.
* Training parameters come from the guide's table by the character's ORIGINAL images (before
  augmentation): a 7-image character gets the 5-10 row even after augmentation to 50 images.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from yokai_pipeline.config import PackagingConfig, TrainingConfig
from yokai_pipeline.crops import CROPS_MANIFEST
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    read_image,
    read_jsonl,
    safe_name,
)
from yokai_pipeline.tagging import read_tag_summary
from yokai_pipeline.training.families import FAMILIES, Family, get_family

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUGMENT_MANIFEST = "augment_manifest.jsonl"
SAMPLE_NEGATIVE = "lowres, bad anatomy"
SAMPLE_POSES = ("standing pose", "full body, simple background")

# The guide's table: (min images, max images, repeat, epochs, UNet LR, text LR, strategy).
PARAM_TABLE: tuple[tuple[int, int | None, int, int, float, float, str], ...] = (
    (5, 10, 30, 30, 5e-5, 2e-5, "Heavy repetition, low LR"),
    (11, 20, 20, 25, 8e-5, 3e-5, "Moderate repetition"),
    (21, 50, 15, 20, 1e-4, 5e-5, "Standard training"),
    (51, 100, 10, 15, 1e-4, 5e-5, "Rich dataset"),
    (101, None, 5, 12, 1e-4, 5e-5, "Minimal repetition"),
)
STANDARD_ROW = PARAM_TABLE[2]
YOKAI_LR_FACTOR = 1.1
NETWORK_DIM = {"yokai": 48, "human": 32, "unknown": 32}


def training_params(n_images: int, char_type: str = "unknown", auto: bool = True) -> dict[str, Any]:
    """Training parameters for a character from the guide's table and type adjustments.

    Args:
        n_images: original images of the character (before augmentation), the guide's "Images".
        char_type: ``human``, ``yokai`` or ``unknown`` (treated as human: standard parameters).
        auto: pick the row by image count; False uses the "Standard training" row for everyone.

    Returns:
        dict with repeat, epochs, unet_lr, text_encoder_lr, learning_rate, network_dim,
        network_alpha (dim / 2, the common LoRA choice that halves the effective update scale),
        strategy and the table row used (``row``, e.g. ``"11-20"``).
    """
    if auto:
        row = PARAM_TABLE[0]  # fewer than 5 images still get the small-dataset settings
        for candidate in PARAM_TABLE:
            if n_images >= candidate[0]:
                row = candidate
    else:
        row = STANDARD_ROW
    lo, hi, repeat, epochs, unet_lr, text_lr, strategy = row
    yokai = char_type == "yokai"
    factor = YOKAI_LR_FACTOR if yokai else 1.0
    dim = NETWORK_DIM.get(char_type, 32)
    unet = _round_lr(unet_lr * factor)
    return {
        "repeat": repeat,
        "epochs": epochs,
        "unet_lr": unet,
        "text_encoder_lr": _round_lr(text_lr * factor),
        "learning_rate": unet,
        "network_dim": dim,
        "network_alpha": float(dim) / 2.0,
        "strategy": strategy,
        "row": f"{lo}-{hi}" if hi is not None else f"{lo - 1}+",
        "auto": auto,
    }


def _round_lr(x: float) -> float:
    # 5e-5 * 1.1 = 5.500000000000001e-05; keep the TOML readable.
    return float(f"{x:.6g}")


def clean_trigger(trigger: str, fallback: str) -> str:
    """A trigger word safe for captions and sample prompts: one line, no commas, no ``--`` flags."""
    t = re.sub(r"[\x00-\x1f\x7f,]+", " ", str(trigger))
    t = re.sub(r"-{2,}", "-", t)
    t = re.sub(r"\s+", " ", t).strip(" -")
    return t or fallback


def clean_caption(text: str, trigger: str) -> str:
    """One-line caption (kohya reads only the first line) that starts with the trigger word."""
    parts = [p.strip() for p in re.split(r"[\r\n]+", text) if p.strip()]
    caption = ", ".join(parts)
    caption = re.sub(r"[\x00-\x1f\x7f]", " ", caption).strip(" ,")
    tokens = [t.strip() for t in caption.split(",")] if caption else []
    if not tokens or tokens[0] != trigger:
        tokens = [trigger] + [t for t in tokens if t and t != trigger]
    return ", ".join(t for t in tokens if t)


def kohya_validation_positions(n: int, validation_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions (in sorted file order) kohya puts in training and in validation.

    Mirrors sd-scripts' split: the sorted image list is shuffled with ``random.seed(seed)``;
    training takes the first ``ceil(n * (1 - split))``, validation the last ``round(n * split)``.
    """
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_train = math.ceil(n * (1 - validation_split))
    n_val = round(n * validation_split)
    return idx[:n_train], idx[n - n_val :] if n_val else []


def exact_validation_split(n: int, k: int) -> float:
    """A ``validation_split`` for which kohya holds out exactly ``k`` of ``n`` images, no overlap."""
    if k <= 0:
        return 0.0
    if k >= n:
        raise ValueError(f"cannot hold out {k} of {n} images")
    for offset in (0.25, 0.2, 0.3, 0.1, 0.4):
        s = (k + offset) / n
        if round(n * s) == k and math.ceil(n * (1 - s)) == n - k:
            return s
    raise ValueError(f"no validation_split gives exactly {k} of {n}")  # pragma: no cover


def bucket_settings(resolution: int) -> dict[str, Any]:
    """Bucketing around ``resolution``: steps of 64, from half to twice the resolution."""
    step = 64
    lo = max(step, (resolution // 2) // step * step)
    hi = max(resolution, -(-(resolution * 2) // step) * step)
    return {
        "enable_bucket": True,
        "bucket_no_upscale": True,
        "min_bucket_reso": lo,
        "max_bucket_reso": hi,
        "bucket_reso_steps": step,
    }


# ---------------------------------------------------------------- per-image functions


def prepare_image(image: Any, alpha_mode: str, color: tuple[int, int, int], upscale_to: int) -> Any:
    """Return the image as kohya should see it (PIL RGBA for alpha_mask, RGB for composite).

    Transparent pixels get ``color`` in both modes so the VAE never encodes random RGB.
    """
    from PIL import Image

    im = image.convert("RGBA") if image.mode != "RGBA" else image.copy()
    im = upscale_min_side(im, upscale_to)
    flat = Image.new("RGBA", im.size, (*color, 255))
    flat.alpha_composite(im)
    if alpha_mode == "composite":
        return flat.convert("RGB")
    flat.putalpha(im.getchannel("A"))
    return flat


def upscale_min_side(image: Any, target: int) -> Any:
    """Lanczos-upscale so the shorter side is ``target`` (no-op when already large or target 0)."""
    from PIL import Image

    if target <= 0:
        return image
    w, h = image.size
    if min(w, h) >= target:
        return image
    scale = target / min(w, h)
    size = (max(target, round(w * scale)), max(target, round(h * scale)))
    # Pillow premultiplies alpha for RGBA resizes, so edges do not pick up dark fringes.
    return image.resize(size, Image.Resampling.LANCZOS)


def load_image(path: Path) -> Any:
    """Decode an image as 8-bit RGB/RGBA (fsio.read_image); BadInputError naming the file when it cannot be read."""
    return read_image(path)


def read_caption(path: Path) -> str | None:
    """Caption text next to an image, or None when there is none (bad UTF-8 is replaced, not fatal)."""
    if not path.exists():
        return None
    return path.read_bytes().decode("utf-8", errors="replace")


def _png_bytes(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------- planning


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_sources(folder: Path) -> dict[str, str]:
    """Image file name -> the file name of the original it was augmented (or cropped) from.

    From the augmentation manifest and the 3-stage crops' manifest (yokai_pipeline/crops.py):
    a crop is a derived image of its instance, like an augmented copy.
    """
    out: dict[str, str] = {}
    manifests = [folder / AUGMENT_MANIFEST, folder / CROPS_MANIFEST]
    for row in (r for m in manifests if m.exists() for r in read_jsonl(m)):
        src = row.get("source")
        dest = row.get("path") or row.get("output") or row.get("file") or row.get("image") or row.get("name")
        if src and dest:
            out[Path(str(dest)).name] = Path(str(src)).name
    return out


def split_validation(
    images: list[Path], sources: dict[str, str], validation_split: float, seed: int, key: str
) -> tuple[list[Path], list[Path], list[Path]]:
    """Pick validation images (originals only, seeded) and drop their augmented copies.

    Returns:
        (train, validation, dropped) lists of paths.
    """
    # Augmented copies are never validation images: they are near-copies of a training original.
    originals = [p for p in images if sources.get(p.name, p.name) == p.name]
    k = round(len(originals) * validation_split) if validation_split > 0 else 0
    if validation_split > 0 and k == 0 and len(originals) >= 2:
        k = 1  # a tiny cluster still gets one held-out image so overfitting shows
    k = min(k, max(0, len(originals) - 1))
    order = sorted(originals, key=lambda p: p.name)
    random.Random(f"{seed}:{key}").shuffle(order)
    val = sorted(order[:k], key=lambda p: p.name)
    val_names = {p.name for p in val}
    dropped = [p for p in images if p.name not in val_names and sources.get(p.name) in val_names]
    dropped_names = {p.name for p in dropped}
    train = [p for p in images if p.name not in val_names and p.name not in dropped_names]
    return train, val, dropped


def _cluster_folder(src_dir: Path, cluster: int | str, name: str) -> Path | None:
    for cand in (
        f"cluster_{int(cluster):03d}" if str(cluster).lstrip("-").isdigit() else None,
        str(cluster),
        name,
    ):
        # a single plain folder name only: a hand-edited selection must not reach outside src_dir
        if cand and Path(cand).name == cand and cand not in (".", "..") and "\x00" not in cand:
            if (src_dir / cand).is_dir():
                return src_dir / cand
    return None


def characters_from_inputs(
    src_dir: Path, selection: dict | None, analysis: dict | None, selected_clusters: Iterable[int] | None
) -> list[dict[str, Any]]:
    """Characters to package: the selection's, or one per ``cluster_NNN`` folder when there is none."""
    chars: list[dict[str, Any]] = []
    if selection and selection.get("characters"):
        for c in selection["characters"]:
            chars.append(dict(c))
    else:
        types = _types_from_analysis(analysis)
        for folder in sorted(src_dir.glob("cluster_*")):
            m = re.fullmatch(r"cluster_(\d+)", folder.name)
            if folder.is_dir() and m:
                cid = int(m.group(1))
                # the guide's naming: folder and configs char_003, trigger word char003
                chars.append(
                    {
                        "cluster": cid,
                        "name": f"char_{cid:03d}",
                        "trigger": f"char{cid:03d}",
                        "type": types.get(cid, "unknown"),
                    }
                )
    if selected_clusters is not None:
        wanted = {int(c) for c in selected_clusters}
        chars = [c for c in chars if int(c.get("cluster", -1)) in wanted]
    return chars


def _types_from_analysis(analysis: dict | None) -> dict[int, str]:
    out: dict[int, str] = {}
    if not isinstance(analysis, dict):
        return out
    rows = analysis.get("clusters")
    if isinstance(rows, dict):
        rows = [dict(v, id=k) for k, v in rows.items() if isinstance(v, dict)]
    for row in rows or []:
        if not isinstance(row, dict):
            continue
        cid = row.get("id", row.get("cluster"))
        ctype = row.get("type") or row.get("character_type")
        try:
            if ctype in ("human", "yokai", "unknown"):
                out[int(cid)] = ctype
        except (TypeError, ValueError):
            continue
    return out


# ---------------------------------------------------------------- TOML documents


def build_dataset_config(subsets: list[dict[str, Any]], cfg: PackagingConfig) -> dict[str, Any]:
    """kohya dataset config: one ``[[datasets]]`` per entry, each with one subset.

    Each entry: image_dir, num_repeats, trigger, validation_split (exact, may be 0), and
    optionally shuffle_caption (tag captions: kohya shuffles the tags, ``keep_tokens = 1`` keeps
    the trigger first).
    """
    general: dict[str, Any] = {"caption_extension": ".txt", "keep_tokens": 1, "shuffle_caption": False}
    datasets = []
    for s in subsets:
        ds: dict[str, Any] = {
            "resolution": cfg.resolution,
            "batch_size": cfg.batch_size,
            **bucket_settings(cfg.resolution),
        }
        if s["validation_split"] > 0:
            ds["validation_split"] = float(s["validation_split"])
            ds["validation_seed"] = int(cfg.seed)
        subset: dict[str, Any] = {
            "image_dir": str(s["image_dir"]),
            "num_repeats": int(s["num_repeats"]),
            "class_tokens": s["trigger"],
            "caption_extension": ".txt",
            "keep_tokens": 1,
        }
        if s.get("shuffle_caption"):
            subset["shuffle_caption"] = True
        if cfg.alpha_mode == "alpha_mask":
            subset["alpha_mask"] = True
        ds["subsets"] = [subset]
        datasets.append(ds)
    return {"general": general, "datasets": datasets}


def for_family(cfg: PackagingConfig, family: Family) -> PackagingConfig:
    """``cfg`` with the family's native resolution unless one was set, and its base model."""
    update: dict[str, Any] = {"base_model": cfg.base_model or family.default_base_model}
    if "resolution" not in cfg.model_fields_set:
        update["resolution"] = family.resolution
    return cfg.model_copy(update=update)


def build_training_config(
    *,
    name: str,
    params: dict[str, Any],
    dataset_config: Path,
    sample_prompts: Path,
    models_dir: Path,
    cfg: PackagingConfig,
    has_validation: bool,
    family: Family = FAMILIES["sd15"],
    train_text_encoders: bool = False,
) -> dict[str, Any]:
    """train_network.py / sdxl_train_network.py arguments (sections are only for humans: kohya flattens them).

    ``train_text_encoders`` matters for SDXL only (SD 1.5 always trains its text encoder, as the
    guide's table gives it a learning rate).
    """
    out_dir = models_dir / name
    color_aug = random_crop = False  # we never turn these on, so latents can be cached
    base_model = cfg.base_model or family.default_base_model
    doc: dict[str, Any] = {
        "model": {"pretrained_model_name_or_path": base_model, "clip_skip": 2},
        "network": {
            "network_module": "networks.lora",
            "network_dim": int(params["network_dim"]),
            "network_alpha": float(params["network_alpha"]),
        },
        "optimizer": {
            "optimizer_type": "AdamW",
            "learning_rate": float(params["learning_rate"]),
            "unet_lr": float(params["unet_lr"]),
            "text_encoder_lr": float(params["text_encoder_lr"]),
            "lr_scheduler": "cosine",
            "lr_warmup_steps": 0,
        },
        "training": {
            "max_train_epochs": int(params["epochs"]),
            "train_batch_size": int(cfg.batch_size),
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "noise_offset": 0.05,
            "seed": int(cfg.seed),
            "cache_latents": not (color_aug or random_crop),
        },
        "dataset": {"dataset_config": str(dataset_config)},
        "saving": {
            "output_dir": str(out_dir),
            "output_name": f"{name}_lora",
            "save_model_as": "safetensors",
            "save_precision": "fp16",
            "save_every_n_epochs": int(cfg.save_every_n_epochs),
        },
        "logging": {"logging_dir": str(out_dir / "logs"), "log_with": "tensorboard"},
        "sample": {
            "sample_prompts": str(sample_prompts),
            "sample_every_n_epochs": int(cfg.save_every_n_epochs),
            "sample_sampler": "euler_a",
        },
    }
    if cfg.alpha_mode == "alpha_mask":
        doc["training"]["masked_loss"] = True
        doc["training"]["alpha_mask"] = True
    if has_validation:
        doc["validation"] = {"validate_every_n_epochs": 1}
    if family.name == "sdxl":
        _sdxl_arguments(doc, train_text_encoders)
    return doc


def _sdxl_arguments(doc: dict[str, Any], train_text_encoders: bool) -> None:
    """sdxl_train_network.py's settings (KOHYA_FACTS.md SDXL; sd-scripts docs/sdxl_train_network.md).

    clip_skip is ignored by SDXL training (a warning), so it is not written; the VAE runs in fp32
    (``no_half_vae``: SDXL's VAE gives NaNs in half precision). The usual SDXL LoRA trains the UNet
    only with cached text-encoder outputs (sd-scripts' recommendation); caching asserts unless
    ``network_train_unet_only`` is on and captions are neither shuffled nor dropped, which our
    dataset configs never do.
    """
    del doc["model"]["clip_skip"]
    doc["model"]["no_half_vae"] = True
    if train_text_encoders:
        doc["network"]["network_train_unet_only"] = False
        return
    doc["network"]["network_train_unet_only"] = True
    doc["training"]["cache_text_encoder_outputs"] = True
    del doc["optimizer"]["text_encoder_lr"]


def caches_text_encoder_outputs(family: Family, train_text_encoders: bool) -> bool:
    """Whether the training config caches text-encoder outputs (SDXL, UNet only: :func:`_sdxl_arguments`)."""
    return family.name == "sdxl" and not train_text_encoders


def caption_shuffle(tag_summary: dict[str, Any], family: Family, train_text_encoders: bool) -> bool:
    """Whether kohya may shuffle a character's captions (``keep_tokens = 1`` keeps the trigger first).

    Only pure tag lists are shuffled (the tag stage records the caption mode in tag_summary.json),
    and never with cached text-encoder outputs, which kohya refuses to combine with shuffling.
    """
    tag_cfg = tag_summary.get("config") or {}
    tags_only = tag_cfg.get("caption") == "tags" and bool(tag_cfg.get("shuffle_caption"))
    return tags_only and not caches_text_encoder_outputs(family, train_text_encoders)


def sample_prompt_lines(triggers: list[str], resolution: int) -> str:
    """kohya sample-prompt file: one prompt a line with --n/--w/--h/--d/--l/--s flags."""
    lines = ["# kohya sample prompts: prompt --n negative --w width --h height --d seed --l cfg --s steps"]
    for trigger in triggers:
        for i, pose in enumerate(SAMPLE_POSES, 1):
            lines.append(
                f"{trigger}, {pose} --n {SAMPLE_NEGATIVE} "
                f"--w {resolution} --h {resolution} --d {i} --l 7 --s 28"
            )
    return "\n".join(lines) + "\n"


def write_toml(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as TOML atomically (tomli_w escapes strings, keeps ints/floats/bools apart)."""
    try:
        import tomli_w
    except ImportError as exc:  # pragma: no cover
        raise ImportError("writing kohya configs needs tomli-w: pip install tomli-w") from exc
    return atomic_write_text(path, tomli_w.dumps(doc))


# ---------------------------------------------------------------- the stage


def default_models_dir(out_dir: Path) -> Path:
    """``WORKSPACE/trained_models`` for ``WORKSPACE/training_data/<kind>``, else a sibling folder."""
    out_dir = Path(out_dir).resolve()
    root = out_dir.parent.parent if out_dir.parent.name == "training_data" else out_dir.parent
    return root / "trained_models"


def launch_command(config_path: Path, script: str = "train_network.py") -> str:
    """The exact command that starts training for one config (run from the sd-scripts checkout)."""
    return f"accelerate launch {script} --config_file {Path(config_path).resolve()}"


def prepare_training_data(
    src_dir: str | Path,
    out_dir: str | Path,
    selection: dict | None,
    cfg: PackagingConfig,
    *,
    analysis: dict | None = None,
    selected_clusters: Iterable[int] | None = None,
    models_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    training: TrainingConfig | None = None,
) -> dict[str, Any]:
    """Package per-character image folders as kohya datasets with training configs.

    Args:
        src_dir: folder of ``cluster_NNN/`` folders with images, ``.txt`` captions and an optional
            ``augment_manifest.jsonl`` whose ``source`` field names each augmented image's original.
        out_dir: output folder (``training_data/characters``).
        selection: parsed selection.json (None: every ``cluster_NNN`` folder, named ``charNNN``).
        cfg: packaging settings.
        analysis: parsed cluster_analysis.json, used only for character types without a selection.
        selected_clusters: only these cluster ids.
        models_dir: where training writes LoRAs (default: the workspace's ``trained_models``).
        progress: ``progress(done, total)`` callback over characters.
        training: the model family per character (``family``, ``family_per_character``) and whether
            SDXL trains its text encoders; None = SD 1.5.

    Returns:
        Summary dict (also written to ``configs/preparation_summary.json``): per-character folders,
        counts, parameters, config paths and launch commands; ``skipped`` lists bad inputs.
    """
    src_dir = Path(src_dir)
    out_dir = Path(out_dir).resolve()
    if not src_dir.is_dir():
        raise BadInputError(src_dir, "input folder does not exist")
    models_dir = Path(models_dir).resolve() if models_dir else default_models_dir(out_dir)
    configs = out_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    training = training if training is not None else TrainingConfig()
    get_family(training.family)

    chars = characters_from_inputs(src_dir, selection, analysis, selected_clusters)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    used_names: set[str] = set()
    for i, char in enumerate(chars):
        try:
            res = _prepare_character(src_dir, out_dir, char, cfg, models_dir, training, used_names, skipped)
        except BadInputError as exc:
            skipped.append({"path": exc.path, "problem": exc.problem})
            res = None
        if res is not None:
            results.append(res)
        if progress:
            progress(i + 1, len(chars))

    multi = None
    if cfg.multi_concept and len(results) >= 2:
        multi = _write_multi_concept(out_dir, results, cfg, models_dir, training)

    summary = {
        "output_dir": str(out_dir),
        "models_dir": str(models_dir),
        "alpha_mode": cfg.alpha_mode,
        "family": training.family,
        "resolution": for_family(cfg, get_family(training.family)).resolution,
        "characters": results,
        "characters_prepared": len(results),
        "training_images": sum(r["train_images"] for r in results),
        "validation_images": sum(r["validation_images"] for r in results),
        "upscaled_images": sum(r["upscaled_images"] for r in results),
        "low_resolution": [x for r in results for x in r["low_resolution"]],
        "min_resolution": cfg.min_resolution,
        "multi_concept": multi,
        "skipped": skipped,
        "commands": [r["command"] for r in results] + ([multi["command"]] if multi else []),
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(configs / "preparation_summary.json", summary)
    return summary


def _prepare_character(
    src_dir: Path,
    out_dir: Path,
    char: dict[str, Any],
    cfg: PackagingConfig,
    models_dir: Path,
    training: TrainingConfig,
    used_names: set[str],
    skipped: list[dict[str, str]],
) -> dict[str, Any] | None:
    raw_name = str(char.get("name") or f"char_{char.get('cluster', 0)}")
    name = safe_name(raw_name, fallback=f"char_{char.get('cluster', 'x')}")
    base, n = name, 2
    while name in used_names:  # two hostile names may sanitise to the same folder
        name, n = f"{base}_{n}", n + 1
    used_names.add(name)
    family = get_family(training.family_of(name))
    cfg = for_family(cfg, family)
    trigger = clean_trigger(str(char.get("trigger") or raw_name), fallback=name)
    ctype = char.get("type") if char.get("type") in ("human", "yokai", "unknown") else "unknown"
    folder = _cluster_folder(src_dir, char.get("cluster", name), name)
    if folder is None:
        raise BadInputError(
            src_dir / f"cluster_{char.get('cluster')}", f"no image folder for character {name!r}"
        )

    paths, low_res = _usable_images(folder, cfg, skipped)
    if not paths:
        problem = f"no readable images for character {name!r}"
        if low_res:
            problem = (
                f"all {len(low_res)} images of character {name!r} are below min_resolution "
                f"{cfg.min_resolution} px (shorter side); set packaging.upscale_to or lower min_resolution"
            )
        raise BadInputError(folder, problem)
    sources = read_sources(folder)
    tag_doc = read_tag_summary(folder) or {}
    shuffle = caption_shuffle(tag_doc, family, training.sdxl_train_text_encoders)
    train, val, dropped = split_validation(paths, sources, cfg.validation_split, cfg.seed, name)

    # The guide's table is by the images a character has, before augmentation.
    n_originals = sum(sources.get(p.name, p.name) == p.name for p in paths)
    params = training_params(n_originals, ctype, auto=cfg.auto_params)
    total, k = len(train) + len(val), len(val)
    split = exact_validation_split(total, k)
    _, val_pos = kohya_validation_positions(total, split, cfg.seed)
    val_pos_set = set(val_pos)
    train_pos = [i for i in range(total) if i not in val_pos_set]
    assignment = dict(zip(sorted(val_pos), val, strict=True)) | dict(zip(train_pos, train, strict=True))

    char_dir = out_dir / f"{params['repeat']}_{name}"
    _remove_other_repeat_folders(out_dir, name, keep=char_dir)
    char_dir.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(total)))
    written: dict[str, str] = {}
    captions_missing = 0
    rows = []
    earlier = _earlier_rows(configs_path(out_dir, f"{name}_split.json"), char_dir)
    for pos in range(total):
        src = assignment[pos]
        stem = f"{pos:0{width}d}_{safe_name(src.stem, fallback='img')}"
        row = _packaged_image(src, char_dir / f"{stem}.png", cfg, earlier.get(f"{stem}.png"))
        text = read_caption(src.with_suffix(".txt"))
        if text is None or not text.strip():
            captions_missing += 1
            text = ""
        atomic_write_text(char_dir / f"{stem}.txt", clean_caption(text, trigger) + "\n")
        written[f"{stem}.png"] = written[f"{stem}.txt"] = src.name
        rows.append(
            {
                "file": f"{stem}.png",
                "source": src.name,
                "original": sources.get(src.name, src.name),
                "split": "validation" if pos in val_pos_set else "train",
                **row,
            }
        )
    for p in char_dir.iterdir():  # files of an earlier run with other names would be trained too
        if p.is_file() and p.name not in written and p.suffix.lower() in (*IMAGE_SUFFIXES, ".txt", ".npz"):
            p.unlink()

    prompts = configs_path(out_dir, f"{name}_sample_prompts.txt")
    atomic_write_text(prompts, sample_prompt_lines([trigger], cfg.resolution))
    ds_path = configs_path(out_dir, f"{name}_dataset.toml")
    write_toml(
        ds_path,
        build_dataset_config(
            [
                {
                    "image_dir": char_dir,
                    "num_repeats": params["repeat"],
                    "trigger": trigger,
                    "validation_split": split,
                    "shuffle_caption": shuffle,
                }
            ],
            cfg,
        ),
    )
    cfg_path = configs_path(out_dir, f"{name}_config.toml")
    write_toml(
        cfg_path,
        build_training_config(
            name=name,
            params=params,
            dataset_config=ds_path,
            sample_prompts=prompts,
            models_dir=models_dir,
            cfg=cfg,
            has_validation=k > 0,
            family=family,
            train_text_encoders=training.sdxl_train_text_encoders,
        ),
    )
    atomic_write_json(
        configs_path(out_dir, f"{name}_split.json"),
        {
            "image_dir": str(char_dir),
            "validation_split": split,
            "validation_seed": cfg.seed,
            "dropped_augmented_copies_of_validation": [p.name for p in dropped],
            "files": rows,
        },
    )
    return {
        "name": name,
        "display_name": raw_name,
        "trigger": trigger,
        "type": ctype,
        "cluster": char.get("cluster"),
        "tier": char.get("tier"),
        "source_dir": str(folder),
        "image_dir": str(char_dir),
        "original_images": n_originals,
        "train_images": len(train),
        "validation_images": k,
        "upscaled_images": sum(r["upscaled"] for r in rows),
        "low_resolution": low_res,
        "dropped_images": len(dropped),
        "captions_missing": captions_missing,
        "core_tags": list(tag_doc.get("core_tags") or []),
        "shuffle_caption": shuffle,
        "validation_split": split,
        "params": params,
        "dataset_config": str(ds_path),
        "config": str(cfg_path),
        "sample_prompts": str(prompts),
        "output_dir": str(models_dir / name),
        "family": family.name,
        "command": launch_command(cfg_path, family.kohya_script),
    }


def resolution_problem(size: tuple[int, int], cfg: PackagingConfig) -> str | None:
    """Why an image of ``size`` is too low-resolution for training after ``upscale_to``, or None."""
    short = min(size)
    if cfg.upscale_to > short:
        short = cfg.upscale_to
    if short >= cfg.min_resolution:
        return None
    return (
        f"resolution too low: {size[0]}x{size[1]}, shorter side {min(size)} px "
        f"< min_resolution {cfg.min_resolution}"
    )


def _usable_images(
    folder: Path, cfg: PackagingConfig, skipped: list[dict[str, str]]
) -> tuple[list[Path], list[dict[str, Any]]]:
    """Readable images of a character folder, and those dropped as below ``min_resolution``.

    Every image is decoded before anything is named: kohya's split depends on the final count.
    Pixels are not kept (a large cluster would not fit in memory); packaging decodes again.
    """
    paths: list[Path] = []
    low_res: list[dict[str, Any]] = []
    for p in list_images(folder):
        try:
            size = load_image(p).size
        except BadInputError as exc:
            skipped.append({"path": exc.path, "problem": exc.problem})
            continue
        dropped = low_resolution_drop(p, size, cfg)
        if dropped:
            low_res.append(dropped)
        else:
            paths.append(p)
    return paths, low_res


def low_resolution_drop(path: Path, size: tuple[int, int], cfg: PackagingConfig) -> dict[str, Any] | None:
    """The record of an image left out as below ``min_resolution`` (``low_resolution="drop"``), or None."""
    problem = resolution_problem(size, cfg)
    if problem is None or cfg.low_resolution != "drop":
        return None
    return {"path": str(path), "size": list(size), "problem": problem}


def configs_path(out_dir: Path, filename: str) -> Path:
    return out_dir / "configs" / filename


def _earlier_rows(split_json: Path, char_dir: Path) -> dict[str, dict[str, Any]]:
    """The image rows an earlier packaging of this character recorded, by output file name."""
    try:
        doc = json.loads(split_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("image_dir") != str(char_dir):
        return {}
    return {r["file"]: r for r in doc.get("files", []) if isinstance(r, dict) and "file" in r}


def _packaged_image(src: Path, out: Path, cfg: PackagingConfig, earlier: dict[str, Any] | None) -> dict:
    """Write ``src`` prepared for kohya to ``out``; the row fields that describe it.

    A re-run keeps an output whose source bytes and preparation settings (the ``stamp``) and
    file size are those recorded last time: decoding, upscaling and PNG-encoding every image of
    a finished series again would be most of a re-run's time. The outputs are the same bytes.
    """
    try:
        digest = file_sha256(src)[:32]
    except OSError:
        digest = "unreadable"  # load_image below raises the error that names the file
    settings = f"{cfg.alpha_mode}:{','.join(map(str, cfg.composite_color))}:{cfg.upscale_to}"
    stamp = f"{digest}:{settings}"
    reusable = earlier and earlier.get("stamp") == stamp and out.is_file()
    if reusable and out.stat().st_size == earlier.get("bytes"):
        keep = ("size", "source_size", "upscaled", "stamp", "bytes")
        return {k: earlier[k] for k in keep}
    source_img = load_image(src)
    img = prepare_image(source_img, cfg.alpha_mode, tuple(cfg.composite_color), cfg.upscale_to)
    png = _png_bytes(img)
    atomic_write_bytes(out, png)
    return {
        "size": list(img.size),
        "source_size": list(source_img.size),
        "upscaled": img.size != source_img.size,
        "stamp": stamp,
        "bytes": len(png),
    }


def _remove_other_repeat_folders(out_dir: Path, name: str, keep: Path) -> None:
    # A re-run with a different image count changes the repeat prefix; the old folder must go or a
    # classic train_data_dir run would train the character twice.
    for p in out_dir.glob(f"*_{name}"):
        if p.is_dir() and p != keep and re.fullmatch(r"\d+", p.name[: -len(name) - 1] or "x"):
            shutil.rmtree(p)


def multi_concept_params(results: list[dict[str, Any]], auto: bool = True) -> dict[str, Any]:
    """Parameters of one LoRA holding several characters.

    One LoRA has one rank and one learning rate, so the type adjustments are combined per
    character rather than taken from whichever type is present: the rank is the largest any
    character needs (a yokai's 48 when one is in it, else 32); the LR is the table row for the
    characters' original images together, times each type's factor weighted by that character's
    share of the training images seen per epoch (images x repeats). Each character keeps its own
    repeat count in its subset.
    """
    n_originals = sum(int(r.get("original_images", r["train_images"])) for r in results)
    params = training_params(n_originals, "human", auto=auto)
    dim = max(NETWORK_DIM.get(r["type"], 32) for r in results)
    seen = [r["train_images"] * r["params"]["repeat"] for r in results]
    factors = [YOKAI_LR_FACTOR if r["type"] == "yokai" else 1.0 for r in results]
    factor = sum(f * w for f, w in zip(factors, seen, strict=True)) / max(1, sum(seen))
    unet = _round_lr(params["unet_lr"] * factor)
    params.update(
        unet_lr=unet,
        learning_rate=unet,
        text_encoder_lr=_round_lr(params["text_encoder_lr"] * factor),
        network_dim=dim,
        network_alpha=float(dim) / 2.0,
        lr_factor=round(factor, 4),
    )
    return params


def _write_multi_concept(
    out_dir: Path,
    results: list[dict[str, Any]],
    cfg: PackagingConfig,
    models_dir: Path,
    training: TrainingConfig,
) -> dict[str, Any]:
    """One LoRA for all characters: one dataset per character folder in one dataset config.

    kohya applies ``validation_split`` per dataset, so a dataset per character (rather than one
    dataset with a subset per character) keeps each character's exact held-out images.
    """
    params = multi_concept_params(results, auto=cfg.auto_params)
    family = get_family(training.family)
    subsets = [
        {
            "image_dir": r["image_dir"],
            "num_repeats": r["params"]["repeat"],  # each character keeps its own repeat balance
            "trigger": r["trigger"],
            "validation_split": r["validation_split"],
            "shuffle_caption": bool(r.get("shuffle_caption"))
            and not caches_text_encoder_outputs(family, training.sdxl_train_text_encoders),
        }
        for r in results
    ]
    name = "multi_concept"
    cfg = for_family(cfg, family)
    prompts = configs_path(out_dir, f"{name}_sample_prompts.txt")
    atomic_write_text(prompts, sample_prompt_lines([r["trigger"] for r in results], cfg.resolution))
    ds_path = configs_path(out_dir, f"{name}_dataset.toml")
    write_toml(ds_path, build_dataset_config(subsets, cfg))
    cfg_path = configs_path(out_dir, f"{name}_config.toml")
    write_toml(
        cfg_path,
        build_training_config(
            name=name,
            params=params,
            dataset_config=ds_path,
            sample_prompts=prompts,
            models_dir=models_dir,
            cfg=cfg,
            has_validation=any(r["validation_images"] for r in results),
            family=family,
            train_text_encoders=training.sdxl_train_text_encoders,
        ),
    )
    return {
        "name": name,
        "characters": [r["name"] for r in results],
        "params": params,
        "dataset_config": str(ds_path),
        "config": str(cfg_path),
        "family": family.name,
        "command": launch_command(cfg_path, family.kohya_script),
    }


def format_preparation_summary(summary: dict[str, Any]) -> str:
    """The guide's "Preparation Complete" block with one launch command per character."""
    lines = [
        "Preparation Complete",
        "====================",
        f"  Characters prepared: {summary['characters_prepared']:,}",
        f"  Training images: {summary['training_images']:,}",
        f"  Validation images: {summary['validation_images']:,}",
        f"  Output: {summary['output_dir']}",
    ]
    if summary.get("skipped"):
        lines.append(f"  Skipped inputs: {len(summary['skipped'])} (see configs/preparation_summary.json)")
    if summary.get("low_resolution"):
        lines.append(
            f"  Below min_resolution {summary['min_resolution']} px, left out: "
            f"{len(summary['low_resolution'])} (see configs/preparation_summary.json)"
        )
    if summary.get("upscaled_images"):
        lines.append(f"  Upscaled (packaging.upscale_to): {summary['upscaled_images']}")
    lines += ["", "Ready to train! Example commands:"]
    for i, r in enumerate(summary["characters"], 1):
        lines.append(f"{i}. {r['name']}:")
        lines.append(f"   {r['command']}")
        if r.get("core_tags"):
            lines.append(
                f"   core tags (left out of captions, learned by {r['trigger']}): {', '.join(r['core_tags'])}"
            )
    multi = summary.get("multi_concept")
    if multi:
        lines.append(f"{len(summary['characters']) + 1}. {multi['name']} ({', '.join(multi['characters'])}):")
        lines.append(f"   {multi['command']}")
    lines.append("(run from your kohya-ss/sd-scripts checkout)")
    return "\n".join(lines)
