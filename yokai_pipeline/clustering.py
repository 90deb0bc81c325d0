"""Identity clustering of character layers: UMAP + HDBSCAN, incremental assignment, stable ids.

* :func:`cluster_embeddings` is the pure core: unit-norm rows in, ``(labels, probabilities)``
  out, seeded and deterministic, cluster ids ordered by size (0 = largest), -1 = noise.
* :func:`cluster_layers` clusters the layers of some episodes from scratch and writes
  ``character_clusters/`` (one folder per cluster, ``noise/``, ``clusters.json``).
* :func:`assign_incremental` adds new episodes without renumbering existing clusters: a new
  layer joins the nearest cluster centroid within ``reassign_max_distance`` (cosine); the
  rest are clustered among themselves and become new ids after the current maximum.
* :func:`recluster` re-clusters everything and keeps ids stable by matching old clusters
  to new ones on shared members (Hungarian assignment).
* :func:`evaluate_clusters` scores members against ground-truth labels (ARI, purity).

Folders are rebuilt in a temporary directory next to ``character_clusters`` and swapped in
by renames, so a crash never leaves a half-written tree.

Numba: UMAP compiles its kernels on first use in every process (10-40 s). We point
``NUMBA_CACHE_DIR`` at a persistent folder (unless the user set one) and switch on numba's
on-disk cache for UMAP's module-level kernels, which UMAP itself leaves uncached, so only
the very first process on a machine pays for compilation.
"""

from __future__ import annotations

import importlib
import os
import shutil
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from yokai_pipeline.config import ClusteringConfig
from yokai_pipeline.errors import BadInputError, ConfigError
from yokai_pipeline.fsio import atomic_write_json, file_sha256, read_json, stable_hash
from yokai_pipeline.workspace import Workspace

CLUSTERS_VERSION = 1
NOISE_FOLDER = "noise"
#: Below this many layers UMAP has too few points for a meaningful graph; HDBSCAN then
#: runs on the embeddings directly.
MIN_UMAP_SAMPLES = 16
#: Centroid distance below which two clusters are one character, per embedding backend. The
#: offline descriptor puts distinct characters >= 0.3 apart and fragments of one < 0.08; CLIP
#: places different characters of one art style closer together, so it gets less.
DEFAULT_MERGE_DISTANCE = {"offline": 0.1, "other": 0.05}
#: Mean cosine distance between two groups of one cluster above which they are different
#: characters. Offline: one character's crops are < 0.15 apart, two characters > 0.3.
#: CLIP: no safe universal value without real weights, so off unless configured.
DEFAULT_SPLIT_DISTANCE = {"offline": 0.25, "other": 0.0}
#: Mean cosine distance within which noise layers are one rare character (offline: one
#: character's crops are < 0.15 apart, as above). CLIP: off unless configured.
DEFAULT_NOISE_GROUP_DISTANCE = {"offline": 0.15, "other": 0.0}
#: Merge guard (merge_close_clusters' spread_ratio): offline descriptors of two characters
#: sharing a body colour have close centroids but are two tight modes. CLIP: off.
DEFAULT_MERGE_SPREAD_RATIO = {"offline": 2.0, "other": 0.0}
#: Largest cluster whose members are linked exactly; bigger ones are split on a sample.
SPLIT_SAMPLE = 2000
#: Most layers linked exactly under an identity metric (CCIP); the rest join their nearest group.
METRIC_LINK_SAMPLE = 3000
#: Members per cluster that stand for it when a layer is compared with it under an identity metric.
METRIC_REPRESENTATIVES = 16

_umap_lock = threading.Lock()
_umap_ready = False


# --------------------------------------------------------------------------- core


def _import_umap() -> Any:
    """Import umap with a persistent numba cache (see the module docstring)."""
    global _umap_ready
    with _umap_lock:
        if not _umap_ready:
            cache_dir = os.environ.setdefault(
                "NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "yokai" / "numba")
            )
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            try:
                from numba.core import config as numba_config
                from numba.core.registry import CPUDispatcher
            except ImportError as exc:  # pragma: no cover - umap depends on numba
                raise ImportError("clustering needs umap-learn: pip install umap-learn hdbscan") from exc
            if numba_config.CACHE_DIR != cache_dir:  # numba was imported before we set the variable
                numba_config.reload_config()
            try:
                importlib.import_module("umap")
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError("clustering needs umap-learn: pip install umap-learn hdbscan") from exc
            # UMAP's kernels and part of pynndescent's are plain njit (no cache=True); enabling
            # numba's file cache on them turns a 10-60 s first fit per process into ~1 s.
            import sys

            modules = [
                m for n, m in list(sys.modules.items()) if n.startswith(("umap.", "pynndescent.")) and m
            ]
            for mod in modules:
                for obj in list(vars(mod).values()):
                    if isinstance(obj, CPUDispatcher) and type(obj._cache).__name__ == "NullCache":
                        try:
                            obj.enable_caching()
                        except Exception:  # noqa: BLE001 - a kernel numba cannot cache just compiles as before
                            pass
            _umap_ready = True
    return importlib.import_module("umap")


def _import_hdbscan() -> Any:
    try:
        import hdbscan
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("clustering needs hdbscan: pip install hdbscan umap-learn") from exc
    return hdbscan


