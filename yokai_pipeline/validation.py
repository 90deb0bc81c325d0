"""Validate a kohya training-data folder before training (guide step 6).

``DIR`` is a train_data_dir as written by :mod:`yokai_pipeline.kohya`: ``{repeat}_{name}/``
folders of image + ``.txt`` pairs and a ``configs/`` folder of TOMLs. Checked:

* per pair: image integrity (PIL verify, then a full decode: truncated files fail), resolution
  (shorter side below ``min_resolution`` is an issue), aspect ratio (beyond 4:1 a warning),
  caption present, UTF-8 and not empty (issues), very short caption (< 3 words, warning),
  several caption lines (warning: kohya reads the first), filename conventions (warning);
  caption tokens (comma-separated): the trigger word (the subset's ``class_tokens``) not first is
  an issue (``keep_tokens = 1`` would pin another token), a caption with nothing after the
  trigger ("Empty tag list") and a token written twice ("Duplicate tags") are warnings;
* structure: a folder without an int repeat prefix or with repeats < 1 holding images is an issue
  (kohya skips it silently), images outside any repeat folder, nested folders and stray files are
  warnings, captions without an image are warnings;
* configs: every ``configs/*.toml`` against kohya's dataset-config schema (keys per level, types,
  required image_dir, caption_extension ".txt", resolution) or train_network.py's argument types,
  plus the paths they point at (image_dir must be one character's own folder).

The report is JSON (written atomically when ``report_path`` is given); the summary text follows
the guide. The data passes only with no invalid pair, no structure issue and no config issue.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import YokaiError
from yokai_pipeline.fsio import atomic_write_json, read_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CAPTION_SUFFIX = ".txt"
IGNORED_IN_IMAGE_DIR = {".npz"}  # kohya's own latent caches live next to the images
METADATA_SUFFIXES = {".json", ".jsonl", ".toml", ".md", ".txt", ".sh", ".log"}
CONFIG_DIRS = {"configs"}
MAX_ASPECT = 4.0
MIN_CAPTION_WORDS = 3
_FILENAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
_REPEAT_DIR = re.compile(r"^(-?\d+)_(.*)$")

# ---------------------------------------------------------------- kohya rules (product side)
# Key sets of sd-scripts' library/config_util.py ConfigSanitizer (DreamBooth datasets).
_NUM = (int, float)
_SUBSET_ASCENDABLE: dict[str, Any] = {
    "color_aug": bool,
    "face_crop_aug_range": "pair_float",
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
    "token_warmup_step": _NUM,
    "caption_prefix": str,
    "caption_suffix": str,
    "custom_attributes": dict,
    "resize_interpolation": str,
    "caption_dropout_every_n_epochs": int,
    "caption_dropout_rate": _NUM,
    "caption_tag_dropout_rate": _NUM,
    "caption_extension": str,
    "class_tokens": str,
    "cache_info": bool,
}
_SUBSET_ONLY: dict[str, Any] = {"image_dir": str, "is_reg": bool, "alpha_mask": bool}
_DATASET_ONLY: dict[str, Any] = {
    "batch_size": int,
    "bucket_no_upscale": bool,
    "bucket_reso_steps": int,
    "enable_bucket": bool,
    "max_bucket_reso": int,
    "min_bucket_reso": int,
    "validation_seed": int,
    "validation_split": float,
    "resolution": "reso",
    "network_multiplier": float,
}
SUBSET_SCHEMA = {**_SUBSET_ASCENDABLE, **_SUBSET_ONLY}
DATASET_SCHEMA = {**_SUBSET_ASCENDABLE, **_DATASET_ONLY}
GENERAL_SCHEMA = DATASET_SCHEMA

# train_network.py argparse types for the keys we write or that commonly appear.
TRAIN_ARG_SCHEMA: dict[str, Any] = {
    **{
        k: str
        for k in (
            "pretrained_model_name_or_path",
            "output_dir",
            "output_name",
            "save_model_as",
            "save_precision",
            "optimizer_type",
            "lr_scheduler",
            "network_module",
            "mixed_precision",
            "logging_dir",
            "log_with",
            "sample_prompts",
            "sample_sampler",
            "dataset_config",
            "train_data_dir",
            "resolution",
            "caption_extension",
            "network_weights",
            "vae",
            "log_prefix",
        )
    },
    **{
        k: int
        for k in (
            "save_every_n_epochs",
            "max_train_epochs",
            "max_train_steps",
            "train_batch_size",
            "network_dim",
            "seed",
            "clip_skip",
            "sample_every_n_epochs",
            "validation_seed",
            "validate_every_n_epochs",
            "max_validation_steps",
            "keep_tokens",
            "max_data_loader_n_workers",
            "gradient_accumulation_steps",
            "max_token_length",
            "save_last_n_epochs",
        )
    },
    **{
        k: float
        for k in (
            "learning_rate",
            "unet_lr",
            "text_encoder_lr",
            "network_alpha",
            "noise_offset",
            "min_snr_gamma",
            "validation_split",
            "network_dropout",
            "max_grad_norm",
        )
    },
    **{
        k: bool
        for k in (
            "network_train_unet_only",
            "network_train_text_encoder_only",
            "gradient_checkpointing",
            "cache_latents",
            "cache_latents_to_disk",
            "masked_loss",
            "alpha_mask",
            "enable_bucket",
            "bucket_no_upscale",
            "color_aug",
            "random_crop",
            "flip_aug",
            "xformers",
            "sdpa",
            "shuffle_caption",
            "persistent_data_loader_workers",
        )
    },
    "lr_warmup_steps": _NUM,
    "network_args": list,
}
TRAIN_ARG_CHOICES = {
    "save_model_as": {"ckpt", "pt", "safetensors"},
    "mixed_precision": {"no", "fp16", "bf16"},
    "save_precision": {"float", "fp16", "bf16"},
    "log_with": {"tensorboard", "wandb", "all"},
}


def _is_type(value: Any, kind: Any) -> bool:
    if kind == "pair_float":
        return isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value)
    if kind == "reso":
        return _is_type(value, int) or (
            isinstance(value, list) and len(value) == 2 and all(_is_type(v, int) for v in value)
        )
    if isinstance(value, bool):  # bool is an int subclass in Python; TOML keeps them apart
        return kind is bool
    if kind == _NUM:
        return isinstance(value, _NUM)
    return isinstance(value, kind)


def _kind_name(kind: Any) -> str:
    return {"pair_float": "[float, float]", "reso": "int or [int, int]"}.get(kind, None) or (
        "number" if kind == _NUM else getattr(kind, "__name__", str(kind))
    )


def _keys_problems(where: str, table: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    out = []
    for key, value in table.items():
        if key not in schema:
            out.append(f"{where}: key {key!r} not allowed here (kohya rejects it)")
        elif not _is_type(value, schema[key]):
            out.append(f"{where}: {key!r} must be {_kind_name(schema[key])}, got {value!r}")
    return out


def check_dataset_config(doc: dict[str, Any]) -> list[str]:
    """Problems sd-scripts would raise (or silently mis-handle) for a dataset config.

    Args:
        doc: the parsed ``--dataset_config`` TOML.

    Returns:
        Human-readable problems; empty when kohya accepts the config as it is.
    """
    problems = [
        f"top level: key {k!r} not allowed (only [general] and [[datasets]])"
        for k in doc
        if k not in ("general", "datasets")
    ]
    general = doc.get("general", {})
    if not isinstance(general, dict):
        return [*problems, "[general] must be a table"]
    problems += _keys_problems("[general]", general, GENERAL_SCHEMA)
    datasets = doc.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        return [*problems, "no [[datasets]] table"]
    for i, ds in enumerate(datasets):
        if not isinstance(ds, dict):
            problems.append(f"datasets[{i}] must be a table")
            continue
        problems += _keys_problems(
            f"datasets[{i}]", {k: v for k, v in ds.items() if k != "subsets"}, DATASET_SCHEMA
        )
        if "resolution" not in ds and "resolution" not in general:
            problems.append(f"datasets[{i}]: resolution missing (kohya asserts at start)")
        subsets = ds.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            problems.append(f"datasets[{i}]: no [[datasets.subsets]]")
            continue
        for j, sub in enumerate(subsets):
            where = f"datasets[{i}].subsets[{j}]"
            problems += _keys_problems(where, sub, SUBSET_SCHEMA)
            if "image_dir" not in sub:
                problems.append(f"{where}: image_dir missing (required)")
            ext = _lookup("caption_extension", sub, ds, general)
            if ext is None:
                problems.append(
                    f"{where}: caption_extension missing (kohya looks for .caption; .txt captions ignored)"
                )
            elif ext != CAPTION_SUFFIX:
                problems.append(f"{where}: caption_extension is {ext!r}, captions here are '.txt'")
    return problems


def _lookup(key: str, *levels: dict[str, Any]) -> Any:
    for level in levels:
        if key in level:
            return level[key]
    return None


def check_training_args(doc: dict[str, Any], dataset_doc: dict[str, Any] | None = None) -> list[str]:
    """Problems of a train_network.py ``--config_file`` TOML (kohya flattens its sections).

    kohya never type-converts config-file values and keeps unknown keys silently, so wrong types and
    misspelt keys are reported here.
    """
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    problems = []
    for key, value in flat.items():
        if key not in TRAIN_ARG_SCHEMA:
            problems.append(f"unknown key {key!r} (kohya ignores it silently; misspelt?)")
        elif not _is_type(value, TRAIN_ARG_SCHEMA[key]):
            problems.append(f"{key!r} must be {_kind_name(TRAIN_ARG_SCHEMA[key])}, got {value!r}")
        elif key in TRAIN_ARG_CHOICES and value not in TRAIN_ARG_CHOICES[key]:
            problems.append(f"{key!r} = {value!r} is not one of {sorted(TRAIN_ARG_CHOICES[key])}")
    for key in ("pretrained_model_name_or_path", "output_dir", "network_module"):
        if key not in flat:
            problems.append(f"{key!r} missing")
    if "dataset_config" not in flat and "train_data_dir" not in flat:
        problems.append("neither dataset_config nor train_data_dir: no training data")
    subsets = [s for ds in (dataset_doc or {}).get("datasets", []) for s in ds.get("subsets", [])]
    if flat.get("cache_latents"):
        augs = [flat.get("color_aug"), flat.get("random_crop")] + [
            s.get("color_aug") or s.get("random_crop") for s in subsets
        ]
        if any(augs):
            problems.append("cache_latents together with color_aug or random_crop (kohya asserts)")
    if flat.get("masked_loss") and not (flat.get("alpha_mask") or any(s.get("alpha_mask") for s in subsets)):
        problems.append("masked_loss without alpha_mask: the alpha channel is never loaded")
    return problems


# ---------------------------------------------------------------- per-pair checks


def check_image(path: Path, min_resolution: int) -> tuple[dict[str, Any], list[str], list[str]]:
    """Integrity, resolution and aspect ratio of one image: (info, issues, warnings)."""
    from PIL import Image

    info: dict[str, Any] = {}
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums; the image cannot be used afterwards
        with Image.open(path) as im:
            im.load()  # full decode: truncated files fail here
            info = {"width": im.width, "height": im.height, "mode": im.mode, "format": im.format}
    except Exception as exc:  # PIL raises many types for broken files
        return {"error": str(exc)}, ["Corrupt or unreadable image"], []
    issues, warnings = [], []
    w, h = info["width"], info["height"]
    if min(w, h) < min_resolution:
        issues.append("Resolution too low")
    if max(w, h) / max(1, min(w, h)) > MAX_ASPECT:
        warnings.append("Extreme aspect ratio")
    return info, issues, warnings


def check_caption(path: Path) -> tuple[str | None, list[str], list[str]]:
    """Presence, encoding and length of the caption file of one image: (text, issues, warnings)."""
    if not path.exists():
        return None, ["Caption file missing"], []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None, ["Caption not UTF-8"], []
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return text, ["Empty caption"], []
    warnings = []
    if len(lines) > 1:
        warnings.append("Multi-line caption (kohya reads only the first line)")
    if len(re.findall(r"\w+", lines[0])) < MIN_CAPTION_WORDS:
        warnings.append("Very short caption")
    return text, [], warnings


def check_caption_tokens(text: str, trigger: str | None) -> tuple[list[str], list[str]]:
    """Trigger first, a non-empty tag list and no repeated tag in a caption's first line: (issues, warnings)."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    tokens = [t.strip() for t in line.split(",") if t.strip()]
    issues, warnings = [], []
    if trigger and (not tokens or tokens[0] != trigger):
        issues.append("Trigger word not first")
    if trigger and len(tokens) <= 1:
        warnings.append("Empty tag list")
    lowered = [t.lower() for t in tokens]
    if len(set(lowered)) < len(lowered):
        warnings.append("Duplicate tags")
    return issues, warnings


