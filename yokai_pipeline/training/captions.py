"""Captions as kohya reads and transforms them (library/train_util.py read_caption, process_caption)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import BadInputError


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
