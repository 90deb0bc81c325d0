"""Augmentation of small character clusters (guide step 3).

Clusters with ``min_original <= n <= max_original`` images are expanded to
``round(n * multiplier_for(n))`` images (the multiplier is automatic by count, as in the
guide) with identity-preserving transforms: optional horizontal flip (characters configured
as symmetric, or when allowed), rotation within +-5 deg, brightness 0.8-1.2x, contrast
0.9-1.1x, hue shift within +-10 deg, crop 95-100 % and an occasional slight blur.
``intensity`` is the strength: where in those guide bounds the ranges sit.
Clusters outside the range are copied unchanged, so the output folder holds every cluster.

Layers are RGBA: geometric transforms move RGB and alpha together; colour transforms touch
RGB only. Every parameter is sampled from a seed derived from (seed, cluster, source, k),
so the same inputs give the same bytes, and every output is recorded in the cluster's
``augment_manifest.jsonl``::

    {"path": "ep01_f000123_i00_aug002.png", "source": "ep01_f000123_i00.png",
     "source_sha256": "...", "kind": "augmented",
     "transform": {"rotate": {"angle": -2.1}, "crop": {"frac": 0.97, "x": 0.4, "y": 0.8},
                   "color": {"brightness": 1.05, "contrast": 0.97, "hue_deg": 3.2}}}

``path`` and ``source`` are file names inside the output and source cluster folders.
Originals are rows with ``"kind": "original"`` and ``"transform": {}``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yokai_pipeline.config import AugmentConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import (
    TMP_PREFIX,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    read_image,
    read_json,
    read_jsonl,
    stable_hash,
    write_jsonl,
)

MANIFEST_NAME = "augment_manifest.jsonl"
SUMMARY_NAME = "augment_summary.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
AUG_TAG = "_aug"

# The guide's multiplier table: (first n, last n, low multiplier, high multiplier).
MULTIPLIER_TABLE: tuple[tuple[int, int, float, float], ...] = (
    (5, 10, 6.0, 8.0),
    (11, 15, 4.0, 5.0),
    (16, 20, 3.0, 4.0),
    (21, 30, 1.5, 2.0),
)


@dataclass(frozen=True)
class AugmentRanges:
    """Transform ranges for one intensity; ``heavy`` sits on the guide's outer bounds."""

    rotate_deg: float
    brightness: float  # factor range is 1 +- this
    contrast: float
    hue_deg: float
    crop_min: float  # kept fraction of each side
    blur_p: float
    blur_sigma: tuple[float, float]
    flip_p: float = 0.5


INTENSITY_RANGES: dict[str, AugmentRanges] = {
    "light": AugmentRanges(2.0, 0.07, 0.03, 3.0, 0.98, 0.0, (0.3, 0.5)),
    "medium": AugmentRanges(3.5, 0.12, 0.06, 6.0, 0.97, 0.1, (0.3, 0.6)),
    "heavy": AugmentRanges(5.0, 0.2, 0.1, 10.0, 0.95, 0.2, (0.3, 0.8)),
}


def multiplier_for(n_images: int, *, min_original: int = 5, max_original: int = 30) -> float:
    """The guide's automatic augmentation multiplier for a cluster of ``n_images``.

    Within a row of the table the multiplier falls linearly from the row's high end (its
    smallest count) to its low end (its largest), so the final counts land in the guide's
    final ranges: 5 images x 8 = 40 ... 10 x 6 = 60 (guide: 40-60), 11 x 5 = 55 ... 15 x 4 = 60
    (50-70), 16 x 4 = 64 ... 20 x 3 = 60 (60-80), 21 x 2 = 42 ... 30 x 1.5 = 45. The intensity
    setting is the strength of the transforms, not the count.

    Args:
        n_images: Images in the cluster.
        min_original: Smaller clusters are not augmented.
        max_original: Larger clusters are not augmented.

    Returns:
        The multiplier of the final image count (originals included); 1.0 means "leave as is"
        (outside ``[min_original, max_original]`` or above the table).
    """
    if n_images < min_original or n_images > max_original or n_images <= 0:
        return 1.0
    for first, last, low, high in MULTIPLIER_TABLE:
        # A min_original below the table's first row still gets the smallest clusters' row.
        if n_images <= last and (n_images >= first or first == MULTIPLIER_TABLE[0][0]):
            t = min(1.0, max(0.0, (n_images - first) / (last - first)))
            return round(high - (high - low) * t, 4)
    return 1.0