def _folder_triggers(configs: Path) -> dict[Path, str]:
    """image_dir -> class_tokens (the trigger word) from the dataset TOMLs in ``configs``."""
    out: dict[Path, str] = {}
    for path in sorted(configs.glob("*.toml")) if configs.is_dir() else []:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
            continue  # reported by the config checks
        for ds in doc.get("datasets", []) if isinstance(doc.get("datasets"), list) else []:
            for sub in ds.get("subsets", []) if isinstance(ds, dict) else []:
                if (
                    isinstance(sub, dict)
                    and isinstance(sub.get("class_tokens"), str)
                    and sub.get("image_dir")
                ):
                    out[Path(str(sub["image_dir"])).resolve()] = sub["class_tokens"]
    return out


def check_filename(name: str) -> list[str]:
    """Warnings for names that break shell commands or other tools (spaces, odd characters)."""
    return [] if _FILENAME_OK.match(name) else ["Unusual characters in filename"]


# ---------------------------------------------------------------- the stage


def validate_training_data(
    data_dir: str | Path, *, min_resolution: int = 512, report_path: str | Path | None = None
) -> dict[str, Any]:
    """Check a kohya training-data folder.

    Args:
        data_dir: the train_data_dir (``{repeat}_{name}/`` folders and ``configs/``).
        min_resolution: images whose shorter side is below this are invalid.
        report_path: write the JSON report here (atomically) when given.

    Returns:
        The report: totals, per-pair results, issue/warning counts, structure and config problems,
        and ``passed``.
    """
    root = Path(data_dir).resolve()
    pairs: list[dict[str, Any]] = []
    structure_issues: list[dict[str, str]] = []
    structure_warnings: list[dict[str, str]] = []
    config_issues: list[dict[str, str]] = []
    folders: list[dict[str, Any]] = []
    triggers = _folder_triggers(root / "configs")

    if not root.is_dir():
        structure_issues.append({"path": str(root), "problem": "Training data folder does not exist"})
        entries: list[Path] = []
    else:
        entries = sorted(root.iterdir())
    for entry in entries:
        rel = entry.name
        if entry.is_file():
            suffix = entry.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                structure_warnings.append(
                    {"path": rel, "problem": "Image outside any repeat folder (kohya ignores it)"}
                )
            elif suffix not in METADATA_SUFFIXES:
                structure_warnings.append({"path": rel, "problem": "Stray file"})
            continue
        if not entry.is_dir() or entry.name in CONFIG_DIRS:
            continue
        m = _REPEAT_DIR.match(entry.name)
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in entry.rglob("*") if p.is_file())
        if m is None or int(m.group(1)) < 1:
            problem = (
                f"Directory without repeat prefix (kohya skips it): {entry.name}"
                if m is None
                else f"Repeat count below 1 (kohya skips it): {entry.name}"
            )
            if has_images:
                structure_issues.append({"path": rel, "problem": problem})
            else:
                structure_warnings.append({"path": rel, "problem": problem})
            continue
        folders.append({"folder": rel, "repeats": int(m.group(1)), "name": m.group(2)})
        trigger = triggers.get(entry.resolve())
        pairs += _validate_folder(root, entry, min_resolution, structure_warnings, trigger)

    if root.is_dir() and not folders:
        structure_issues.append({"path": str(root), "problem": "No {repeat}_{name} folder with images"})
    if (root / "configs").is_dir():
        config_issues += _validate_configs(root, root / "configs")

    issue_counts = Counter(i for p in pairs for i in p["issues"])
    warning_counts = Counter(w for p in pairs for w in p["warnings"])
    warning_counts.update(_short(w["problem"]) for w in structure_warnings)
    issue_counts_struct = Counter(_short(i["problem"]) for i in structure_issues)
    invalid = sum(1 for p in pairs if p["issues"])
    total = len(pairs)
    report = {
        "root": str(root),
        "min_resolution": min_resolution,
        "folders": folders,
        "total_images": total,
        "valid_pairs": total - invalid,
        "invalid_pairs": invalid,
        "pairs_with_warnings": sum(1 for p in pairs if p["warnings"]),
        "valid_percent": round(100.0 * (total - invalid) / total, 1) if total else 0.0,
        "issue_counts": dict(issue_counts.most_common()),
        "warning_counts": dict(warning_counts.most_common()),
        "structure_issue_counts": dict(issue_counts_struct.most_common()),
        "structure_issues": structure_issues,
        "structure_warnings": structure_warnings,
        "config_issues": config_issues,
        "pairs": pairs,
        "passed": bool(total) and invalid == 0 and not structure_issues and not config_issues,
    }
    if report_path is not None:
        atomic_write_json(report_path, report)
    return report


