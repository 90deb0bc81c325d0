"""A packaged kohya dataset as sd-scripts reads it: subsets, validation split, buckets, pixels.

Pure functions over paths and small records; pixels are loaded one image at a time by
:func:`load_training_image` (the loop's loader threads call it).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import BadInputError
from yokai_pipeline.training.buckets import make_bucket_resolutions, select_bucket
from yokai_pipeline.training.captions import read_caption
from yokai_pipeline.training.kohya_args import _resolution, read_toml, resolve_config_path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

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


@dataclass(frozen=True)
class TrainItem:
    """One image of a subset, with its caption and bucket."""

    path: Path
    caption: str
    subset: int
    bucket: tuple[int, int]
    resized: tuple[int, int]
    repeats: int = 1
    # Stored (width, height): SDXL is conditioned on it (original_size of its add_time_ids).
    size: tuple[int, int] = (0, 0)


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
        user = read_toml(ds_path, "dataset config")
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
                    target.append(TrainItem(path, caption, si, bucket, resized, reps, size))
    if not any(spec.train for spec in specs):
        first = specs[0].subsets[0].image_dir if specs and specs[0].subsets else Path(".")
        raise BadInputError(first, "no training images found in any subset")
    return specs


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
