"""Cluster analysis: image counts, quality, diversity, tiers and character type per cluster.

Reads ``character_clusters/clusters.json`` (see docs/data-formats.md; a folder of
``cluster_*`` sub-folders without one also works) and writes ``cluster_analysis.json``
and a self-contained HTML report.

Tiers (the guide's table, boundaries explicit)::

    S  >= 100 images      recommended
    A  50 .. 99           recommended
    B  20 .. 49           recommended
    C  15 .. 19           requires augmentation
    D  < 15               not recommended

A cluster whose quality is *poor* drops one tier (D stays D). Quality is poor when any of:
median sharpness < ``AnalysisConfig.min_sharpness``, median longer side <
``min_resolution`` px, near-duplicate ratio > ``max_duplicate_ratio``.

Quality figures per cluster (over the measured images, at most
``max_images_per_cluster`` spread evenly over the members):

* ``sharpness``: median variance of the Laplacian of the grey image, taken only over
  pixels inside the eroded alpha mask (so the cut-out edge does not count as detail).
* ``resolution``: median ``[width, height]``; ``alpha_coverage``: mean fraction of
  pixels with alpha > 127.
* ``duplicate_ratio``: fraction of images whose 256-bit perceptual hash (imagehash.phash,
  hash_size 16, of the image composited on white) lies within ``duplicate_hamming`` bits
  of an earlier image of the cluster. (The 64-bit hash is too coarse for small flat-colour
  cut-outs: different poses of one character collide at 4 bits.)

Diversity: mean pairwise cosine distance between the members' embeddings
(``embeddings/<episode_id>.npy`` indexed through the layer manifests) when every measured
member has one, else between cheap image descriptors: the image composited on mid-grey,
downscaled to 16x16 RGB plus the 16x16 alpha, mean-centred. ``diversity_source`` says which.

Character type, offline backend (no weights), a documented heuristic on the alpha mask:
a human in anime is an upright figure with a skin-toned face in the top of the
silhouette and two legs at the bottom; yokai are mostly squat, rounded or non-skin
creatures. Per image, with the mask cropped to its bounding box::

    aspect = bbox height / bbox width
    skin   = fraction of mask pixels in the top 40 % whose colour is skin-toned
             (YCrCb: Y > 80, 135 <= Cr <= 180, 85 <= Cb <= 135)
    legs   = fraction of the bottom 20 % of mask rows that have >= 2 separate runs
    p(human) = sigmoid(2.5 * (aspect - 1.65) + 15 * (skin - 0.10) + 0.5 * (legs - 0.5))

Skin carries most of the weight (faces and hands); aspect separates upright figures from
round creatures; legs only nudges (many yokai have legs too).

CLIP backend: zero-shot, per image softmax over the averaged text embeddings of a few
"human" and "yokai" prompts (:data:`CLIP_PROMPTS`), on at most 32 images per cluster.
Both backends average p(human) over the cluster; ``type`` is ``human`` if that mean is
>= 0.5 else ``yokai``, ``type_confidence`` = max(mean, 1 - mean), and the type is
``unknown`` when the confidence is below ``min_type_confidence``.

JSON schema of ``cluster_analysis.json`` (``version`` 1)::

    {"version": 1,
     "clusters_dir": "/abs/path/character_clusters",
     "source": "character_clusters/clusters.json",     # or null when scanned from folders
     "type_backend": "offline" | "clip",
     "diversity_source": "embeddings" | "descriptor" | "mixed",
     "config": {...AnalysisConfig...},
     "tier_thresholds": {"S": 100, "A": 50, "B": 20, "C": 15},
     "summary": {"total": 10, "recommended": 6, "noise_images": 12, "images": 490,
                 "by_tier": {"S": 2, "A": 2, "B": 2, "C": 2, "D": 2},
                 "by_type": {"human": 4, "yokai": 5, "unknown": 1}},
     "clusters": [
       {"id": 3, "folder": "cluster_003", "images": 64, "measured": 64,
        "tier": "A", "count_tier": "A", "recommended": true, "status": "recommended",
        "quality": {"sharpness": 412.5, "resolution": [180, 240], "alpha_coverage": 0.41,
                    "duplicate_ratio": 0.05, "poor": false, "reasons": []},
        "diversity": 0.31, "diversity_source": "descriptor",
        "type": "yokai", "type_confidence": 0.83, "type_scores": {"human": 0.17, "yokai": 0.83},
        "samples": ["cluster_003/ep01_f000123_i00.png", ...],   # relative to clusters_dir
        "errors": ["/abs/bad.png: cannot read image: ..."]}],
     "errors": ["..."]}

``clusters`` is sorted by id; noise (cluster -1) is not a cluster, only counted.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yokai_pipeline import fsio
from yokai_pipeline.config import AnalysisConfig, EmbeddingConfig
from yokai_pipeline.errors import BadInputError

TIERS = ("S", "A", "B", "C", "D")
TIER_MIN_IMAGES = {"S": 100, "A": 50, "B": 20, "C": 15}
RECOMMENDED_TIERS = frozenset({"S", "A", "B"})
TIER_STATUS = {
    "S": "recommended",
    "A": "recommended",
    "B": "recommended",
    "C": "requires augmentation",
    "D": "not recommended",
}
CHARACTER_TYPES = ("human", "yokai", "unknown")
CLIP_PROMPTS = {
    "human": [
        "an anime drawing of a human character",
        "an anime boy",
        "an anime girl",
        "an adult person drawn in anime style",
    ],
    "yokai": [
        "an anime drawing of a yokai monster",
        "a cute cartoon creature",
        "a spirit monster from japanese folklore",
        "an anime mascot animal creature",
    ],
}
CLIP_IMAGES_PER_CLUSTER = 32
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- tiers


def tier_for(count: int, quality_poor: bool = False) -> str:
    """Tier of a cluster by the guide's table: S >= 100, A 50-99, B 20-49, C 15-19, D < 15.

    Args:
        count: images in the cluster.
        quality_poor: drop one tier (D stays D).

    Returns:
        One of ``"S"``, ``"A"``, ``"B"``, ``"C"``, ``"D"``.
    """
    tier = "D"
    for name in ("S", "A", "B", "C"):
        if count >= TIER_MIN_IMAGES[name]:
            tier = name
            break
    if quality_poor:
        tier = TIERS[min(TIERS.index(tier) + 1, len(TIERS) - 1)]
    return tier


# --------------------------------------------------------------------------- per-image measures


@dataclass
class ImageStats:
    """What the analysis measures on one RGBA image."""

    width: int
    height: int
    sharpness: float
    alpha_coverage: float
    phash: np.ndarray
    descriptor: np.ndarray
    human_score: float


def to_rgba(image: Any) -> np.ndarray:
    """PIL image or array -> RGBA uint8 array (opaque alpha when there is none)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 3:
        arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    return np.ascontiguousarray(arr.astype(np.uint8, copy=False))


