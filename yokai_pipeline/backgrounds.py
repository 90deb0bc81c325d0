"""Background LoRA data (guide step 8): dedup, keep the most diverse, caption, package for kohya.

Steps: embed every background layer once (``embed_fn``; the pipeline passes the configured
embedder: CLIP when ``embedding.backend = "clip"``, else an offline colour/layout descriptor),
leave out layers below ``packaging.min_resolution``, drop near-duplicates whose cosine similarity to an already kept image
is at least ``similarity_threshold``, keep the ``max_backgrounds`` most diverse by farthest-point
sampling, caption each from its colours ("bg_style, outdoor scene, blue sky, green ground,
bright lighting"), and write ``{repeat}_background/`` + dataset/training TOMLs with gentler
learning rates than character LoRAs (UNet 5e-5, text encoder 1e-5, dim 32).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from yokai_pipeline.config import BackgroundConfig, EmbeddingConfig, PackagingConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import atomic_write_bytes, atomic_write_json, atomic_write_text, safe_name
from yokai_pipeline.kohya import (
    IMAGE_SUFFIXES,
    build_dataset_config,
    build_training_config,
    clean_trigger,
    default_models_dir,
    launch_command,
    load_image,
    low_resolution_drop,
    upscale_min_side,
    write_toml,
)

# (paths, errors) -> L2-normalised rows; an unreadable image gets a zero row and (index, message)
# appended to errors, as Embedder.embed does, so every image is decoded once.
EmbedFn = Callable[[list[Path], list[tuple[int, str]]], np.ndarray]
DEDUP_BLOCK = 2048
EXACT_DEDUP_MAX = 5_000  # above: LSH candidates + exact check (all pairs is quadratic: minutes at 100k)
LSH_TABLES = 64
SIG_BITS = 256

BACKGROUND_PARAMS = {
    "repeat": None,  # from BackgroundConfig.repeat_count
    "epochs": 10,
    "unet_lr": 5e-5,
    "text_encoder_lr": 1e-5,
    "learning_rate": 5e-5,
    "network_dim": 32,
    "network_alpha": 16.0,
    "strategy": "Gentle background training",
}
THUMB = 16
HIST_BINS = 4


# ---------------------------------------------------------------- descriptor (default embed_fn)


def describe_background(image: Any) -> np.ndarray:
    """Offline descriptor: a 16x16 Lab thumbnail (layout + colour) and a coarse RGB histogram.

    Lab values are centred on mid-grey so unrelated scenes are not all similar (cosine of
    non-negative vectors is always high); the histogram adds shift tolerance.
    """
    import cv2

    rgb = np.asarray(image.convert("RGB").resize((THUMB, THUMB), resample=2), dtype=np.uint8)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab -= np.array([128.0, 128.0, 128.0], dtype=np.float32)
    lab /= 128.0
    small = np.asarray(image.convert("RGB").resize((64, 64), resample=2), dtype=np.uint8).reshape(-1, 3)
    q = (small // (256 // HIST_BINS)).astype(np.int64)
    hist = np.bincount(
        q[:, 0] * HIST_BINS * HIST_BINS + q[:, 1] * HIST_BINS + q[:, 2], minlength=HIST_BINS**3
    )
    hist = hist.astype(np.float32) / max(1, hist.sum())
    hist -= 1.0 / HIST_BINS**3
    vec = np.concatenate([lab.ravel(), 4.0 * hist])
    return vec / max(1e-8, float(np.linalg.norm(vec)))


def embed_backgrounds(paths: list[Path], errors: list[tuple[int, str]] | None = None) -> np.ndarray:
    """Default ``embed_fn``: L2-normalised offline descriptors, one row per path (one decode each).

    Args:
        paths: background images.
        errors: if given, an unreadable image gets a zero row and ``(index, message)`` here;
            otherwise its BadInputError propagates.
    """
    out = np.zeros((len(paths), THUMB * THUMB * 3 + HIST_BINS**3), np.float32)
    for i, p in enumerate(paths):
        try:
            out[i] = describe_background(load_image(p))
        except BadInputError as exc:
            if errors is None:
                raise
            errors.append((i, exc.problem))
    return out


def clip_embed_fn(cfg: EmbeddingConfig) -> EmbedFn:
    """CLIP embeddings (the guide's deduplication) via :mod:`yokai_pipeline.embedding`.

    Needs the ``ml`` extra and CLIP weights (``cfg.pretrained``: a hub tag or a local checkpoint).
    """
    from yokai_pipeline.embedding import get_embedder

    embedder = get_embedder(cfg.model_copy(update={"backend": "clip"}))
    return lambda paths, errors: embedder.embed(paths, errors)


def configured_embed_fn(cfg: EmbeddingConfig) -> EmbedFn:
    """The embedder the pipeline is configured with: CLIP when ``cfg.backend`` is clip, else the descriptor.

    The identity descriptor of :mod:`yokai_pipeline.embedding` is built for character layers
    (flip- and layout-invariant), so the offline background path uses :func:`describe_background`.
    """
    return clip_embed_fn(cfg) if cfg.backend == "clip" else embed_backgrounds


# ---------------------------------------------------------------- selection


def dedup_embeddings(
    emb: np.ndarray, threshold: float, block: int = DEDUP_BLOCK, exact_max: int = EXACT_DEDUP_MAX
) -> list[int]:
    """Greedy near-duplicate removal: keep a row unless its cosine similarity to a kept row >= threshold.

    Up to ``exact_max`` rows every row is compared with every kept row (:func:`dedup_exact`,
    blocked matrix products). Above, comparing all pairs is quadratic (100k x 100k x 512 is
    minutes), so candidate pairs come from a random-hyperplane LSH index and each is checked
    exactly (:func:`dedup_indexed`): a kept image is never a duplicate of an earlier kept one's
    found pair; a pair right at the threshold is missed rarely (none of 2,000 planted in the
    tests; more similar pairs far less often), and then both copies are kept. 100k x 512 rows
    take seconds (bench/bench_backgrounds.py).

    Args:
        emb: L2-normalised rows, in priority order (earlier rows win).
        threshold: cosine similarity at or above which a row duplicates a kept one.
        block: rows per matrix product in the exact path.
        exact_max: largest row count deduplicated exactly.

    Returns:
        Indices of the kept rows, ascending.
    """
    if len(emb) <= exact_max:
        return dedup_exact(emb, threshold, block)
    return dedup_indexed(emb, threshold)


def dedup_exact(emb: np.ndarray, threshold: float, block: int = DEDUP_BLOCK) -> list[int]:
    """The greedy rule with every kept row checked: each block of rows against the rows kept so
    far in one matrix product (into a preallocated matrix), then the greedy order inside the block
    from the block's own similarity matrix. Same result as the row-by-row loop."""
    n = len(emb)
    if n == 0:
        return []
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    kept_mat = np.empty_like(emb)
    n_kept = 0
    kept: list[int] = []
    for start in range(0, n, block):
        rows = emb[start : start + block]
        alive = np.ones(len(rows), dtype=bool)
        if n_kept:
            alive &= (rows @ kept_mat[:n_kept].T).max(axis=1) < threshold
        inner = rows @ rows.T
        for j in np.flatnonzero(alive):
            if not alive[j]:  # removed by an earlier kept row of this block
                continue
            alive[j + 1 :] &= inner[j, j + 1 :] < threshold
        new = np.flatnonzero(alive)
        kept_mat[n_kept : n_kept + len(new)] = rows[new]
        n_kept += len(new)
        kept.extend(int(start + j) for j in new)
    return kept


def dedup_indexed(emb: np.ndarray, threshold: float, tables: int = LSH_TABLES, seed: int = 0) -> list[int]:
    """The greedy rule over the duplicate pairs an LSH index finds (each pair verified exactly).

    Sign-of-random-projection LSH (Charikar 2002): two rows at angle a disagree on a random
    hyperplane with probability a/pi (the threshold 0.95 is 18 deg: 1 bit in 10). Each row gets a
    ``SIG_BITS``-bit signature; each table keys on a random subset of those bits, so rows at the
    threshold share a bucket in some table with high probability while unrelated rows rarely do.
    Candidates are screened on the signatures' Hamming distance (bytes, not 2 KB rows, per pair)
    and the survivors checked with the exact cosine.
    """
    n = len(emb)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    rng = np.random.default_rng(seed)
    signs = (emb @ rng.standard_normal((emb.shape[1], SIG_BITS)).astype(np.float32)) > 0
    packed = np.packbits(signs, axis=1)
    bits = int(np.clip(np.floor(np.log2(max(2, n))), 8, 18))  # about one unrelated row per bucket
    codes = _lsh_candidates(signs, tables, bits, rng)
    # Hamming screen: at the threshold the expected distance is SIG_BITS * angle / pi; allow 6 sigma
    frac = float(np.arccos(np.clip(threshold, -1.0, 1.0)) / np.pi)
    max_hamming = SIG_BITS * frac + 6.0 * np.sqrt(SIG_BITS * frac * (1 - frac)) + 1
    i, j = codes // n, codes % n
    near = np.bitwise_count(packed[i] ^ packed[j]).sum(axis=1) <= max_hamming
    pairs = _verified_pairs(emb, threshold, i[near], j[near])
    keep = np.ones(n, dtype=bool)
    if len(pairs):
        order = np.argsort(pairs[:, 1], kind="stable")
        later, earlier = pairs[order, 1], pairs[order, 0]
        rows, starts = np.unique(later, return_index=True)
        ends = np.r_[starts[1:], len(later)]
        for b, lo, hi in zip(rows.tolist(), starts.tolist(), ends.tolist(), strict=True):
            # every earlier row's fate is final by now: rows are visited in increasing order
            if keep[earlier[lo:hi]].any():
                keep[b] = False
    return np.flatnonzero(keep).tolist()


def _lsh_candidates(signs: np.ndarray, tables: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Unique (i, j), i < j, pairs that share a bucket in any table, as one int64 code i * n + j."""
    n = len(signs)
    weights = np.left_shift(1, np.arange(bits, dtype=np.int64))
    codes: list[np.ndarray] = []
    for _ in range(tables):
        keys = signs[:, rng.choice(signs.shape[1], size=bits, replace=False)].astype(np.int64) @ weights
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        for offset in range(1, n):  # pairs `offset` apart in the sorted order, same bucket
            same = sorted_keys[offset:] == sorted_keys[:-offset]
            if not same.any():
                break
            a, b = order[:-offset][same], order[offset:][same]
            codes.append(np.minimum(a, b) * n + np.maximum(a, b))
    if not codes:
        return np.zeros(0, np.int64)
    flat = np.concatenate(codes)
    flat.sort()  # sort + neighbour compare: several times faster than np.unique's hash path here
    return flat[np.r_[True, flat[1:] != flat[:-1]]]


def _verified_pairs(
    emb: np.ndarray, threshold: float, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 16
) -> np.ndarray:
    """The pairs (i, j) whose exact cosine similarity is at least ``threshold``, as rows."""
    out = [np.zeros((0, 2), np.int64)]
    for start in range(0, len(i), chunk):
        a, b = i[start : start + chunk], j[start : start + chunk]
        hit = np.einsum("ij,ij->i", emb[a], emb[b]) >= threshold
        out.append(np.stack([a[hit], b[hit]], axis=1))
    return np.concatenate(out)


def farthest_point_sampling(emb: np.ndarray, k: int) -> list[int]:
    """Indices of ``k`` rows spread as far apart as possible (cosine distance), deterministic.

    Starts from the row farthest from the mean, then repeatedly adds the row whose nearest chosen
    row is farthest.
    """
    n = len(emb)
    if k >= n:
        return list(range(n))
    if k <= 0:
        return []
    centre = emb.mean(axis=0)
    first = int(np.argmin(emb @ centre))
    chosen = [first]
    min_dist = 1.0 - emb @ emb[first]
    min_dist[first] = -np.inf
    for _ in range(k - 1):
        nxt = int(np.argmax(min_dist))
        chosen.append(nxt)
        min_dist = np.minimum(min_dist, 1.0 - emb @ emb[nxt])
        min_dist[chosen] = -np.inf
    return sorted(chosen)


# ---------------------------------------------------------------- captions

_HUES = (  # (upper bound in degrees, name)
    (15, "red"),
    (40, "orange"),
    (65, "yellow"),
    (160, "green"),
    (200, "cyan"),
    (255, "blue"),
    (290, "purple"),
    (335, "pink"),
    (360, "red"),
)


def colour_name(rgb: Sequence[float]) -> str:
    """A plain colour word for an RGB triple (0-255)."""
    import colorsys

    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    if v < 0.2:
        return "black"
    if s < 0.18:
        return "white" if v > 0.85 else "gray"
    if s < 0.45 and 15 <= h * 360 < 50:
        return "brown" if v < 0.75 else "beige"
    deg = h * 360
    for bound, name in _HUES:
        if deg < bound:
            if name == "orange" and v < 0.6:
                return "brown"
            return name
    return "red"


def caption_background(image: Any, trigger: str) -> str:
    """Scene caption from colours: trigger, indoor/outdoor, upper and lower colours, lighting."""
    rgb = np.asarray(image.convert("RGB").resize((48, 48), resample=2), dtype=np.float32)
    top = np.median(rgb[:16].reshape(-1, 3), axis=0)
    bottom = np.median(rgb[32:].reshape(-1, 3), axis=0)
    top_name, bottom_name = colour_name(top), colour_name(bottom)
    brightness = float((rgb @ np.array([0.299, 0.587, 0.114], np.float32)).mean()) / 255.0  # luma
    if top_name in ("blue", "cyan"):  # a blue top band is the sky in nearly every outdoor shot
        scene = "night scene" if brightness < 0.35 else "outdoor scene"
        upper = "night sky" if brightness < 0.35 else f"{top_name} sky"
        lower = f"{bottom_name} ground"
    else:
        scene, upper, lower = "indoor scene", f"{top_name} walls", f"{bottom_name} floor"
    if brightness > 0.65:
        light = "bright lighting"
    elif brightness < 0.35:
        light = "dark lighting"
    else:
        light = "soft lighting"
    return ", ".join([trigger, scene, upper, lower, light, "no humans"])


# ---------------------------------------------------------------- the stage


def list_background_images(source: str | Path | Iterable[Any], root: str | Path | None = None) -> list[Path]:
    """Background images from a folder (recursive), paths, or layer-manifest rows (kind "background")."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise BadInputError(folder, "background folder does not exist")
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    base = Path(root) if root else Path(".")
    out = []
    for item in source:
        if isinstance(item, dict):
            if item.get("kind", "background") != "background":
                continue
            item = item["path"]
        p = Path(item)
        out.append(p if p.is_absolute() else base / p)
    return sorted(out)


def prepare_backgrounds(
    source: str | Path | Iterable[Any],
    out_dir: str | Path,
    cfg: BackgroundConfig,
    *,
    embed_fn: EmbedFn | None = None,
    packaging: PackagingConfig | None = None,
    root: str | Path | None = None,
    models_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Select, caption and package background layers as a kohya dataset.

    Args:
        source: a folder of background layers, or paths / layer-manifest rows.
        out_dir: output folder (``training_data/backgrounds``).
        cfg: repeat count, max backgrounds, similarity threshold, trigger word.
        embed_fn: ``(paths, errors) -> embeddings`` (:data:`EmbedFn`; :func:`configured_embed_fn`
            gives CLIP when configured, the guide's behaviour); default: the offline descriptor.
        packaging: resolution, alpha/composite and seed settings (defaults if None).
        root: base folder of relative paths in ``source`` rows.
        models_dir: where training writes the LoRA (default: the workspace's trained_models).

    Returns:
        Summary dict (also ``configs/background_summary.json``): counts at each step, kept files,
        config paths and the launch command.
    """
    pk = packaging or PackagingConfig()
    out_dir = Path(out_dir).resolve()
    models_dir = Path(models_dir).resolve() if models_dir else default_models_dir(out_dir)
    trigger = clean_trigger(cfg.trigger, fallback="bg_style")
    paths = list_background_images(source, root)
    readable, emb, skipped, low_res = _embed_usable(paths, embed_fn or embed_backgrounds, pk)
    unique = dedup_embeddings(emb, cfg.similarity_threshold)
    picked = [unique[i] for i in farthest_point_sampling(emb[unique], cfg.max_backgrounds)] if unique else []

    folder = out_dir / f"{cfg.repeat_count}_background"
    for old in out_dir.glob("*_background"):
        if old.is_dir() and old != folder and old.name.split("_", 1)[0].isdigit():
            shutil.rmtree(old)
    folder.mkdir(parents=True, exist_ok=True)
    written, rows = set(), []
    width = max(4, len(str(len(picked))))
    for n, idx in enumerate(picked):
        src = readable[idx]
        image = load_image(src).convert("RGB")
        stem = f"{n:0{width}d}_{_safe_stem(src)}"
        caption = caption_background(image, trigger)
        buf = io.BytesIO()
        out = upscale_min_side(image, pk.upscale_to)
        out.save(buf, format="PNG", compress_level=1)
        atomic_write_bytes(folder / f"{stem}.png", buf.getvalue())
        atomic_write_text(folder / f"{stem}.txt", caption + "\n")
        written |= {f"{stem}.png", f"{stem}.txt"}
        rows.append(
            {
                "file": f"{stem}.png",
                "source": str(src),
                "caption": caption,
                "size": list(out.size),
                "source_size": list(image.size),
                "upscaled": out.size != image.size,
            }
        )
    for p in folder.iterdir():
        if p.is_file() and p.name not in written:
            p.unlink()

    configs = out_dir / "configs"
    params = dict(BACKGROUND_PARAMS, repeat=cfg.repeat_count)
    bg_pk = pk.model_copy(update={"alpha_mode": "composite"})  # backgrounds are opaque RGB
    prompts = configs / "background_sample_prompts.txt"
    atomic_write_text(
        prompts,
        "# kohya sample prompts\n"
        f"{trigger}, outdoor scene, blue sky, green ground --n lowres, blurry, people --w {pk.resolution} "
        f"--h {pk.resolution} --d 1 --l 7 --s 28\n"
        f"{trigger}, indoor scene, soft lighting --n lowres, blurry, people --w {pk.resolution} "
        f"--h {pk.resolution} --d 2 --l 7 --s 28\n",
    )
    ds_path = configs / "background_dataset.toml"
    write_toml(
        ds_path,
        build_dataset_config(
            [
                {
                    "image_dir": folder,
                    "num_repeats": cfg.repeat_count,
                    "trigger": trigger,
                    "validation_split": 0.0,
                }
            ],
            bg_pk,
        ),
    )
    cfg_path = configs / "background_config.toml"
    write_toml(
        cfg_path,
        build_training_config(
            name="backgrounds",
            params=params,
            dataset_config=ds_path,
            sample_prompts=prompts,
            models_dir=models_dir,
            cfg=bg_pk,
            has_validation=False,
        ),
    )
    summary = {
        "output_dir": str(out_dir),
        "image_dir": str(folder),
        "input_images": len(paths),
        "unreadable": len(skipped),
        "low_resolution": low_res,
        "upscaled_images": sum(r["upscaled"] for r in rows),
        "after_dedup": len(unique),
        "duplicates_removed": len(readable) - len(unique),
        "kept": len(picked),
        "trigger": trigger,
        "params": params,
        "dataset_config": str(ds_path),
        "config": str(cfg_path),
        "command": launch_command(cfg_path),
        "files": rows,
        "skipped": skipped,
        "config_used": cfg.model_dump(mode="json"),
    }
    atomic_write_json(configs / "background_summary.json", summary)
    return summary


def _embed_usable(
    paths: list[Path], embed_fn: EmbedFn, pk: PackagingConfig
) -> tuple[list[Path], np.ndarray, list[dict[str, str]], list[dict[str, Any]]]:
    """Embed every background once; drop the unreadable and (per ``pk``) the low-resolution ones.

    Returns:
        (usable paths, their L2-normalised embeddings, unreadable [{path, problem}],
        low-resolution [{path, size, problem}]).
    """
    from PIL import Image

    low_res: list[dict[str, Any]] = []
    usable: list[int] = []
    for i, p in enumerate(paths):  # header only: sizes without decoding
        try:
            with Image.open(p) as im:
                size = im.size
        except (OSError, ValueError, Image.DecompressionBombError):
            usable.append(i)  # the embedder's decode reports it
            continue
        dropped = low_resolution_drop(p, size, pk)
        if dropped:
            low_res.append(dropped)
        else:
            usable.append(i)
    cand = [paths[i] for i in usable]
    errors: list[tuple[int, str]] = []
    emb = np.asarray(embed_fn(cand, errors), dtype=np.float32) if cand else np.zeros((0, 1), np.float32)
    if len(emb) != len(cand):
        raise ValueError(f"embed_fn returned {len(emb)} rows for {len(cand)} images")
    bad = {i for i, _ in errors}
    skipped = [{"path": str(cand[i]), "problem": msg} for i, msg in errors]
    keep = [i for i in range(len(cand)) if i not in bad]
    emb = emb[keep]
    if len(emb):
        emb = emb / np.maximum(1e-8, np.linalg.norm(emb, axis=1, keepdims=True))
    return [cand[i] for i in keep], emb, skipped, low_res


def _safe_stem(path: Path) -> str:
    return safe_name(path.stem, fallback="bg")


def format_background_summary(summary: dict[str, Any]) -> str:
    """Short printed summary of background preparation with the launch command."""
    return "\n".join(
        [
            "Background Preparation Complete",
            "===============================",
            f"  Input backgrounds: {summary['input_images']:,}",
            f"  Near-duplicates removed: {summary['duplicates_removed']:,}",
            f"  Kept (most diverse): {summary['kept']:,}",
            f"  Output: {summary['image_dir']}",
            "",
            "Train with:",
            f"   {summary['command']}",
        ]
    )