def is_symmetric(cfg: AugmentConfig, cluster: int | str | None, name: str | None = None) -> bool:
    """Whether a character may be flipped: ``cfg.symmetric`` by cluster id, then by name (default no)."""
    for key in (cluster_id(cluster) if cluster is not None else None, name):
        if key is not None and str(key) in cfg.symmetric:
            return bool(cfg.symmetric[str(key)])
    return False


def target_count(n_images: int, multiplier: float) -> int:
    """Final image count ``round(n * multiplier)`` (half up, never below ``n``)."""
    return max(n_images, int(math.floor(n_images * multiplier + 0.5)))


def sample_transform(
    rng: np.random.Generator, ranges: AugmentRanges, *, allow_flip: bool, blur: bool = True
) -> dict[str, dict[str, Any]]:
    """Draw one transform's parameters (JSON-ready, size independent).

    Args:
        rng: Seeded generator.
        ranges: Ranges of the chosen intensity.
        allow_flip: Whether a horizontal flip may be drawn.
        blur: Whether a slight blur may be drawn.

    Returns:
        ``{name: params}`` in the order they are applied.
    """
    t: dict[str, dict[str, Any]] = {}
    # Draw every value whether used or not, so switching flip/blur on or off leaves the others unchanged.
    flip = rng.random() < ranges.flip_p
    angle = rng.uniform(-ranges.rotate_deg, ranges.rotate_deg)
    frac = rng.uniform(ranges.crop_min, 1.0)
    cx, cy = rng.random(), rng.random()
    brightness = rng.uniform(1 - ranges.brightness, 1 + ranges.brightness)
    contrast = rng.uniform(1 - ranges.contrast, 1 + ranges.contrast)
    hue = rng.uniform(-ranges.hue_deg, ranges.hue_deg)
    do_blur = rng.random() < ranges.blur_p
    sigma = rng.uniform(*ranges.blur_sigma)
    if allow_flip and flip:
        t["hflip"] = {}
    t["rotate"] = {"angle": round(float(angle), 4)}
    t["crop"] = {"frac": round(float(frac), 4), "x": round(float(cx), 4), "y": round(float(cy), 4)}
    t["color"] = {
        "brightness": round(float(brightness), 4),
        "contrast": round(float(contrast), 4),
        "hue_deg": round(float(hue), 4),
    }
    if blur and do_blur:
        t["blur"] = {"sigma": round(float(sigma), 4)}
    return t


def apply_transform(rgba: np.ndarray, transform: Mapping[str, Mapping[str, Any]]) -> np.ndarray:
    """Apply recorded parameters to an RGBA uint8 image; same size out.

    Geometry moves RGB and alpha together (alpha interpolated linearly, exposed corners
    transparent); colour and blur change RGB only, so the silhouette stays as it was.

    Args:
        rgba: H x W x 4 uint8.
        transform: Output of :func:`sample_transform`.

    Returns:
        The transformed H x W x 4 uint8 image.
    """
    try:
        import albumentations as A
        import cv2
    except ImportError as exc:  # pragma: no cover
        raise ImportError("augmentation needs albumentations and opencv: pip install albumentations") from exc

    ops: list[Any] = []
    if "hflip" in transform:
        ops.append(A.HorizontalFlip(p=1.0))
    angle = float(transform.get("rotate", {}).get("angle", 0.0))
    crop = transform.get("crop", {"frac": 1.0, "x": 0.5, "y": 0.5})
    frac = float(crop["frac"])
    if angle or frac != 1.0:
        # Rotation and the crop (a zoom by 1/frac about the crop window's centre) as ONE warp:
        # every resampling softens the alpha edge, so there is only one.
        ops.append(
            A.Affine(
                rotate=(angle, angle),
                scale=(1.0 / frac, 1.0 / frac),
                translate_percent={
                    "x": (t := -(1.0 - frac) * (float(crop["x"]) - 0.5) / frac, t),
                    "y": (u := -(1.0 - frac) * (float(crop["y"]) - 0.5) / frac, u),
                },
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=1.0,
            )
        )
    if "color" in transform:
        c = transform["color"]
        b, k, hue = float(c["brightness"]), float(c["contrast"]), float(c["hue_deg"]) / 360.0
        ops.append(
            A.ColorJitter(brightness=(b, b), contrast=(k, k), saturation=(1, 1), hue=(hue, hue), p=1.0)
        )
    if "blur" in transform:
        s = float(transform["blur"]["sigma"])
        ops.append(A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(s, s), p=1.0))
    # Fixed seed: ColorJitter draws the order of its sub-operations, which must not vary.
    pipeline = A.Compose(ops, seed=0)
    rgb = np.ascontiguousarray(rgba[..., :3])
    alpha = np.ascontiguousarray(rgba[..., 3])
    out = pipeline(image=rgb, mask=alpha)
    return np.dstack([out["image"], out["mask"]]).astype(np.uint8)