def alpha_mask(rgba: np.ndarray) -> np.ndarray:
    """Boolean character mask (alpha > 127)."""
    return rgba[..., 3] > 127


def alpha_coverage_of(rgba: np.ndarray) -> float:
    """Fraction of the image covered by the character."""
    return float(alpha_mask(rgba).mean())


def sharpness_of(rgba: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image inside the eroded alpha mask."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(rgba[..., :3]), cv2.COLOR_RGB2GRAY)
    lap = cv2.Laplacian(grey, cv2.CV_64F, ksize=3)
    # Erode so the cut-out border (character against transparent black) is not counted as detail.
    inner = cv2.erode(alpha_mask(rgba).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if inner.sum() < 16:
        return 0.0
    return float(lap[inner].var())


def composite(rgba: np.ndarray, background: int) -> np.ndarray:
    """Alpha-composite on a flat grey level; returns RGB uint8."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + background * (1.0 - a)
    return rgb.round().astype(np.uint8)


def phash_of(rgba: np.ndarray, hash_size: int = 16) -> np.ndarray:
    """Perceptual hash (hash_size**2 bits, packed into uint8) of the image composited on white."""
    import imagehash
    from PIL import Image

    h = imagehash.phash(Image.fromarray(composite(rgba, 255)), hash_size=hash_size)
    return np.packbits(h.hash.ravel())


def describe_image(rgba: np.ndarray, size: int = 16) -> np.ndarray:
    """Cheap appearance descriptor: 16x16 RGB on mid-grey plus 16x16 alpha, mean-centred."""
    import cv2

    rgb = cv2.resize(composite(rgba, 128), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    a = cv2.resize(rgba[..., 3], (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    vec = np.concatenate([rgb.ravel(), a.ravel()]) / 255.0
    # Centring makes the cosine distance respond to pattern, not to overall brightness.
    return vec - vec.mean()


def _skin_mask(rgb: np.ndarray) -> np.ndarray:
    import cv2

    ycc = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YCrCb)
    y, cr, cb = ycc[..., 0], ycc[..., 1], ycc[..., 2]
    return (y > 80) & (cr >= 135) & (cr <= 180) & (cb >= 85) & (cb <= 135)


def human_features(rgba: np.ndarray) -> dict[str, float]:
    """The offline type heuristic's features: silhouette aspect, upper skin fraction, legs."""
    mask = alpha_mask(rgba)
    ys, xs = np.nonzero(mask)
    if len(ys) < 16:
        return {"aspect": 1.0, "skin": 0.0, "legs": 0.0}
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = mask[y0:y1, x0:x1]
    rgb = rgba[y0:y1, x0:x1, :3]
    h, w = m.shape
    top = m[: max(1, int(round(0.4 * h)))]
    skin = _skin_mask(rgb[: top.shape[0]]) & top
    skin_frac = float(skin.sum() / max(1, top.sum()))
    bottom = m[h - max(1, int(round(0.2 * h))) :]
    # A run starts where a row goes from background to mask; two or more starts = separate limbs.
    starts = (np.diff(bottom.astype(np.int8), axis=1, prepend=0) == 1).sum(axis=1)
    rows = bottom.any(axis=1)
    legs = float(((starts >= 2) & rows).sum() / max(1, rows.sum()))
    return {"aspect": h / w, "skin": skin_frac, "legs": legs}


def human_likeness(rgba: np.ndarray) -> float:
    """Offline heuristic p(human) of one RGBA character layer (see the module docstring)."""
    f = human_features(rgba)
    z = 2.5 * (f["aspect"] - 1.65) + 15.0 * (f["skin"] - 0.10) + 0.5 * (f["legs"] - 0.5)
    return float(1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z)))))