def normalise_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def reduce_embeddings(X: np.ndarray, cfg: ClusteringConfig) -> np.ndarray:
    """UMAP (cosine) of unit-norm rows to ``cfg.n_components`` dimensions, seeded.

    Wide embeddings are first projected onto their top ``cfg.pca_dim`` principal components
    (then UMAP uses the euclidean metric, equivalent to cosine on unit vectors): UMAP's
    nearest-neighbour search cost grows with the dimension, and 512 -> 64 keeps >95% of the
    variance of CLIP-like embeddings.
    """
    n, d = X.shape
    metric = "cosine"
    if cfg.pca_dim and d > cfg.pca_dim:
        from sklearn.decomposition import PCA

        X = PCA(
            n_components=min(cfg.pca_dim, n - 1), svd_solver="randomized", random_state=cfg.seed
        ).fit_transform(X)
        X = X.astype(np.float32)
        metric = "euclidean"
    umap = _import_umap()
    n_components = min(cfg.n_components, n - 2)
    reducer = umap.UMAP(
        n_neighbors=min(cfg.n_neighbors, n - 1),
        n_components=n_components,
        min_dist=cfg.min_dist,
        metric=metric,
        random_state=cfg.seed,
        n_epochs=cfg.n_epochs,
        low_memory=True,
        init="spectral" if n > n_components + 1 else "random",
        n_jobs=1,
    )
    with warnings.catch_warnings():
        # random_state forces one thread; UMAP warns about it on every call.
        warnings.filterwarnings("ignore", message=".*n_jobs value .* overridden.*")
        warnings.filterwarnings("ignore", message=".*spectral initialisation failed.*")
        # pynndescent's nn_descent takes the metric as a first-class function and cannot be
        # cached; numba says so once per process (it then compiles it, a few seconds).
        warnings.filterwarnings("ignore", message=".*Cannot cache compiled function.*")
        return reducer.fit_transform(X).astype(np.float32)