class ValidationFailed(YokaiError):
    """Training data did not validate (or was not validated); the message names the report."""


def require_passed(report_path: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """The validation report at ``report_path`` if it passed; otherwise ValidationFailed naming it.

    The guide: validate to 100% before training. A report older than the packaging summary in
    ``data_dir/configs`` describes data that has since been rewritten, so it does not count.

    Args:
        report_path: the JSON report written by :func:`validate_training_data`.
        data_dir: the validated folder (optional staleness check against its packaging summary).
    """
    path = Path(report_path)
    if not path.is_file():
        raise ValidationFailed(f"{path}: no validation report; validate the training data before training")
    try:
        report = read_json(path)
    except (OSError, ValueError) as exc:
        raise ValidationFailed(f"{path}: unreadable validation report ({exc})") from exc
    packaged = Path(data_dir) / "configs" / "preparation_summary.json" if data_dir else None
    if packaged is not None and packaged.is_file() and packaged.stat().st_mtime > path.stat().st_mtime:
        raise ValidationFailed(f"{path}: older than {packaged}; validate the re-packaged data first")
    if not report.get("passed"):
        counts = {**report.get("issue_counts", {}), **report.get("structure_issue_counts", {})}
        what = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "see the report"
        raise ValidationFailed(
            f"training data failed validation ({report.get('valid_percent', 0)}% valid pairs; {what}); "
            f"training not started. Report: {path}"
        )
    return report


def _short(problem: str) -> str:
    return problem.split(":")[0]


def _validate_folder(
    root: Path,
    folder: Path,
    min_resolution: int,
    structure_warnings: list[dict[str, str]],
    trigger: str | None = None,
) -> list[dict[str, Any]]:
    pairs = []
    images = set()
    for p in sorted(folder.iterdir()):
        rel = p.relative_to(root).as_posix()
        if p.is_dir():
            structure_warnings.append({"path": rel, "problem": "Nested folder (kohya does not read it)"})
            continue
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.add(p.stem)
            info, issues, warnings = check_image(p, min_resolution)
            caption_path = p.with_suffix(CAPTION_SUFFIX)
            text, c_issues, c_warnings = check_caption(caption_path)
            if text is not None and not c_issues:
                t_issues, t_warnings = check_caption_tokens(text, trigger)
                c_issues, c_warnings = c_issues + t_issues, c_warnings + t_warnings
            pairs.append(
                {
                    "image": rel,
                    "caption": caption_path.relative_to(root).as_posix() if caption_path.exists() else None,
                    "folder": folder.name,
                    **{k: v for k, v in info.items() if k in ("width", "height", "mode", "error")},
                    "issues": issues + c_issues,
                    "warnings": warnings + c_warnings + check_filename(p.name),
                }
            )
        elif suffix == CAPTION_SUFFIX or suffix in IGNORED_IN_IMAGE_DIR:
            continue
        else:
            structure_warnings.append({"path": rel, "problem": "Stray file"})
    for p in sorted(folder.glob(f"*{CAPTION_SUFFIX}")):
        if p.stem not in images:
            structure_warnings.append(
                {"path": p.relative_to(root).as_posix(), "problem": "Caption without image"}
            )
    return pairs


def _validate_configs(root: Path, configs: Path) -> list[dict[str, str]]:
    issues: list[dict[str, str]] = []
    docs: dict[Path, dict[str, Any]] = {}
    for path in sorted(configs.glob("*.toml")):
        try:
            docs[path.resolve()] = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            issues.append({"path": path.name, "problem": f"Invalid TOML: {exc}"})
    for path, doc in docs.items():
        name = path.name
        if "datasets" in doc or "general" in doc:
            issues += [
                {"path": name, "problem": f"Invalid kohya dataset config: {p}"}
                for p in check_dataset_config(doc)
            ]
            for ds in doc.get("datasets", []) if isinstance(doc.get("datasets"), list) else []:
                for sub in ds.get("subsets", []) if isinstance(ds, dict) else []:
                    issues += [
                        {"path": name, "problem": p} for p in _check_image_dir(root, sub.get("image_dir"))
                    ]
            continue
        flat = {k: v for sec in doc.values() if isinstance(sec, dict) for k, v in sec.items()}
        flat.update({k: v for k, v in doc.items() if not isinstance(v, dict)})
        ds_doc = None
        ds_ref = flat.get("dataset_config")
        if isinstance(ds_ref, str):
            ds_path = Path(ds_ref).resolve()
            ds_doc = docs.get(ds_path)
            if ds_doc is None and not ds_path.exists():
                issues.append({"path": name, "problem": f"dataset_config does not exist: {ds_ref}"})
        tdd = flat.get("train_data_dir")
        if isinstance(tdd, str) and ds_ref is None and Path(tdd).resolve() == root:
            issues.append(
                {
                    "path": name,
                    "problem": "train_data_dir is the parent: every character trains on all characters",
                }
            )
        issues += [
            {"path": name, "problem": f"Invalid kohya training config: {p}"}
            for p in check_training_args(doc, ds_doc)
        ]
    return issues


def _check_image_dir(root: Path, image_dir: Any) -> list[str]:
    if not isinstance(image_dir, str):
        return []
    d = Path(image_dir)
    if not d.is_absolute():
        return [f"image_dir {image_dir!r} is relative (kohya resolves it from the sd-scripts folder)"]
    if not d.is_dir():
        return [f"image_dir does not exist: {image_dir}"]
    if d.resolve() == root:
        return ["image_dir is the parent folder (kohya finds no images directly in it)"]
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir() if p.is_file()):
        return [f"image_dir has no images: {image_dir}"]
    return []


