"""Booru tags per image (the vocabulary anime base models were trained on).

Every image of a character folder gets a sidecar ``<image>.tags.json``::

    {"version": 1, "signature": {...}, "general": {"1girl": 0.98, "long_hair": 0.91},
     "character": {}, "rating": {"general": 0.93, "sensitive": 0.06, ...}}

with each kept tag's probability (rating kept apart: it never goes into a caption). A folder
also gets ``tag_summary.json``: the most frequent tags and the *core tags* (on at least
``core_tag_ratio`` of its images: hair and eye colour, signature clothing), which captions
leave out so the trigger word learns them (:func:`yokai_pipeline.captioning.caption_folder`).
Images whose sidecar matches the current settings are skipped, so a re-run resumes.

Taggers (:func:`get_tagger`):

* ``wd14``: SmilingWolf's v3 taggers (:mod:`yokai_pipeline.models.wd14`). General and
  character tags above their thresholds (0.35 / 0.85, the wd-tagger space's defaults), or
  above the per-image MCut threshold (the midpoint of the largest gap between sorted scores).
* ``offline``: no weights, only what can be read off the layer: ``<colour>_theme`` from the
  dominant fill colours, ``solo`` / ``multiple_others`` from the number of figures in the alpha
  (for an opaque crop: of characters in its source frame, from the manifest), ``full_body`` / ``upper_body`` / ``portrait`` from
  the layer manifest's ``crop_kind`` when it has one, and ``transparent_background`` /
  ``simple_background`` / ``white_background`` from the alpha and the border. No rating.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from yokai_pipeline.config import TagConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import atomic_write_json, finish_writes, read_image, read_json, read_jsonl

SIDECAR_VERSION = 1
SUMMARY_NAME = "tag_summary.json"
TOP_TAGS = 12

#: Tags written with their underscores (emoticons), as the wd-tagger space keeps them.
KAOMOJI = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }  # fmt: skip
)
_CROP_TAGS = {"full": "full_body", "full_body": "full_body", "upper": "upper_body", "upper_body": "upper_body",
              "bust": "portrait", "portrait": "portrait", "head": "portrait", "face": "portrait"}  # fmt: skip
_COLOUR_TAGS = {"cyan": "aqua"}  # our colour names -> Danbooru's *_theme names


class Tagger(Protocol):
    """Turns images into ``{"general": {tag: p}, "character": {tag: p}, "rating": {tag: p}}``."""

    name: str

    def tag(
        self, items: Sequence[Any], metas: Sequence[Mapping[str, Any]], errors: list[tuple[int, str]]
    ) -> list[dict[str, dict[str, float]] | None]: ...


# --- thresholds ------------------------------------------------------------------------------


def mcut_threshold(probs: np.ndarray) -> float:
    """Maximum Cut Thresholding: the midpoint of the largest gap between sorted scores.

    Largeron, Moulin and Géry (2012), MCut: a thresholding strategy for multi-label
    classification; the wd-tagger space offers it per category.
    """
    p = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    if len(p) < 2:
        return float(p[0]) if len(p) else 1.0
    t = int(np.argmax(p[:-1] - p[1:]))
    return float((p[t] + p[t + 1]) / 2)


def select_tags(probs: np.ndarray, names: Sequence[str], categories: Sequence[str], cfg: TagConfig) -> dict:
    """Tags of one image kept per category, most probable first; all rating scores.

    Args:
        probs: ``[tags]`` probabilities in model output order.
        names: tag names in the same order.
        categories: ``general`` / ``character`` / ``rating`` / other per tag.
        cfg: thresholds and MCut switches.

    Returns:
        ``{"general": {tag: p}, "character": {tag: p}, "rating": {tag: p}}`` (rounded to 4 places).
    """
    cats = np.asarray(categories)
    probs = np.asarray(probs, dtype=np.float64)
    out: dict[str, dict[str, float]] = {}
    for cat, thresh, mcut, floor in (
        ("general", cfg.general_threshold, cfg.general_mcut, 0.0),
        ("character", cfg.character_threshold, cfg.character_mcut, 0.15),  # the space's MCut floor
        ("rating", 0.0, False, 0.0),
    ):
        idx = np.flatnonzero(cats == cat)
        p = probs[idx]
        if mcut and len(p):
            thresh = max(floor, mcut_threshold(p))
        keep = idx[p >= thresh] if cat != "rating" else idx
        keep = keep[np.argsort(-probs[keep], kind="stable")]
        out[cat] = {names[i]: round(float(probs[i]), 4) for i in keep}
    return out


def format_tag(tag: str) -> str:
    """A tag as kohya users write it: underscores to spaces (emoticons kept), parentheses escaped."""
    tag = tag.strip()
    if tag not in KAOMOJI:
        tag = tag.replace("_", " ")
    return tag.replace("\\", "").replace("(", r"\(").replace(")", r"\)")


def core_tags(tag_lists: Sequence[Sequence[str]], ratio: float, never: Sequence[str] = ()) -> list[str]:
    """Tags on at least ``ratio`` of the images (most frequent first), except those in ``never``."""
    if not tag_lists:
        return []
    counts = Counter(t for tags in tag_lists for t in set(tags))
    need = ratio * len(tag_lists)
    skip = set(never)
    return [
        t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= need and t not in skip
    ]


# --- offline tagger --------------------------------------------------------------------------


def offline_tags(rgba: np.ndarray, meta: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """What can honestly be told from a layer without a model (see the module docstring).

    Args:
        rgba: ``H x W x 4`` uint8 (an RGB array counts as opaque).
        meta: the layer's manifest facts: ``crop_kind`` and ``instances`` (characters in its
            frame; used for opaque crops, a cut-out's alpha tells itself).

    Returns:
        Tag dict; rule tags score 1.0, colour tags their share of the figure's pixels.
    """
    from yokai_pipeline.captioning import colour_names

    meta = meta or {}
    if rgba.shape[-1] == 3:
        rgba = np.dstack([rgba, np.full(rgba.shape[:2], 255, np.uint8)])
    general: dict[str, float] = {}
    for name in colour_names(rgba, top=2):
        general[f"{_COLOUR_TAGS.get(name, name)}_theme"] = 1.0
    # A cut-out layer shows what its alpha holds; an opaque crop shows its frame, so the
    # manifest's count of characters in that frame is the best we know.
    n = meta.get("instances")
    opaque = bool((rgba[..., 3] >= 128).all())
    n = int(n) if opaque and isinstance(n, int | float) and n > 0 else _figures(rgba[..., 3])
    if n:
        general["solo" if n == 1 else "multiple_others"] = 1.0
    crop = _CROP_TAGS.get(str(meta.get("crop_kind", "")).lower())
    if crop:
        general[crop] = 1.0
    general.update(_background_tags(rgba))
    return {"general": general, "character": {}, "rating": {}}


def _figures(alpha: np.ndarray) -> int:
    """Separate figures in an alpha mask: blobs at least 15 % the size of the largest."""
    import cv2

    n, _, stats, _ = cv2.connectedComponentsWithStats((alpha > 127).astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    return int((areas >= 0.15 * areas.max()).sum()) if len(areas) else 0


def _background_tags(rgba: np.ndarray) -> dict[str, float]:
    alpha = rgba[..., 3]
    if (alpha < 128).mean() > 0.02:
        return {"transparent_background": 1.0}
    border = np.concatenate([rgba[0, :, :3], rgba[-1, :, :3], rgba[:, 0, :3], rgba[:, -1, :3]]).astype(float)
    if border.std(axis=0).max() > 12:
        return {}
    tags = {"simple_background": 1.0}
    if border.mean(axis=0).min() > 235:
        tags["white_background"] = 1.0
    return tags


class OfflineTagger:
    """Tagger without weights: :func:`offline_tags` per image."""

    name = "offline"

    def tag(
        self, items: Sequence[Any], metas: Sequence[Mapping[str, Any]], errors: list[tuple[int, str]]
    ) -> list[dict[str, dict[str, float]] | None]:
        out: list[dict[str, dict[str, float]] | None] = []
        for i, (item, meta) in enumerate(zip(items, metas, strict=True)):
            try:
                out.append(offline_tags(np.asarray(read_image(item).convert("RGBA")), meta))
            except BadInputError as exc:
                errors.append((i, f"{exc.path}: {exc.problem}"))
                out.append(None)
        return out


class Wd14Backend:
    """A WD14 tagger with this config's thresholds."""

    name = "wd14"

    def __init__(self, cfg: TagConfig, tagger: Any = None):
        from yokai_pipeline.models.wd14 import Wd14Tagger

        self.cfg = cfg
        self.tagger = tagger or Wd14Tagger(
            cfg.model, cfg.device, batch_size=cfg.batch_size, num_workers=cfg.num_workers, runtime=cfg.runtime
        )

    def tag(
        self, items: Sequence[Any], metas: Sequence[Mapping[str, Any]], errors: list[tuple[int, str]]
    ) -> list[dict[str, dict[str, float]] | None]:
        mine: list[tuple[int, str]] = []
        probs = self.tagger.predict(items, errors=mine)
        errors.extend(mine)
        bad = {i for i, _ in mine}
        ts = self.tagger.tags
        return [
            None if i in bad else select_tags(p, ts.names, ts.categories, self.cfg)
            for i, p in enumerate(probs)
        ]