def measure_image(rgba: np.ndarray) -> ImageStats:
    """All per-image measures of one RGBA layer."""
    return ImageStats(
        width=int(rgba.shape[1]),
        height=int(rgba.shape[0]),
        sharpness=sharpness_of(rgba),
        alpha_coverage=alpha_coverage_of(rgba),
        phash=phash_of(rgba),
        descriptor=describe_image(rgba),
        human_score=human_likeness(rgba),
    )


def read_rgba(path: str | Path) -> np.ndarray:
    """Read an image file as RGBA; raises BadInputError naming the file (also for decompression bombs)."""
    try:
        return to_rgba(fsio.read_image(path).convert("RGBA"))
    except BadInputError as exc:
        raise BadInputError(path, f"cannot read image: {exc.problem}") from exc


# --------------------------------------------------------------------------- cluster measures


def duplicate_ratio(hashes: Sequence[np.ndarray], max_hamming: int) -> float:
    """Fraction of packed hashes within ``max_hamming`` bits of an earlier hash in the list."""
    n = len(hashes)
    if n < 2:
        return 0.0
    arr = np.stack(hashes).astype(np.uint8)
    dup = 0
    for i in range(1, n):
        dist = np.bitwise_count(arr[:i] ^ arr[i]).sum(axis=1)
        dup += int(dist.min() <= max_hamming)
    return dup / n