def load_rgba(path: str | Path) -> np.ndarray:
    """Read an image as RGBA uint8 (opaque alpha for RGB files); BadInputError when unreadable.

    Goes through :func:`fsio.read_image` so 16-bit files are scaled, not clipped to white.
    """
    return np.asarray(read_image(path).convert("RGBA")).copy()


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden and temp files excluded)."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def plan_cluster(
    sources: list[Path], cfg: AugmentConfig, *, symmetric: bool, cluster: str
) -> tuple[float, list[dict[str, Any]]]:
    """Decide every output of one cluster (names, sources, parameters) without touching pixels.

    Returns:
        ``(multiplier, rows)``: manifest rows, originals first, then augmented images spread
        round-robin over the sources.
    """
    n = len(sources)
    mult = multiplier_for(n, min_original=cfg.min_original, max_original=cfg.max_original)
    total = target_count(n, mult)
    rows: list[dict[str, Any]] = []
    shas = {p.name: file_sha256(p) for p in sources}
    for p in sources:
        rows.append(
            {
                "path": p.name,
                "source": p.name,
                "source_sha256": shas[p.name],
                "kind": "original",
                "transform": {},
            }
        )
    ranges = INTENSITY_RANGES[cfg.intensity]
    allow_flip = bool(cfg.allow_flip or symmetric)
    blur = cfg.blur
    for j in range(total - n):
        src = sources[j % n]
        k = j // n + 1
        # Seeded per (cluster, source, k): adding a source or reordering never changes others' outputs.
        seed_int = int(stable_hash([cfg.seed, cluster, src.name, k])[:16], 16)
        rng = np.random.default_rng(seed_int)
        rows.append(
            {
                "path": f"{src.stem}{AUG_TAG}{k:03d}.png",
                "source": src.name,
                "source_sha256": shas[src.name],
                "kind": "augmented",
                "transform": sample_transform(rng, ranges, allow_flip=allow_flip, blur=blur),
            }
        )
    return mult, rows