def get_tagger(cfg: TagConfig) -> Tagger:
    """The tagger ``cfg.backend`` names (WD14 weights load once per process)."""
    if cfg.backend == "offline":
        return OfflineTagger()
    if cfg.backend == "wd14":
        return Wd14Backend(cfg)
    raise ValueError(f"unknown tag backend {cfg.backend!r}")  # pragma: no cover - pydantic rejects it


# --- sidecars and the folder stage -----------------------------------------------------------


def sidecar_path(image: str | Path) -> Path:
    """``x.png`` -> ``x.tags.json``."""
    return Path(image).with_suffix(".tags.json")


def tag_signature(cfg: TagConfig) -> dict[str, Any]:
    """The settings that change which tags a sidecar holds."""
    sig: dict[str, Any] = {"backend": cfg.backend, "version": SIDECAR_VERSION}
    if cfg.backend == "wd14":
        sig.update(
            model=cfg.model,
            general_threshold=cfg.general_threshold,
            character_threshold=cfg.character_threshold,
            general_mcut=cfg.general_mcut,
            character_mcut=cfg.character_mcut,
        )
    return sig


def read_tags(image: str | Path, signature: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """An image's sidecar, or None when missing, unreadable or (given ``signature``) stale."""
    path = sidecar_path(image)
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
    except (ValueError, OSError, BadInputError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("general"), dict):
        return None
    if signature is not None and doc.get("signature") != dict(signature):
        return None
    return doc


def caption_tags(doc: Mapping[str, Any]) -> list[str]:
    """The tags of a sidecar that go into a caption: character tags, then general, by probability."""

    def ranked(tags: Mapping[str, float]) -> list[str]:
        return [t for t, _ in sorted(tags.items(), key=lambda kv: (-float(kv[1]), kv[0]))]

    return [*ranked(doc.get("character", {})), *ranked(doc.get("general", {}))]


def layer_meta(manifests_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Layer id (and crop file stem) -> ``{"crop_kind", "instances"}`` from the layer manifests (offline tagger facts)."""
    from yokai_pipeline.crops import crop_stem

    rows = [r for p in sorted(Path(manifests_dir).glob("*.jsonl")) for r in read_jsonl(p)]
    rows = [r for r in rows if r.get("kind", "character") == "character" and "layer_id" in r]
    per_frame = Counter(str(r.get("frame_path", r["layer_id"])) for r in rows)
    out = {}
    for r in rows:
        n = per_frame[str(r.get("frame_path", r["layer_id"]))]
        out[str(r["layer_id"])] = {"crop_kind": r.get("crop_kind"), "instances": n}
        # the dataset's upper-body / head crops of this layer (yokai_pipeline/crops.py)
        for kind in r.get("crops") or {}:
            out[crop_stem(str(r["layer_id"]), kind)] = {"crop_kind": kind, "instances": n}
    return out


def _folder_metas(folder: Path, images: Sequence[Path], meta: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """Each image's layer facts; augmented copies inherit their original's, crops have their own."""
    from yokai_pipeline.kohya import read_sources

    sources = read_sources(folder)
    # a crop has facts of its own (its framing); an augmented copy has its original's
    return [dict(meta.get(p.stem) or meta.get(Path(sources.get(p.name, p.name)).stem, {})) for p in images]


def tag_folder(
    folder: str | Path,
    cfg: TagConfig,
    *,
    tagger: Tagger | None = None,
    meta: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write a tag sidecar for every image of ``folder`` that lacks a current one, then the summary.

    Args:
        folder: a character folder of images.
        cfg: tag settings.
        tagger: use this instead of building one from ``cfg``.
        meta: layer id -> facts (:func:`layer_meta`) for the offline tagger.
        progress: ``progress(done, total)`` over the images to tag.

    Returns:
        ``{"folder", "images", "tagged", "skipped", "failed": [{name, problem}], "top_tags",
        "core_tags", "seconds", "images_per_s"}``; also ``folder/tag_summary.json``.
    """
    from yokai_pipeline.augmentation import list_images

    t0 = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(folder, "folder does not exist")
    images = list_images(folder)
    sig = tag_signature(cfg)
    todo = [p for p in images if read_tags(p, sig) is None]
    result: dict[str, Any] = {"folder": str(folder), "images": len(images), "tagged": 0,
                              "skipped": len(images) - len(todo), "failed": []}  # fmt: skip
    if todo:
        tagger = tagger or get_tagger(cfg)
        metas = _folder_metas(folder, todo, meta or {})
        # Many batches per call: each call refills the decode pipeline; fewer calls, less idle device.
        step = max(cfg.batch_size * 16, 256)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="tag-write") as writer:
            writes = []
            for a in range(0, len(todo), step):
                errors: list[tuple[int, str]] = []
                docs = tagger.tag(todo[a : a + step], metas[a : a + step], errors)
                for i, message in errors:
                    # "<path>: <problem>", where the problem may name the path again
                    problem = message.partition(": ")[2].removeprefix(f"{todo[a + i]}: ")
                    result["failed"].append({"name": todo[a + i].name, "problem": problem})
                for p, doc in zip(todo[a : a + step], docs, strict=True):
                    if doc is not None:
                        writes.append((p, writer.submit(atomic_write_json, sidecar_path(p), {
                            "version": SIDECAR_VERSION, "signature": sig, **doc})))  # fmt: skip
                if progress is not None:
                    progress(min(a + step, len(todo)), len(todo))
            written, failed = finish_writes(writes, "tags")
            result["tagged"] += written
            result["failed"] += failed
    result.update(summarize_folder_tags(folder, images, cfg, sig))
    secs = time.perf_counter() - t0
    result["seconds"] = round(secs, 3)
    result["images_per_s"] = round(result["tagged"] / secs, 2) if secs > 0 else 0.0
    # What the folder holds, not what this run did: a resumed run writes the same summary.
    outcome = {k: v for k, v in result.items() if k not in ("tagged", "skipped", "seconds", "images_per_s")}
    atomic_write_json(folder / SUMMARY_NAME, {**outcome, "config": cfg.model_dump(mode="json")})
    return result


def summarize_folder_tags(
    folder: Path, images: Sequence[Path], cfg: TagConfig, signature: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Top tags (share of images) and core tags of one character folder, from its sidecars."""
    lists = [caption_tags(d) for d in (read_tags(p, signature) for p in images) if d is not None]
    counts = Counter(t for tags in lists for t in set(tags))
    n = max(1, len(lists))
    # Ties by name: Counter order follows set order, which changes with the process's hash seed.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]
    top = [{"tag": t, "share": round(c / n, 3)} for t, c in ranked]
    core = core_tags(lists, cfg.core_tag_ratio, cfg.never_prune) if cfg.prune_core_tags else []
    return {"tagged_images": len(lists), "top_tags": top, "core_tags": core}


def read_tag_summary(folder: str | Path) -> dict[str, Any] | None:
    """``tag_summary.json`` of a character folder, or None."""
    path = Path(folder) / SUMMARY_NAME
    try:
        return read_json(path) if path.is_file() else None
    except (ValueError, OSError, BadInputError):
        return None


def tag_clusters(
    clusters_dir: str | Path,
    cfg: TagConfig,
    *,
    selection: Mapping[str, Any] | str | Path | None = None,
    meta: Mapping[str, Mapping[str, Any]] | None = None,
    tagger: Tagger | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Tag every cluster folder under ``clusters_dir`` (or ``clusters_dir`` itself when it holds images).

    Args:
        clusters_dir: folder of ``cluster_NNN`` folders, or of images.
        cfg: tag settings.
        selection: selection.json (path or dict): only its clusters.
        meta: layer facts for the offline tagger (:func:`layer_meta`).
        tagger: use this instead of building one from ``cfg`` (one model for all folders).
        progress: ``progress(folder name, done, total)`` callback.

    Returns:
        ``{"backend", "folders", "images", "tagged", "skipped", "failed", "seconds", "images_per_s", "results"}``.
    """
    from yokai_pipeline.augmentation import cluster_folders, cluster_id, list_images, read_selection

    t0 = time.perf_counter()
    clusters_dir = Path(clusters_dir)
    if not clusters_dir.is_dir():
        raise BadInputError(clusters_dir, "folder does not exist")
    folders = cluster_folders(clusters_dir)
    if not folders and list_images(clusters_dir):
        folders = [clusters_dir]
    if selection is not None:
        sel = read_selection(selection)
        folders = [f for f in folders if cluster_id(f.name) in sel]
    tagger = tagger or get_tagger(cfg)
    results = []
    for folder in folders:
        cb = (lambda d, t, _n=folder.name: progress(_n, d, t)) if progress else None
        results.append(tag_folder(folder, cfg, tagger=tagger, meta=meta, progress=cb))
    secs = time.perf_counter() - t0
    tagged = sum(r["tagged"] for r in results)
    return {
        "backend": cfg.backend,
        "folders": len(results),
        "images": sum(r["images"] for r in results),
        "tagged": tagged,
        "skipped": sum(r["skipped"] for r in results),
        "failed": [dict(f, folder=Path(r["folder"]).name) for r in results for f in r["failed"]],
        "seconds": round(secs, 3),
        "images_per_s": round(tagged / secs, 2) if secs > 0 else 0.0,
        "results": results,
    }


def cluster_tag_summaries(clusters_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Cluster id -> ``{"top_tags", "core_tags"}`` from the ``tag_summary.json`` of each cluster folder."""
    from yokai_pipeline.augmentation import cluster_folders, cluster_id

    out = {}
    for folder in cluster_folders(clusters_dir) if Path(clusters_dir).is_dir() else []:
        doc, cid = read_tag_summary(folder), cluster_id(folder.name)
        if doc is not None and cid is not None:
            out[cid] = {"top_tags": doc.get("top_tags", []), "core_tags": doc.get("core_tags", [])}
    return out