def mean_pairwise_cosine_distance(vectors: np.ndarray, max_items: int = 512, seed: int = 0) -> float:
    """Mean cosine distance over all pairs (an even random subset of ``max_items`` when larger)."""
    x = np.asarray(vectors, dtype=np.float64)
    if len(x) < 2:
        return 0.0
    if len(x) > max_items:
        x = x[np.random.default_rng(seed).choice(len(x), max_items, replace=False)]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    sim = x @ x.T
    n = len(x)
    mean_sim = (sim.sum() - np.trace(sim)) / (n * (n - 1))
    return float(max(0.0, 1.0 - mean_sim))


def _even_sample(items: Sequence[Any], k: int) -> list[Any]:
    if len(items) <= k:
        return list(items)
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in idx]


# --------------------------------------------------------------------------- inputs


@dataclass
class _Cluster:
    id: int
    folder: str
    paths: list[Path]
    layer_ids: list[str | None]
    episode_ids: list[str | None]


def _cluster_id_from_folder(name: str) -> int | None:
    m = re.fullmatch(r"cluster_(\d+)", name)
    return int(m.group(1)) if m else None


def load_clusters(clusters_dir: str | Path) -> tuple[list[_Cluster], int, str | None]:
    """Read clusters.json (or scan ``cluster_*`` folders); returns (clusters, noise count, source)."""
    clusters_dir = Path(clusters_dir)
    if not clusters_dir.is_dir():
        raise BadInputError(clusters_dir, "not a folder of character clusters")
    index = clusters_dir / "clusters.json"
    if not index.exists():
        out = []
        for sub in sorted(clusters_dir.iterdir()):
            cid = _cluster_id_from_folder(sub.name)
            if cid is None or not sub.is_dir():
                continue
            paths = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            out.append(_Cluster(cid, sub.name, paths, [None] * len(paths), [None] * len(paths)))
        if not out:
            raise BadInputError(clusters_dir, "has neither clusters.json nor cluster_* folders")
        noise_dir = clusters_dir / "noise"
        noise = len(list(noise_dir.glob("*.*"))) if noise_dir.is_dir() else 0
        return sorted(out, key=lambda c: c.id), noise, None
    try:
        data = fsio.read_json(index)
        entries = data["clusters"]
        members = data["members"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(index, f"not a clusters.json (docs/data-formats.md): {exc}") from exc
    clusters: dict[int, _Cluster] = {}
    for entry in entries:
        try:
            cid, folder = int(entry["id"]), str(entry["folder"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(index, f"cluster entry without id/folder: {entry!r}") from exc
        if Path(folder).name != folder or folder in ("", ".", ".."):
            raise BadInputError(index, f"cluster {cid} folder {folder!r} is not a plain folder name")
        clusters[cid] = _Cluster(cid, folder, [], [], [])
    noise = 0
    for row in members:
        cid = int(row.get("cluster", -1))
        if cid < 0:
            noise += 1
            continue
        if cid not in clusters:
            raise BadInputError(index, f"member {row.get('layer_id')!r} names unknown cluster {cid}")
        c = clusters[cid]
        # The file lives in the cluster's folder under its own name, wherever the folder was copied.
        name = Path(str(row.get("cluster_path") or row.get("path") or "")).name
        c.paths.append(clusters_dir / c.folder / name)
        c.layer_ids.append(row.get("layer_id"))
        c.episode_ids.append(row.get("episode_id"))
    return [clusters[k] for k in sorted(clusters)], noise, f"{clusters_dir.name}/clusters.json"


class _EmbeddingLookup:
    """layer_id -> embedding row, through layer manifests and embeddings/<episode_id>.npy."""

    def __init__(self, workspace_root: Path):
        self.root = workspace_root
        self._episodes: dict[str, dict[str, np.ndarray] | None] = {}

    def _load(self, episode_id: str) -> dict[str, np.ndarray] | None:
        npy = self.root / "embeddings" / f"{episode_id}.npy"
        manifest = self.root / "layered_frames" / "manifests" / f"{episode_id}.jsonl"
        if not npy.exists() or not manifest.exists():
            return None
        try:
            rows = [r for r in fsio.read_jsonl(manifest) if r.get("kind") == "character"]
            emb = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, BadInputError):
            return None
        if emb.ndim != 2 or len(emb) != len(rows):
            return None
        return {r["layer_id"]: emb[i] for i, r in enumerate(rows)}

    def get(self, episode_id: str | None, layer_id: str | None) -> np.ndarray | None:
        if episode_id is None or layer_id is None:
            return None
        if episode_id not in self._episodes:
            self._episodes[episode_id] = self._load(episode_id)
        table = self._episodes[episode_id]
        if table is None or layer_id not in table:
            return None
        return np.asarray(table[layer_id], dtype=np.float32)


# --------------------------------------------------------------------------- type backends


def _clip_human_scores(paths: Sequence[Path], clip_cfg: EmbeddingConfig | None) -> list[float | None]:
    """p(human) per image from CLIP zero-shot prompts; None for unreadable images."""
    try:
        import open_clip
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the clip type backend needs torch and open_clip: pip install 'yokai-pipeline[ml]'"
        ) from exc
    from PIL import Image

    from yokai_pipeline.models.clip import load_clip

    clip_cfg = clip_cfg or EmbeddingConfig(backend="clip")
    bundle = load_clip(clip_cfg.model, clip_cfg.pretrained, device=clip_cfg.device)
    model, device = bundle.model, bundle.device
    name = clip_cfg.model
    if clip_cfg.pretrained is not None and Path(clip_cfg.pretrained).is_dir():
        name = f"local-dir:{clip_cfg.pretrained}"  # same rule as load_clip
    tokenizer = open_clip.get_tokenizer(name)
    # Normalisation from the model's own preprocess config (carried by the bundle).
    mean = torch.tensor(bundle.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std, device=device).view(1, 3, 1, 1)
    scores: list[float | None] = [None] * len(paths)
    with torch.inference_mode():
        text_feats = []
        for cls in ("human", "yokai"):
            t = model.encode_text(tokenizer(CLIP_PROMPTS[cls]).to(device)).float()
            t = t / t.norm(dim=-1, keepdim=True)
            avg = t.mean(dim=0)
            text_feats.append(avg / avg.norm())
        text = torch.stack(text_feats)
        scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
        for start in range(0, len(paths), clip_cfg.batch_size):
            batch, slots = [], []
            for i in range(start, min(start + clip_cfg.batch_size, len(paths))):
                try:
                    rgb = Image.fromarray(composite(read_rgba(paths[i]), 255))
                except BadInputError:
                    continue
                batch.append(np.asarray(bundle.pil_transform(rgb).convert("RGB"), dtype=np.uint8))
                slots.append(i)
            if not batch:
                continue
            x = torch.from_numpy(np.stack(batch)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            f = model.encode_image((x - mean) / std).float()
            f = f / f.norm(dim=-1, keepdim=True)
            p = (scale * f @ text.T).softmax(dim=-1)[:, 0].cpu().tolist()
            for slot, v in zip(slots, p, strict=True):
                scores[slot] = float(v)
    return scores


# --------------------------------------------------------------------------- analysis


def _median(values: Iterable[float]) -> float:
    vals = list(values)
    return float(np.median(vals)) if vals else 0.0


def _type_from_score(mean_human: float | None, min_conf: float) -> tuple[str, float, dict[str, float]]:
    if mean_human is None:
        return "unknown", 0.0, {"human": 0.0, "yokai": 0.0}
    conf = max(mean_human, 1.0 - mean_human)
    kind = "human" if mean_human >= 0.5 else "yokai"
    if conf < min_conf:
        kind = "unknown"
    return kind, round(conf, 4), {"human": round(mean_human, 4), "yokai": round(1.0 - mean_human, 4)}


def analyze_cluster(
    cluster: _Cluster,
    cfg: AnalysisConfig,
    clusters_dir: Path,
    embeddings: _EmbeddingLookup | None,
    human_scores: dict[Path, float | None] | None = None,
) -> dict[str, Any]:
    """Measure one cluster; unreadable images are listed in ``errors`` and skipped."""
    n = len(cluster.paths)
    picked = _even_sample(list(range(n)), cfg.max_images_per_cluster)
    stats: list[ImageStats] = []
    vecs: list[np.ndarray | None] = []
    errors: list[str] = []
    readable: list[int] = []
    for i in picked:
        try:
            rgba = read_rgba(cluster.paths[i])
        except BadInputError as exc:
            errors.append(str(exc))
            continue
        stats.append(measure_image(rgba))
        readable.append(i)
        vecs.append(embeddings.get(cluster.episode_ids[i], cluster.layer_ids[i]) if embeddings else None)
    # Unreadable images do not count towards the tier: they cannot be trained on.
    images = n - len(errors)
    hashes = [s.phash for s in stats]
    dup = duplicate_ratio(hashes, cfg.duplicate_hamming)
    sharp = _median(s.sharpness for s in stats)
    res = [int(_median(s.width for s in stats)), int(_median(s.height for s in stats))]
    reasons = []
    if stats and sharp < cfg.min_sharpness:
        reasons.append(f"blurry (median sharpness {sharp:.1f} < {cfg.min_sharpness:g})")
    if stats and max(res) < cfg.min_resolution:
        reasons.append(f"low resolution (median {res[0]}x{res[1]}, longer side < {cfg.min_resolution})")
    if dup > cfg.max_duplicate_ratio:
        reasons.append(f"near-duplicates ({dup:.0%} > {cfg.max_duplicate_ratio:.0%})")
    poor = bool(reasons)
    if stats and all(v is not None for v in vecs):
        diversity_source = "embeddings"
        matrix = np.stack([v for v in vecs if v is not None])
    else:
        diversity_source = "descriptor"
        matrix = np.stack([s.descriptor for s in stats]) if stats else np.zeros((0, 1))
    diversity = mean_pairwise_cosine_distance(matrix)
    if human_scores is None:
        hs = [s.human_score for s in stats]
    else:
        hs = [v for v in (human_scores.get(cluster.paths[i]) for i in readable) if v is not None]
    kind, conf, scores = _type_from_score(float(np.mean(hs)) if hs else None, cfg.min_type_confidence)
    tier = tier_for(images, poor)
    samples = [cluster.paths[i] for i in _even_sample(readable, cfg.samples_per_cluster)]
    return {
        "id": cluster.id,
        "folder": cluster.folder,
        "images": images,
        "measured": len(stats),
        "tier": tier,
        "count_tier": tier_for(images, False),
        "recommended": tier in RECOMMENDED_TIERS,
        "status": TIER_STATUS[tier],
        "quality": {
            "sharpness": round(sharp, 2),
            "resolution": res,
            "alpha_coverage": round(float(np.mean([s.alpha_coverage for s in stats])) if stats else 0.0, 4),
            "duplicate_ratio": round(dup, 4),
            "poor": poor,
            "reasons": reasons,
        },
        "diversity": round(diversity, 4),
        "diversity_source": diversity_source,
        "type": kind,
        "type_confidence": conf,
        "type_scores": scores,
        "samples": [p.relative_to(clusters_dir).as_posix() for p in samples],
        "errors": errors,
    }


def summarize(clusters: Sequence[dict[str, Any]], noise_images: int = 0) -> dict[str, Any]:
    """Totals by tier and by type."""
    by_tier = {t: sum(1 for c in clusters if c["tier"] == t) for t in TIERS}
    by_type = {t: sum(1 for c in clusters if c["type"] == t) for t in CHARACTER_TYPES}
    return {
        "total": len(clusters),
        "recommended": sum(1 for c in clusters if c["recommended"]),
        "images": sum(c["images"] for c in clusters),
        "noise_images": noise_images,
        "by_tier": by_tier,
        "by_type": by_type,
    }


def analyze_clusters(
    clusters_dir: str | Path,
    cfg: AnalysisConfig | None = None,
    *,
    type_backend: str = "offline",
    clip_cfg: EmbeddingConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Analyse every cluster of a character_clusters folder.

    Args:
        clusters_dir: the ``character_clusters`` folder (with clusters.json).
        cfg: analysis settings (tiers' quality thresholds, samples per cluster).
        type_backend: ``"offline"`` (heuristic, no weights) or ``"clip"`` (zero-shot prompts).
        clip_cfg: model settings for the clip backend.
        progress: ``progress(done, total)`` callback over clusters.

    Returns:
        The analysis result (schema in the module docstring).
    """
    if type_backend not in ("offline", "clip"):
        raise ValueError(f"type_backend must be 'offline' or 'clip', not {type_backend!r}")
    cfg = cfg or AnalysisConfig()
    clusters_dir = Path(clusters_dir).resolve()
    clusters, noise, source = load_clusters(clusters_dir)
    embeddings = _EmbeddingLookup(clusters_dir.parent)
    human_scores: dict[Path, float | None] | None = None
    if type_backend == "clip":
        paths = [p for c in clusters for p in _even_sample(c.paths, CLIP_IMAGES_PER_CLUSTER)]
        human_scores = dict(zip(paths, _clip_human_scores(paths, clip_cfg), strict=True))
    results = []
    errors: list[str] = []
    for k, cluster in enumerate(clusters):
        row = analyze_cluster(cluster, cfg, clusters_dir, embeddings, human_scores)
        results.append(row)
        errors.extend(row["errors"])
        if progress is not None:
            progress(k + 1, len(clusters))
    sources = {c["diversity_source"] for c in results}
    return {
        "version": 1,
        "clusters_dir": clusters_dir.as_posix(),
        "source": source,
        "type_backend": type_backend,
        "diversity_source": sources.pop() if len(sources) == 1 else ("mixed" if sources else "descriptor"),
        "config": cfg.model_dump(mode="json"),
        "tier_thresholds": dict(TIER_MIN_IMAGES),
        "summary": summarize(results, noise),
        "clusters": results,
        "errors": errors,
    }


def read_analysis(path: str | Path) -> dict[str, Any]:
    """Read a cluster_analysis.json; raises BadInputError when it is not one."""
    try:
        data = fsio.read_json(path)
    except (OSError, ValueError) as exc:
        raise BadInputError(path, f"cannot read analysis JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("clusters"), list):
        raise BadInputError(path, "not a cluster_analysis.json (version 1 with a 'clusters' list)")
    for c in data["clusters"]:
        if not isinstance(c, dict) or not {"id", "images", "tier", "type"} <= c.keys():
            raise BadInputError(path, f"cluster entry lacks id/images/tier/type: {c!r:.120}")
    return data


# --------------------------------------------------------------------------- outputs


def format_summary(result: dict[str, Any]) -> str:
    """The guide's plain-text summary (totals by tier and by type)."""
    s = result["summary"]
    lines = [
        "Cluster Analysis Summary",
        "========================",
        f"Total clusters: {s['total']}",
        "",
        "By Tier:",
    ]
    for t in TIERS:
        lines.append(f"  {t} Tier: {s['by_tier'].get(t, 0)} clusters ({TIER_STATUS[t]})")
    lines += ["", "By Character Type:"]
    for t in CHARACTER_TYPES:
        lines.append(f"  {t.capitalize()}: {s['by_type'].get(t, 0)} clusters")
    return "\n".join(lines)


def type_accuracy(result: dict[str, Any], truth: dict[int, str]) -> float:
    """Fraction of the clusters in ``truth`` whose type matches ("unknown" counts as wrong)."""
    by_id = {int(c["id"]): c["type"] for c in result["clusters"]}
    keys = [int(k) for k in truth if int(k) in by_id]
    if not keys:
        return 0.0
    truth_i = {int(k): v for k, v in truth.items()}
    return sum(by_id[k] == truth_i[k] for k in keys) / len(keys)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def analysis_markdown(result: dict[str, Any], html_link: str) -> str:
    """Markdown table of clusters by tier with a link to the HTML report (for a Prefect artifact)."""
    s = result["summary"]
    tiers = ", ".join(f"{t}: {s['by_tier'].get(t, 0)}" for t in TIERS)
    types = ", ".join(f"{t}: {s['by_type'].get(t, 0)}" for t in CHARACTER_TYPES)
    lines = [
        "# Cluster analysis",
        "",
        f"[HTML report]({html_link}) · {s['total']} clusters · {s['recommended']} recommended",
        "",
        f"Tiers: {tiers}  ",
        f"Types: {types}",
        "",
        "| Tier | Cluster | Images | Type | Confidence | Sharpness | Duplicates | Diversity | Status |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    order = sorted(result["clusters"], key=lambda c: (TIERS.index(c["tier"]), -c["images"], c["id"]))
    for c in order:
        q = c["quality"]
        lines.append(
            f"| {c['tier']} | {_md_cell(c['folder'])} | {c['images']} | {c['type']} "
            f"| {c['type_confidence']:.2f} | {q['sharpness']:.0f} | {q['duplicate_ratio']:.0%} "
            f"| {c['diversity']:.3f} | {c['status']} |"
        )
    return "\n".join(lines) + "\n"


def thumbnail_data_uri(path: str | Path, size: int) -> str:
    """A small WebP thumbnail (alpha kept) as a data: URI; raises BadInputError when unreadable."""
    from PIL import Image

    rgba = read_rgba(path)
    im = Image.fromarray(rgba)
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="WEBP", quality=80, method=4)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_report(
    result: dict[str, Any], names: dict[int, str] | None = None, tags: dict[int, dict[str, Any]] | None = None
) -> str:
    """The self-contained HTML report (thumbnails embedded as WebP data URIs).

    Args:
        result: an analysis result.
        names: optional cluster id -> character name, shown on each cluster (escaped).
        tags: optional cluster id -> tag summary (``top_tags``, ``core_tags``; see
            :func:`yokai_pipeline.tagging.cluster_tag_summaries`), shown on each cluster.
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    size = int(result.get("config", {}).get("thumbnail_size", 128))
    root = Path(result["clusters_dir"])
    names = {int(k): str(v) for k, v in (names or {}).items()}
    tags = {int(k): v for k, v in (tags or {}).items()}
    clusters = []
    for c in result["clusters"]:
        thumbs = []
        for rel in c.get("samples", []):
            try:
                thumbs.append({"src": thumbnail_data_uri(root / rel, size), "title": rel})
            except BadInputError:
                continue  # a vanished file must not leave a broken image in the report
        clusters.append(
            {
                **c,
                "name": names.get(int(c["id"])),
                "tags": tags.get(int(c["id"])),
                "thumbs": thumbs,
                "anchor": cluster_anchor(c["id"]),
            }
        )
    return env.get_template("report.html.j2").render(
        result=result,
        summary=result["summary"],
        summary_text=format_summary(result),
        clusters=clusters,
        tiers=TIERS,
        types=CHARACTER_TYPES,
        tier_status=TIER_STATUS,
        thumb_size=size,
    )


def cluster_anchor(cluster_id: int) -> str:
    """HTML id of a cluster's section in the report (``cluster-003``)."""
    return f"cluster-{int(cluster_id):03d}"


def write_analysis(
    result: dict[str, Any],
    json_path: str | Path,
    html_path: str | Path | None,
    names: dict[int, str] | None = None,
    tags: dict[int, dict[str, Any]] | None = None,
) -> tuple[Path, Path | None]:
    """Write the analysis JSON and (unless ``html_path`` is None) the HTML report, atomically."""
    json_path = fsio.atomic_write_json(json_path, result)
    if html_path is None:
        return json_path, None
    return json_path, fsio.atomic_write_text(html_path, render_report(result, names, tags))