def augment_cluster(
    src_dir: str | Path,
    out_dir: str | Path,
    cfg: AugmentConfig,
    *,
    symmetric: bool = False,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Augment (or copy) one cluster folder into ``out_dir``.

    Originals are hard-linked (copied across file systems); augmented images are written as
    RGBA PNG. A cluster whose manifest already matches the plan and whose files all exist
    is skipped. Unreadable source images are reported and left out; the rest continue.

    Args:
        src_dir: Cluster folder of RGBA layers.
        out_dir: Output cluster folder.
        cfg: Augmentation settings.
        symmetric: The character is left/right symmetric (flips allowed).
        seed: Overrides ``cfg.seed``.
        progress: ``progress(done, total)`` callback.

    Returns:
        Summary: cluster, originals, augmented, total, multiplier, status
        (augmented / copied / resumed), failed ([{name, problem}]), seconds.
    """
    t0 = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise BadInputError(src_dir, "cluster folder does not exist")
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    cluster = src_dir.name
    failed: list[dict[str, str]] = []
    sources: list[Path] = []
    for p in list_images(src_dir):
        try:
            _check_readable(p)
            sources.append(p)
        except BadInputError as exc:
            failed.append({"name": p.name, "problem": exc.problem})

    mult, rows = plan_cluster(sources, cfg, symmetric=symmetric, cluster=cluster)
    n_aug = sum(r["kind"] == "augmented" for r in rows)
    summary: dict[str, Any] = {
        "cluster": cluster,
        "source_dir": str(src_dir),
        "out_dir": str(out_dir),
        "originals": len(sources),
        "augmented": n_aug,
        "total": len(rows),
        "multiplier": mult,
        "symmetric": symmetric,
        "config": cfg.model_dump(mode="json"),
        "failed": failed,
    }
    manifest = out_dir / MANIFEST_NAME
    if _manifest_complete(out_dir, rows):
        summary.update(status="resumed", seconds=round(time.perf_counter() - t0, 3))
        return summary

    out_dir.mkdir(parents=True, exist_ok=True)
    planned = {r["path"] for r in rows}
    _remove_stale(out_dir, planned)
    cache: dict[str, np.ndarray] = {}
    for i, row in enumerate(rows):
        src = src_dir / row["source"]
        dest = out_dir / row["path"]
        if row["kind"] == "original":
            _place_original(src, dest)
        else:
            try:
                if row["source"] not in cache:
                    cache.clear()  # rows are round-robin; keep only the current source's pixels
                    cache[row["source"]] = load_rgba(src)
                out = apply_transform(cache[row["source"]], row["transform"])
                _write_if_changed(dest, _encode_png(out))
            except BadInputError as exc:
                failed.append({"name": row["source"], "problem": exc.problem})
        if progress is not None:
            progress(i + 1, len(rows))
    write_jsonl(manifest, rows)
    summary.update(
        status="augmented" if n_aug else "copied",
        seconds=round(time.perf_counter() - t0, 3),
    )
    atomic_write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def augment_clusters(
    clusters_dir: str | Path,
    out_dir: str | Path,
    cfg: AugmentConfig,
    *,
    analysis: Mapping[Any, Any] | None = None,
    selection: Mapping[str, Any] | str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Augment every cluster folder under ``clusters_dir`` into ``out_dir``.

    Args:
        clusters_dir: Folder of ``cluster_NNN`` folders (``noise/`` is ignored).
        out_dir: Output folder; gets one folder per cluster and ``augment_summary.json``.
        cfg: Augmentation settings.
        analysis: Optional ``{cluster_id: {"type": ..., "symmetric": bool}}`` (or the
            analysis JSON with a ``clusters`` list); ``symmetric`` allows flips.
        selection: Optional selection.json (path or dict): only its clusters are processed.
        progress: ``progress(cluster, done, total)`` callback.

    Returns:
        Summary with per-cluster results and totals.
    """
    t0 = time.perf_counter()
    results = []
    for job in augment_jobs(clusters_dir, out_dir, analysis=analysis, selection=selection):
        name = job["cluster"]
        cb = (lambda d, t, _n=name: progress(_n, d, t)) if progress else None
        results.append(
            augment_cluster(job["src_dir"], job["out_dir"], cfg, symmetric=job["symmetric"], progress=cb)
        )
    return summarize_augmentation(results, out_dir, cfg, seconds=time.perf_counter() - t0)


def augment_jobs(
    clusters_dir: str | Path,
    out_dir: str | Path,
    *,
    analysis: Mapping[Any, Any] | str | Path | None = None,
    selection: Mapping[str, Any] | str | Path | None = None,
) -> list[dict[str, Any]]:
    """One small JSON-ready record per cluster to augment (what a flow maps a task over).

    Returns:
        ``[{"cluster": "cluster_003", "src_dir": ..., "out_dir": ..., "symmetric": bool}]``.
    """
    clusters_dir, out_dir = Path(clusters_dir), Path(out_dir)
    folders = cluster_folders(clusters_dir)
    wanted = selected_clusters(selection)
    if wanted is not None:
        folders = [f for f in folders if cluster_id(f.name) in wanted]
    info = normalise_analysis(analysis)
    jobs = []
    for folder in folders:
        cid = cluster_id(folder.name)
        meta = info.get(cid, {}) if cid is not None else {}
        jobs.append(
            {
                "cluster": folder.name,
                "src_dir": str(folder),
                "out_dir": str(out_dir / folder.name),
                "symmetric": bool(meta.get("symmetric", False)),
            }
        )
    return jobs


def summarize_augmentation(
    results: list[dict[str, Any]], out_dir: str | Path, cfg: AugmentConfig, *, seconds: float = 0.0
) -> dict[str, Any]:
    """Totals over :func:`augment_cluster` results; written to ``out_dir/augment_summary.json``."""
    summary = {
        "clusters": len(results),
        "augmented_clusters": sum(r["status"] == "augmented" for r in results),
        "copied_clusters": sum(r["status"] == "copied" for r in results),
        "resumed_clusters": sum(r["status"] == "resumed" for r in results),
        "originals": sum(r["originals"] for r in results),
        "augmented": sum(r["augmented"] for r in results),
        "total": sum(r["total"] for r in results),
        "failed": [dict(f, cluster=r["cluster"]) for r in results for f in r["failed"]],
        "seconds": round(seconds, 3),
        "results": [{k: v for k, v in r.items() if k != "config"} for r in results],
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(Path(out_dir) / SUMMARY_NAME, summary)
    return summary


# --- cluster metadata helpers (shared with captioning) ---------------------------------


def cluster_folders(clusters_dir: str | Path) -> list[Path]:
    """Cluster folders under ``clusters_dir`` sorted by name (noise, hidden folders excluded)."""
    clusters_dir = Path(clusters_dir)
    if not clusters_dir.is_dir():
        raise BadInputError(clusters_dir, "clusters folder does not exist")
    return sorted(
        p for p in clusters_dir.iterdir() if p.is_dir() and p.name != "noise" and not p.name.startswith(".")
    )


def cluster_id(name: str | int) -> int | None:
    """``cluster_003`` / ``3`` / ``"3"`` -> 3; None for names without a number."""
    if isinstance(name, int):
        return name
    digits = str(name).rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else None


def normalise_analysis(analysis: Mapping[Any, Any] | str | Path | None) -> dict[int, dict[str, Any]]:
    """Cluster analysis (dict keyed by id/folder, ``{"clusters": [...]}``, or a path) -> ``{id: info}``."""
    if analysis is None:
        return {}
    if isinstance(analysis, str | Path):
        analysis = read_json(analysis)
    items: list[tuple[Any, Any]]
    if isinstance(analysis, Mapping) and isinstance(analysis.get("clusters"), list):
        items = [(c.get("id", c.get("cluster", c.get("folder"))), c) for c in analysis["clusters"]]
    elif isinstance(analysis, Mapping):
        items = list(analysis.items())
    else:
        items = [(c.get("id", c.get("cluster", c.get("folder"))), c) for c in analysis]
    out: dict[int, dict[str, Any]] = {}
    for key, val in items:
        cid = cluster_id(key) if key is not None else None
        if cid is not None and isinstance(val, Mapping):
            out[cid] = dict(val)
    return out


def read_selection(selection: Mapping[str, Any] | str | Path | None) -> dict[int, dict[str, Any]]:
    """selection.json (path or dict) -> ``{cluster id: character}``."""
    if selection is None:
        return {}
    if isinstance(selection, str | Path):
        try:
            selection = read_json(selection)
        except (OSError, ValueError) as exc:
            raise BadInputError(selection, f"cannot read selection ({exc})") from exc
    chars = selection.get("characters") if isinstance(selection, Mapping) else None
    if not isinstance(chars, list):
        raise BadInputError("selection.json", "no 'characters' list")
    return {int(c["cluster"]): dict(c) for c in chars if isinstance(c, Mapping) and "cluster" in c}


def selected_clusters(selection: Mapping[str, Any] | str | Path | None) -> set[int] | None:
    """Cluster ids named in the selection, or None without a selection."""
    return None if selection is None else set(read_selection(selection))


# --- file helpers -------------------------------------------------------------------------


def _check_readable(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except Image.DecompressionBombError as exc:
        raise BadInputError(path, f"image too large, refused as a decompression bomb ({exc})") from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise BadInputError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc


def _encode_png(rgba: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_if_changed(dest: Path, data: bytes) -> None:
    if dest.exists():
        if dest.read_bytes() == data:
            return
        # The image changed: its old caption describes something else.
        dest.with_suffix(".txt").unlink(missing_ok=True)
    atomic_write_bytes(dest, data)


def _place_original(src: Path, dest: Path) -> None:
    if dest.exists():
        try:
            if os.path.samefile(src, dest) or file_sha256(src) == file_sha256(dest):
                return
        except OSError:
            pass
        dest.with_suffix(".txt").unlink(missing_ok=True)
    # Link (or copy) to a temp name, then rename: readers never see a half-copied file.
    tmp = dest.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}{dest.suffix}")
    try:
        try:
            os.link(src, tmp)
        except OSError:  # other file system or no hard links: copy instead
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(out_dir: Path, planned: set[str]) -> None:
    """Delete augmented images (and their captions) of an earlier plan that this plan lacks."""
    for p in out_dir.glob(f"*{AUG_TAG}[0-9][0-9][0-9].png"):
        if p.name not in planned:
            p.unlink(missing_ok=True)
            p.with_suffix(".txt").unlink(missing_ok=True)


def _manifest_complete(out_dir: Path, rows: list[dict[str, Any]]) -> bool:
    manifest = out_dir / MANIFEST_NAME
    if not manifest.exists():
        return False
    try:
        existing = read_jsonl(manifest)
    except BadInputError:
        return False
    return existing == rows and all((out_dir / r["path"]).exists() for r in rows)