def cluster_embeddings(
    X: np.ndarray,
    cfg: ClusteringConfig,
    allow_single_cluster: bool = False,
    metric: IdentityMetric | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster embeddings with UMAP then HDBSCAN (or, given an identity ``metric``, its own linkage).

    Deterministic for a given ``cfg.seed``. Cluster ids are ordered by size (0 = largest;
    ties by first member), -1 is noise.

    Args:
        X: ``[n, d]`` embeddings (normalised here).
        cfg: clustering settings.
        allow_single_cluster: let HDBSCAN return one cluster for all points (otherwise a
            set of one character is all noise); used for the leftovers of incremental runs.
        metric: a model's own identity distance and threshold (CCIP); then
            :func:`cluster_by_metric` clusters instead of UMAP + HDBSCAN.

    Returns:
        ``labels`` (int64 ``[n]``) and ``probabilities`` (float32 ``[n]``, HDBSCAN membership
        strength, 0 for noise).
    """
    if metric is not None:
        return cluster_by_metric(X, cfg, metric)
    X = normalise_rows(X)
    n = X.shape[0]
    labels = np.full(n, -1, dtype=np.int64)
    probs = np.zeros(n, dtype=np.float32)
    if n < max(cfg.min_cluster_size, 2):
        return labels, probs
    Z = reduce_embeddings(X, cfg) if n >= MIN_UMAP_SAMPLES else X
    hdbscan = _import_hdbscan()
    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=cfg.min_cluster_size,
        min_samples=min(cfg.min_samples, n - 1) if cfg.min_samples else None,
        core_dist_n_jobs=1,
        allow_single_cluster=allow_single_cluster,
    )
    raw = clusterer.fit_predict(Z.astype(np.float64))
    probs = np.where(raw >= 0, clusterer.probabilities_, 0.0).astype(np.float32)
    merge = DEFAULT_MERGE_DISTANCE["other"] if cfg.merge_distance is None else cfg.merge_distance
    split = DEFAULT_SPLIT_DISTANCE["other"] if cfg.split_distance is None else cfg.split_distance
    group = (
        DEFAULT_NOISE_GROUP_DISTANCE["other"]
        if cfg.noise_group_distance is None
        else cfg.noise_group_distance
    )
    labels = split_incoherent_clusters(X, raw, split, cfg.min_cluster_size, cfg.seed)
    labels = group_noise(X, labels, group, cfg.noise_group_size)
    spread = DEFAULT_MERGE_SPREAD_RATIO["other"] if cfg.merge_spread_ratio is None else cfg.merge_spread_ratio
    labels = merge_close_clusters(X, labels, merge, spread)
    return relabel_by_size(labels), np.where(labels >= 0, probs, 0.0).astype(np.float32)


def split_incoherent_clusters(
    X: np.ndarray, labels: np.ndarray, max_distance: float, min_size: int, seed: int = 0
) -> np.ndarray:
    """Split clusters that hold groups farther apart than ``max_distance`` in the embedding space.

    UMAP tends to pull several small, unrelated groups into one clump that HDBSCAN then
    reports as one cluster: rare characters merged together. Each cluster is re-examined with
    average-linkage (cosine) on its original embeddings: its largest group keeps the id,
    other groups of at least ``min_size`` get new ids, smaller ones become noise.
    """
    if max_distance <= 0:
        return labels
    from scipy.cluster.hierarchy import fcluster, linkage

    Xn = normalise_rows(X)
    out = labels.copy()
    next_id = int(labels.max()) + 1 if labels.size else 0
    rng = np.random.default_rng(seed)
    for cid in [c for c in np.unique(labels) if c >= 0]:
        idx = np.flatnonzero(labels == cid)
        if idx.size < 2:
            continue
        # Linkage is O(n^2) in memory; a big cluster is split on a sample, the rest follow
        # their nearest group centroid.
        sample = np.sort(rng.choice(idx, SPLIT_SAMPLE, replace=False)) if idx.size > SPLIT_SAMPLE else idx
        parts = fcluster(
            linkage(Xn[sample], method="average", metric="cosine"), t=max_distance, criterion="distance"
        )
        if parts.max() == 1:
            continue
        if sample.size < idx.size:
            groups = {
                int(p): normalise_rows(Xn[sample[parts == p]].mean(axis=0, keepdims=True))[0]
                for p in np.unique(parts)
            }
            keys = np.array(sorted(groups))
            parts = keys[(Xn[idx] @ np.stack([groups[int(k)] for k in keys]).T).argmax(axis=1)]
        sizes = Counter(parts.tolist())
        for rank, (part, size) in enumerate(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))):
            if rank == 0:
                continue
            if size >= min_size:
                out[idx[parts == part]] = next_id
                next_id += 1
            else:
                out[idx[parts == part]] = -1
    return out


def group_noise(X: np.ndarray, labels: np.ndarray, max_distance: float, min_size: int) -> np.ndarray:
    """Give tight groups of noise layers a cluster of their own.

    HDBSCAN needs ``min_cluster_size`` layers for a cluster, so a character seen in three
    frames is noise, and noise counts as one mixed cluster. Noise layers are linked (average
    linkage, cosine) on their original embeddings; each group within ``max_distance`` of at
    least ``min_size`` layers becomes a new cluster (the merge step after this joins a group
    to a cluster of the same character). Linkage is O(n^2): at most :data:`SPLIT_SAMPLE`
    noise layers are linked, the first ones.
    """
    idx = np.flatnonzero(labels < 0)[:SPLIT_SAMPLE]
    if max_distance <= 0 or idx.size < min_size:
        return labels
    from scipy.cluster.hierarchy import fcluster, linkage

    parts = fcluster(
        linkage(normalise_rows(X[idx]), method="average", metric="cosine"),
        t=max_distance,
        criterion="distance",
    )
    out = labels.copy()
    next_id = int(labels.max()) + 1
    for part, size in sorted(Counter(parts.tolist()).items()):
        if size >= min_size:
            out[idx[parts == part]] = next_id
            next_id += 1
    return out


# --------------------------------------------------------------------------- identity metric (CCIP)


class IdentityMetric(Protocol):
    """A model's own "same character" distance between feature rows, and its threshold."""

    threshold: float

    def differences(self, a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray: ...


def identity_metric(embedding: Mapping[str, Any]) -> IdentityMetric | None:
    """The metric that goes with the embeddings' backend: CCIP's metric model, or None (cosine).

    The CCIP source and threshold come from what the embedding stage recorded, so clustering
    uses the model (and threshold) that produced the features.
    """
    if embedding.get("backend") != "ccip":
        return None
    from yokai_pipeline.models.ccip import REPO_ID, load_ccip

    rec = embedding.get("ccip") or {}
    return load_ccip(rec.get("source") or REPO_ID, threshold=rec.get("threshold"))


def cluster_by_metric(
    X: np.ndarray, cfg: ClusteringConfig, metric: IdentityMetric
) -> tuple[np.ndarray, np.ndarray]:
    """Average-linkage clusters cut at the metric's own threshold; small groups are noise.

    Two layers belong together when their mean difference is within ``metric.threshold``
    (CCIP's "same character" rule, applied to groups). Above :data:`METRIC_LINK_SAMPLE`
    layers a seeded sample is linked and the others join their nearest group. A member's
    probability is ``1 - difference to its group / threshold``.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = X.shape[0]
    labels = np.full(n, -1, dtype=np.int64)
    probs = np.zeros(n, dtype=np.float32)
    if n < max(cfg.min_cluster_size, 2):
        return labels, probs
    rng = np.random.default_rng(cfg.seed)
    sample = (
        np.sort(rng.choice(n, METRIC_LINK_SAMPLE, replace=False)) if n > METRIC_LINK_SAMPLE else np.arange(n)
    )
    D = metric.differences(X[sample]).astype(np.float64)
    D = np.clip((D + D.T) / 2, 0.0, None)
    np.fill_diagonal(D, 0.0)
    parts = fcluster(
        linkage(squareform(D, checks=False), method="average"), t=metric.threshold, criterion="distance"
    )
    labels[sample] = parts
    if sample.size < n:
        rest = np.setdiff1d(np.arange(n), sample)
        near, _ = nearest_by_metric(X[rest], representatives(X[sample], parts, cfg.seed), metric)
        labels[rest] = near
    for cid, size in Counter(labels[labels >= 0].tolist()).items():
        if size < cfg.min_cluster_size:
            labels[labels == cid] = -1
    labels = relabel_by_size(labels)
    reps = representatives(X, labels, cfg.seed)
    for cid, R in reps.items():
        idx = np.flatnonzero(labels == cid)
        d = metric.differences(X[idx], R).mean(axis=1)
        probs[idx] = np.clip(1.0 - d / metric.threshold, 0.0, 1.0)
    return labels, probs


def representatives(
    X: np.ndarray, labels: np.ndarray, seed: int = 0, k: int = METRIC_REPRESENTATIVES
) -> dict[int, np.ndarray]:
    """Up to ``k`` members of each cluster id >= 0 (a seeded sample), as feature rows."""
    rng = np.random.default_rng(seed)
    out = {}
    for cid in np.unique(labels):
        if cid < 0:
            continue
        idx = np.flatnonzero(labels == cid)
        out[int(cid)] = X[np.sort(rng.choice(idx, k, replace=False)) if idx.size > k else idx]
    return out


def nearest_by_metric(
    X: np.ndarray, reps: Mapping[int, np.ndarray], metric: IdentityMetric
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest cluster of each row by mean metric difference to its representatives.

    Returns:
        ``(ids, differences)``; ids are -1 where the nearest is above ``metric.threshold``.
    """
    n = X.shape[0]
    if not reps or n == 0:
        return np.full(n, -1, dtype=np.int64), np.full(n, np.inf, dtype=np.float32)
    ids = np.array(sorted(reps), dtype=np.int64)
    D = np.stack([metric.differences(X, reps[int(c)]).mean(axis=1) for c in ids], axis=1)
    j = D.argmin(axis=1)
    best = D[np.arange(n), j].astype(np.float32)
    return np.where(best <= metric.threshold, ids[j], -1), best


def resolve_config(cfg: ClusteringConfig, embedding: Mapping[str, Any]) -> ClusteringConfig:
    """Fill settings left to "auto" from the embedding backend (recorded in clusters.json)."""
    backend = str(embedding.get("backend"))
    update: dict[str, float] = {}
    if cfg.merge_distance is None:
        update["merge_distance"] = DEFAULT_MERGE_DISTANCE.get(backend, DEFAULT_MERGE_DISTANCE["other"])
    if cfg.split_distance is None:
        update["split_distance"] = DEFAULT_SPLIT_DISTANCE.get(backend, DEFAULT_SPLIT_DISTANCE["other"])
    if cfg.merge_spread_ratio is None:
        update["merge_spread_ratio"] = DEFAULT_MERGE_SPREAD_RATIO.get(
            backend, DEFAULT_MERGE_SPREAD_RATIO["other"]
        )
    if cfg.noise_group_distance is None:
        update["noise_group_distance"] = DEFAULT_NOISE_GROUP_DISTANCE.get(
            backend, DEFAULT_NOISE_GROUP_DISTANCE["other"]
        )
    return cfg.model_copy(update=update) if update else cfg


def merge_close_clusters(
    X: np.ndarray, labels: np.ndarray, max_distance: float, spread_ratio: float = 0.0
) -> np.ndarray:
    """Join clusters whose centroids are within ``max_distance`` (cosine), transitively.

    UMAP with ``min_dist=0`` packs one character's poses or scales into several tight clumps
    that HDBSCAN reports as separate clusters; their centroids in the embedding space are
    nearly identical, unlike those of two different characters. With ``spread_ratio`` > 0 two
    close clusters are also kept apart when the mean distance between their members is more
    than ``spread_ratio`` x the wider one's own spread (:func:`_spread`, robust to an outlier)
    and than ``max_distance / 2``: two characters that share a palette are two tight modes, a
    character's fragments are not.
    """
    cents = centroids_of(X, labels)
    if max_distance <= 0 or len(cents) < 2:
        return labels
    ids = sorted(cents)
    C = np.stack([cents[i] for i in ids])
    close = (1.0 - C @ C.T) <= max_distance
    if spread_ratio > 0:
        # mean pairwise cosine between two clusters' unit rows = dot of their means: no pairwise matrix
        Xn = normalise_rows(X)
        M = np.stack([Xn[labels == i].mean(axis=0) for i in ids])
        within = np.array([_spread(Xn[labels == i], C[k]) for k, i in enumerate(ids)])
        cross = 1.0 - M @ M.T
        close &= cross <= np.maximum(spread_ratio * np.maximum.outer(within, within), max_distance / 2)
    parent = list(range(len(ids)))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(*np.nonzero(np.triu(close, 1)), strict=True):
        parent[root(int(b))] = root(int(a))
    out = labels.copy()
    for k, cid in enumerate(ids):
        out[labels == cid] = ids[root(k)]
    return out


def _spread(rows: np.ndarray, centroid: np.ndarray) -> float:
    """A cluster's own spread for the merge guard: its typical pairwise cosine distance.

    Twice the median distance of its unit rows from its unit centroid (for a tight cluster the
    mean pairwise distance is about twice the mean distance from the centre): the median, so
    that one outlier (a layer with a prop attached) does not widen a small cluster enough to
    let it merge with a neighbour of a shared palette.
    """
    return 2.0 * float(np.median(1.0 - rows @ centroid))


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster labels 0..k-1 by decreasing size (ties: earliest member first); -1 stays."""
    labels = np.asarray(labels)
    ids = [c for c in np.unique(labels) if c >= 0]
    first = {c: int(np.argmax(labels == c)) for c in ids}
    order = sorted(ids, key=lambda c: (-int((labels == c).sum()), first[c]))
    out = np.full(labels.shape, -1, dtype=np.int64)
    for new, old in enumerate(order):
        out[labels == old] = new
    return out


def centroids_of(X: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Unit-norm mean embedding of each cluster id >= 0."""
    Xn = normalise_rows(X)
    return {
        int(c): normalise_rows(Xn[labels == c].mean(axis=0, keepdims=True))[0]
        for c in np.unique(labels)
        if c >= 0
    }


def nearest_centroid(
    X: np.ndarray, centroids: Mapping[int, np.ndarray], max_distance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (cosine) of each row, or -1 when farther than ``max_distance``.

    Returns:
        ``(ids, distances)``; ``distances`` is the cosine distance to the nearest centroid.
    """
    n = X.shape[0]
    if not centroids or n == 0:
        return np.full(n, -1, dtype=np.int64), np.full(n, np.inf, dtype=np.float32)
    ids = np.array(sorted(centroids), dtype=np.int64)
    C = normalise_rows(np.stack([centroids[int(i)] for i in ids]))
    dist = 1.0 - normalise_rows(X) @ C.T
    j = dist.argmin(axis=1)
    best = dist[np.arange(n), j].astype(np.float32)
    return np.where(best <= max_distance, ids[j], -1), best


# --------------------------------------------------------------------------- workspace I/O


class _Layers:
    """Character layers of some episodes with their embeddings, in (episode, manifest) order."""

    def __init__(
        self, rows: list[dict[str, Any]], X: np.ndarray, embedding: dict[str, Any], skipped: list[str]
    ):
        self.rows, self.X, self.embedding, self.skipped = rows, X, embedding, skipped

    @property
    def ids(self) -> list[str]:
        return [r["layer_id"] for r in self.rows]


def load_layers(workspace: Workspace, episode_ids: Sequence[str]) -> _Layers:
    """Load manifests and embeddings of episodes; layers whose embedding failed are skipped.

    Raises:
        BadInputError: a manifest or embedding file is missing, or they disagree.
        ConfigError: episodes were embedded with different backends or dimensions.
    """
    from yokai_pipeline.embedding import character_rows, load_embeddings

    rows: list[dict[str, Any]] = []
    blocks: list[np.ndarray] = []
    skipped: list[str] = []
    embedding: dict[str, Any] | None = None
    for ep in dict.fromkeys(episode_ids):
        ep_rows = character_rows(workspace, ep)
        vectors, meta = load_embeddings(workspace, ep)
        if meta.get("layer_ids") != [r["layer_id"] for r in ep_rows]:
            raise BadInputError(
                workspace.embeddings_path(ep), "embeddings do not match the layer manifest; re-run embedding"
            )
        this = {"backend": meta.get("backend"), "dim": int(vectors.shape[1])}
        if meta.get("model"):
            this["model"] = meta["model"]
        if meta.get("ccip"):
            this["ccip"] = meta["ccip"]
        if embedding is None:
            embedding = this
        elif this != embedding:
            raise ConfigError(
                f"episode {ep} was embedded with {this}, others with {embedding}; re-embed them alike"
            )
        ok = np.linalg.norm(vectors, axis=1) > 0
        skipped += [r["layer_id"] for r, good in zip(ep_rows, ok, strict=True) if not good]
        rows += [r for r, good in zip(ep_rows, ok, strict=True) if good]
        blocks.append(vectors[ok])
    dim = embedding["dim"] if embedding else 0
    X = np.concatenate(blocks) if blocks else np.zeros((0, dim), dtype=np.float32)
    return _Layers(rows, X, embedding or {"backend": None, "dim": 0}, skipped)


def clusters_file(workspace: Workspace) -> Path:
    return workspace.character_clusters / "clusters.json"


def read_clusters(workspace: Workspace) -> dict[str, Any] | None:
    """The current ``clusters.json`` (None if there is none)."""
    _recover_tree(workspace)
    path = clusters_file(workspace)
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
    except ValueError as exc:
        raise BadInputError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or "members" not in doc or "clusters" not in doc:
        raise BadInputError(path, "missing 'members' or 'clusters'")
    return doc


REVIEW_IDS = range(1000, 1_000_000)
"""Cluster ids that the review's splits allocate (``edits.SPLIT_ID_BASE`` up); clustering skips them."""


def clear_of_review_ids(ids: np.ndarray | int) -> np.ndarray:
    """``ids`` with every id in :data:`REVIEW_IDS` moved above that range (noise and the rest kept).

    Clustering numbers new clusters on from the largest id. Past 999 such an id could be one
    a reviewer's split already took, and the edit log would then move layers into an
    unrelated cluster. Allocation runs upwards from the largest id, so the move keeps ids unique.
    """
    arr = np.asarray(ids, dtype=np.int64)
    inside = (arr >= REVIEW_IDS.start) & (arr < REVIEW_IDS.stop)
    return np.where(inside, arr + len(REVIEW_IDS), arr)


def folder_name(cluster_id: int) -> str:
    return NOISE_FOLDER if cluster_id < 0 else f"cluster_{cluster_id:03d}"


def _member(row: Mapping[str, Any], cluster_id: int, probability: float) -> dict[str, Any]:
    name = Path(row["path"]).name
    return {
        "layer_id": row["layer_id"],
        "cluster": int(cluster_id),
        "episode": row.get("episode"),
        "episode_id": row.get("episode_id"),
        "frame_index": row.get("frame_index"),
        "box": row.get("box"),
        "path": row["path"],
        "cluster_path": f"character_clusters/{folder_name(cluster_id)}/{name}",
        "probability": round(float(probability), 4),
    }


def build_document(
    members: list[dict[str, Any]],
    X_by_layer: Mapping[str, np.ndarray],
    embedding: Mapping[str, Any],
    cfg: ClusteringConfig,
) -> dict[str, Any]:
    """Assemble clusters.json: clusters (id, folder, size, centroid) sorted by id, members."""
    by_cluster: dict[int, list[str]] = {}
    for m in members:
        if m["cluster"] >= 0:
            by_cluster.setdefault(m["cluster"], []).append(m["layer_id"])
    clusters = []
    for cid in sorted(by_cluster):
        ids = by_cluster[cid]
        centroid = normalise_rows(np.mean([X_by_layer[i] for i in ids], axis=0, keepdims=True))[0]
        clusters.append(
            {
                "id": cid,
                "folder": folder_name(cid),
                "size": len(ids),
                "centroid": [round(float(v), 6) for v in centroid],
            }
        )
    return {
        "version": CLUSTERS_VERSION,
        "embedding": dict(embedding),
        "clustering": cfg.model_dump(mode="json"),
        "clusters": clusters,
        "members": members,
    }


def _recover_tree(workspace: Workspace, folder: str = "character_clusters") -> None:
    """Finish or undo a swap a crash interrupted; remove abandoned build folders."""
    root, final = workspace.root, workspace.root / folder
    olds = sorted(root.glob(f".old-{folder}-*"), key=lambda p: p.stat().st_mtime)
    if not final.exists() and olds:
        os.replace(olds.pop(), final)
    for p in [*olds, *root.glob(f".tmp-{folder}-*")]:
        shutil.rmtree(p, ignore_errors=True)


def _place(src: Path, dest: Path, mode: str) -> None:
    if mode == "hardlink":
        try:
            os.link(src, dest)
            return
        except OSError:
            pass  # other filesystem, or links not allowed: copy instead
    shutil.copy2(src, dest)


def write_cluster_tree(
    workspace: Workspace, doc: dict[str, Any], cfg: ClusteringConfig, folder: str = "character_clusters"
) -> dict[str, Any]:
    """Rebuild ``character_clusters/`` (or ``folder``) from a clusters document, atomically (build, then swap).

    A member whose layer file is missing keeps its record with ``cluster_path`` None.

    Returns:
        ``{"placed": n, "missing": [layer_id, ...]}``.
    """
    _recover_tree(workspace, folder)
    root, final = workspace.root, workspace.root / folder
    tag = uuid.uuid4().hex[:8]
    tmp = root / f".tmp-{folder}-{tag}"
    tmp.mkdir(parents=True)
    missing: list[str] = []
    try:
        made: set[str] = set()
        for m in doc["members"]:
            sub = folder_name(m["cluster"])
            if sub not in made:
                (tmp / sub).mkdir()
                made.add(sub)
            src = workspace.abs(m["path"])
            try:
                _place(src, tmp / sub / Path(m["path"]).name, cfg.link_mode)
            except FileNotFoundError:
                missing.append(m["layer_id"])
                m["cluster_path"] = None
        for c in doc["clusters"]:  # an empty cluster still gets its folder
            (tmp / c["folder"]).mkdir(exist_ok=True)
        atomic_write_json(tmp / "clusters.json", doc)
        old = root / f".old-{folder}-{tag}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"placed": len(doc["members"]) - len(missing), "missing": missing}


def episode_stamps(workspace: Workspace, episode_ids: Iterable[str]) -> dict[str, str]:
    """What each episode's clustered layers came from: a hash of its layer manifest and its embeddings.

    Recorded in clusters.json (``episodes``), so a later run sees an episode whose video was
    replaced under the same name, or that was layered or embedded again, although its layer
    ids are the same. Episodes missing either file get no stamp.
    """
    out = {}
    for ep in episode_ids:
        files = [workspace.layers_manifest(ep), workspace.embeddings_path(ep)]
        if all(f.is_file() for f in files):
            out[ep] = stable_hash([file_sha256(f) for f in files])[:32]
    return out


def changed_episodes(workspace: Workspace, doc: Mapping[str, Any], episode_ids: Iterable[str]) -> list[str]:
    """Episodes of ``episode_ids`` clustered in ``doc`` whose layers or embeddings have changed since.

    A document written before stamps were recorded (no ``episodes``) reports none.
    """
    old = doc.get("episodes") or {}
    ids = [e for e in episode_ids if e in old]
    now = episode_stamps(workspace, ids)
    return [e for e in ids if e in now and now[e] != old[e]]


def _stats(doc: dict[str, Any], t0: float, **extra: Any) -> dict[str, Any]:
    members = doc["members"]
    n_noise = sum(1 for m in members if m["cluster"] < 0)
    return {
        "n_layers": len(members),
        "n_clusters": len(doc["clusters"]),
        "n_noise": n_noise,
        "noise_fraction": round(n_noise / len(members), 4) if members else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
        **extra,
    }


# --------------------------------------------------------------------------- stage functions


def _reassign_noise(
    X: np.ndarray, labels: np.ndarray, cfg: ClusteringConfig, metric: IdentityMetric | None = None
) -> tuple[np.ndarray, int]:
    noise = labels < 0
    if not cfg.reassign_noise or not noise.any() or not (labels >= 0).any():
        return labels, 0
    if metric is not None:
        ids, _ = nearest_by_metric(X[noise], representatives(X, labels, cfg.seed), metric)
    else:
        ids, _ = nearest_centroid(X[noise], centroids_of(X, labels), cfg.reassign_max_distance)
    labels = labels.copy()
    labels[noise] = ids
    return labels, int((ids >= 0).sum())


def cluster_layers(workspace: Workspace, episode_ids: Sequence[str], cfg: ClusteringConfig) -> dict[str, Any]:
    """Cluster the character layers of episodes from scratch and write ``character_clusters/``.

    Args:
        workspace: the run workspace (layer manifests and embeddings must exist).
        episode_ids: episodes to include.
        cfg: clustering settings.

    Returns:
        Stats: ``n_layers``, ``n_clusters``, ``n_noise``, ``noise_fraction``, ``reassigned``,
        ``skipped`` (layers without an embedding), ``missing`` (layer files not found), ``seconds``.
    """
    t0 = time.perf_counter()
    layers = load_layers(workspace, episode_ids)
    cfg = resolve_config(cfg, layers.embedding)
    metric = identity_metric(layers.embedding)
    labels, probs = cluster_embeddings(layers.X, cfg, metric=metric)
    labels, reassigned = _reassign_noise(layers.X, labels, cfg, metric)
    labels = clear_of_review_ids(labels)
    members = [_member(r, c, p) for r, c, p in zip(layers.rows, labels, probs, strict=True)]
    doc = build_document(members, dict(zip(layers.ids, layers.X, strict=True)), layers.embedding, cfg)
    doc["episodes"] = episode_stamps(workspace, episode_ids)
    placed = write_cluster_tree(workspace, doc, cfg)
    return _stats(doc, t0, reassigned=reassigned, skipped=layers.skipped, missing=placed["missing"])


def assign_incremental(
    workspace: Workspace, new_episode_ids: Sequence[str], cfg: ClusteringConfig
) -> dict[str, Any]:
    """Add new episodes' layers to the existing clusters without renumbering them.

    A new layer joins the cluster whose centroid is nearest (cosine) if it is within
    ``cfg.reassign_max_distance``; its probability is ``1 - distance / bound``. Layers that
    match nothing are clustered among themselves (UMAP + HDBSCAN); their clusters get ids
    after the current maximum, the rest are noise. Layers already in clusters.json are left
    as they are, so re-running is harmless; but an episode of ``new_episode_ids`` whose layers
    or embeddings changed since it was clustered (:func:`changed_episodes`: its video was
    replaced, or it was layered again) has its old members taken out and its layers placed
    afresh. Without a clusters.json this is :func:`cluster_layers`.

    Returns:
        Stats as :func:`cluster_layers` plus ``joined`` (new layers placed in existing
        clusters), ``new_clusters`` and ``new_layers``.
    """
    t0 = time.perf_counter()
    doc = read_clusters(workspace)
    if doc is None:
        stats = cluster_layers(workspace, new_episode_ids, cfg)
        return {**stats, "joined": 0, "new_clusters": stats["n_clusters"], "new_layers": stats["n_layers"]}

    changed = set(changed_episodes(workspace, doc, new_episode_ids))
    if changed:
        doc = {**doc, "members": [m for m in doc["members"] if m["episode_id"] not in changed]}
    known = {m["layer_id"] for m in doc["members"]}
    new = load_layers(workspace, new_episode_ids)
    _check_same_embedding(doc, new.embedding, workspace)
    cfg = resolve_config(cfg, new.embedding)
    keep = [i for i, lid in enumerate(new.ids) if lid not in known]
    rows = [new.rows[i] for i in keep]
    X = new.X[keep] if keep else np.zeros((0, new.X.shape[1]), dtype=np.float32)

    metric = identity_metric(new.embedding)
    X_by_layer = _embeddings_of_members(workspace, doc["members"])
    if metric is not None:
        old_labels = np.array([m["cluster"] for m in doc["members"] if m["layer_id"] in X_by_layer])
        old_X = np.stack([X_by_layer[m["layer_id"]] for m in doc["members"] if m["layer_id"] in X_by_layer])
        targets: Any = representatives(old_X, old_labels, cfg.seed)
    elif changed:  # the stored centroids still hold the changed episodes' old layers
        kept = [m for m in doc["members"] if m["layer_id"] in X_by_layer and m["cluster"] >= 0]
        targets = centroids_of(
            np.stack([X_by_layer[m["layer_id"]] for m in kept]) if kept else X[:0],
            np.array([m["cluster"] for m in kept], dtype=np.int64),
        )
    else:
        targets = {c["id"]: np.asarray(c["centroid"], dtype=np.float32) for c in doc["clusters"]}
    ids, probs = _nearest(X, targets, cfg, metric)
    joined = int((ids >= 0).sum())

    unmatched = np.flatnonzero(ids < 0)
    n_new_clusters = 0
    if unmatched.size:
        sub_labels, sub_probs = cluster_embeddings(
            X[unmatched], cfg, allow_single_cluster=True, metric=metric
        )
        # HDBSCAN leaves the fringe of a lone cluster as noise; the centroid rule that placed
        # the other new layers applies to them as well.
        fringe = sub_labels < 0
        if fringe.any() and (sub_labels >= 0).any():
            sub_X, sub_l = X[unmatched], sub_labels
            new_targets = representatives(sub_X, sub_l, cfg.seed) if metric else centroids_of(sub_X, sub_l)
            sub_labels[fringe], sub_probs[fringe] = _nearest(sub_X[fringe], new_targets, cfg, metric)
        next_id = max([c["id"] for c in doc["clusters"]], default=-1) + 1
        ids[unmatched] = clear_of_review_ids(np.where(sub_labels >= 0, sub_labels + next_id, -1))
        probs[unmatched] = sub_probs
        n_new_clusters = int(sub_labels.max() + 1) if (sub_labels >= 0).any() else 0

    members = list(doc["members"]) + [_member(r, c, p) for r, c, p in zip(rows, ids, probs, strict=True)]
    X_by_layer.update(zip((r["layer_id"] for r in rows), X, strict=True))
    new_doc = build_document(members, X_by_layer, doc.get("embedding", new.embedding), cfg)
    new_doc["episodes"] = {**doc.get("episodes", {}), **episode_stamps(workspace, new_episode_ids)}
    placed = write_cluster_tree(workspace, new_doc, cfg)
    return _stats(
        new_doc,
        t0,
        changed_episodes=sorted(changed),
        joined=joined,
        new_clusters=n_new_clusters,
        new_layers=len(rows),
        reassigned=0,
        skipped=new.skipped,
        missing=placed["missing"],
    )


def _nearest(
    X: np.ndarray, targets: Mapping[int, np.ndarray], cfg: ClusteringConfig, metric: IdentityMetric | None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest cluster within the bound and ``1 - distance / bound`` as its probability.

    Targets are centroids (cosine, bound ``cfg.reassign_max_distance``) or, under an identity
    metric, each cluster's representative members (bound: the metric's threshold).
    """
    if metric is not None:
        ids, dist = nearest_by_metric(X, targets, metric)
        bound = metric.threshold
    else:
        ids, dist = nearest_centroid(X, targets, cfg.reassign_max_distance)
        bound = cfg.reassign_max_distance
    probs = np.where(ids >= 0, np.clip(1.0 - dist / bound, 0.0, 1.0), 0.0).astype(np.float32)
    return ids, probs


def _check_same_embedding(doc: dict[str, Any], embedding: Mapping[str, Any], workspace: Workspace) -> None:
    old = doc.get("embedding", {})
    if old.get("backend") != embedding.get("backend") or old.get("dim") != embedding.get("dim"):
        raise ConfigError(
            f"{clusters_file(workspace)} was built from {old} embeddings but the new episodes have {dict(embedding)}; "
            "re-embed them alike or run a full recluster"
        )


def _embeddings_of_members(
    workspace: Workspace, members: Iterable[Mapping[str, Any]]
) -> dict[str, np.ndarray]:
    episodes = list(dict.fromkeys(m["episode_id"] for m in members))
    layers = load_layers(workspace, episodes)
    return dict(zip(layers.ids, layers.X, strict=True))


def match_ids(old: Mapping[str, int], new_labels: Mapping[str, int]) -> dict[int, int]:
    """Map new cluster labels to old ids by maximum member overlap (Hungarian assignment).

    Args:
        old: layer_id -> old cluster id (noise ignored).
        new_labels: layer_id -> new label (noise ignored).

    Returns:
        new label -> final id. Matched labels take the old id; the others get ids after the
        largest old id, in order of decreasing size.
    """
    from scipy.optimize import linear_sum_assignment

    old_ids = sorted({c for c in old.values() if c >= 0})
    new_ids = sorted({c for c in new_labels.values() if c >= 0})
    mapping: dict[int, int] = {}
    if old_ids and new_ids:
        oi, ni = {c: k for k, c in enumerate(old_ids)}, {c: k for k, c in enumerate(new_ids)}
        overlap = np.zeros((len(old_ids), len(new_ids)), dtype=np.int64)
        for lid, n in new_labels.items():
            o = old.get(lid, -1)
            if n >= 0 and o >= 0:
                overlap[oi[o], ni[n]] += 1
        rows, cols = linear_sum_assignment(-overlap)
        for r, c in zip(rows, cols, strict=True):
            if overlap[r, c] > 0:
                mapping[new_ids[c]] = old_ids[r]
    sizes = Counter(c for c in new_labels.values() if c >= 0)
    next_id = max(old_ids, default=-1) + 1
    for label in sorted((c for c in new_ids if c not in mapping), key=lambda c: (-sizes[c], c)):
        mapping[label] = int(clear_of_review_ids(next_id))
        next_id += 1
    return mapping


def recluster(workspace: Workspace, episode_ids: Sequence[str], cfg: ClusteringConfig) -> dict[str, Any]:
    """Re-cluster all layers of ``episode_ids`` from scratch, keeping cluster ids stable.

    New clusters are matched to the previous clusters.json by shared members; a matched
    cluster keeps its old id, an unmatched one gets a new id after the largest old id, and an
    old cluster with no successor disappears (its id is not reused).

    Returns:
        Stats as :func:`cluster_layers` plus ``kept_ids`` and ``new_ids``.
    """
    t0 = time.perf_counter()
    doc = read_clusters(workspace)
    if doc is None:
        stats = cluster_layers(workspace, episode_ids, cfg)
        fresh = read_clusters(workspace) or {"clusters": []}
        return {**stats, "kept_ids": [], "new_ids": sorted(c["id"] for c in fresh["clusters"])}
    layers = load_layers(workspace, episode_ids)
    cfg = resolve_config(cfg, layers.embedding)
    metric = identity_metric(layers.embedding)
    labels, probs = cluster_embeddings(layers.X, cfg, metric=metric)
    labels, reassigned = _reassign_noise(layers.X, labels, cfg, metric)
    old = {m["layer_id"]: m["cluster"] for m in doc["members"]}
    mapping = match_ids(old, dict(zip(layers.ids, (int(c) for c in labels), strict=True)))
    final = np.array([mapping[int(c)] if c >= 0 else -1 for c in labels], dtype=np.int64)
    members = [_member(r, c, p) for r, c, p in zip(layers.rows, final, probs, strict=True)]
    new_doc = build_document(members, dict(zip(layers.ids, layers.X, strict=True)), layers.embedding, cfg)
    new_doc["episodes"] = episode_stamps(workspace, episode_ids)
    placed = write_cluster_tree(workspace, new_doc, cfg)
    old_ids = {c["id"] for c in doc["clusters"]}
    return _stats(
        new_doc,
        t0,
        reassigned=reassigned,
        skipped=layers.skipped,
        missing=placed["missing"],
        kept_ids=sorted(v for v in mapping.values() if v in old_ids),
        new_ids=sorted(v for v in mapping.values() if v not in old_ids),
    )


# --------------------------------------------------------------------------- quality


def evaluate_clusters(
    members: Iterable[Mapping[str, Any]], labels_by_layer: Mapping[str, int | None]
) -> dict[str, Any]:
    """Score clusters against ground truth.

    Members whose ``layer_id`` is not in ``labels_by_layer`` are ignored. Noise (-1) counts
    as one label of its own, and so does a ground-truth ``None`` (a layer that is no known
    character), so putting distinct characters into noise costs purity.

    Returns:
        ``ari`` (adjusted Rand index), ``purity`` (share of layers in the majority true
        label of their predicted cluster), ``n_clusters``, ``noise_fraction`` and ``n``.
    """
    from sklearn.metrics import adjusted_rand_score
    from sklearn.metrics.cluster import contingency_matrix

    pred, true = [], []
    for m in members:
        if m["layer_id"] in labels_by_layer:
            pred.append(int(m["cluster"]))
            t = labels_by_layer[m["layer_id"]]
            true.append("none" if t is None else str(t))
    if not pred:
        return {"ari": 0.0, "purity": 0.0, "n_clusters": 0, "noise_fraction": 0.0, "n": 0}
    cm = contingency_matrix(true, pred)
    return {
        "ari": round(float(adjusted_rand_score(true, pred)), 4),
        "purity": round(float(cm.max(axis=0).sum() / len(pred)), 4),
        "n_clusters": len({p for p in pred if p >= 0}),
        "noise_fraction": round(sum(p < 0 for p in pred) / len(pred), 4),
        "n": len(pred),
    }