def format_validation_summary(report: dict[str, Any]) -> str:
    """The guide's "Validation Summary" block, ending in PASSED or FAILED."""
    lines = [
        "Validation Summary",
        "==================",
        "Training Set:",
        f"  Total images: {report['total_images']:,}",
        f"  Valid pairs: {report['valid_pairs']:,} ({report['valid_percent']:.1f}%)",
        f"  Invalid pairs: {report['invalid_pairs']:,}",
        f"  Pairs with warnings: {report['pairs_with_warnings']:,}",
    ]
    issues = Counter(report.get("issue_counts", {}))
    issues.update(report.get("structure_issue_counts", {}))
    if issues:
        lines += ["", "Common Issues:"]
        lines += [f"  - {k}: {v} occurrences" for k, v in issues.most_common()]
    if report.get("warning_counts"):
        lines += ["", "Common Warnings:"]
        lines += [f"  - {k}: {v} occurrences" for k, v in report["warning_counts"].items()]
    if report.get("structure_issues"):
        lines += ["", "Structure Issues:"]
        lines += [f"  - {i['path']}: {i['problem']}" for i in report["structure_issues"]]
    if report.get("config_issues"):
        lines += ["", "Config Issues:"]
        lines += [f"  - {i['path']}: {i['problem']}" for i in report["config_issues"]]
    lines.append("")
    if report["passed"]:
        lines.append("✅ VALIDATION PASSED - Training data is ready")
    else:
        lines.append("❌ VALIDATION FAILED - Fix the issues above and re-run validation")
    return "\n".join(lines)
