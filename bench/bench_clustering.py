"""Clustering time at 1k / 10k / 100k 512-d embeddings, and UMAP's numba cold vs warm start.

The embeddings are random but clustered like CLIP features of an anime series: cluster
sizes follow a Zipf law (a few main characters, a long tail), each cluster a Gaussian around
a random unit centre (cosine ~0.8 to its centre), plus 5% uniform noise points. Timed:
:func:`yokai_pipeline.clustering.cluster_embeddings` (PCA -> UMAP -> HDBSCAN -> merge) with
the settings the pipeline uses for CLIP embeddings; ARI against the generating labels is
printed so a speed fix that wrecks quality shows. Examples::

    python bench/bench_clustering.py                         # 1k, 10k, 100k
    python bench/bench_clustering.py --sizes 1000 --numba    # + cold/warm numba start
    python bench/bench_clustering.py --sizes 100000 --pca-dim 0   # UMAP on raw 512-d
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clustered_embeddings(n: int, dim: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit rows in Zipf-sized Gaussian clusters (+5% noise) and their labels (-1 = noise)."""
    rng = np.random.default_rng(seed)
    k = max(8, n // 250)
    weights = 1.0 / np.arange(1, k + 1) ** 0.9
    n_noise = n // 20
    sizes = np.maximum(6, np.round(weights / weights.sum() * (n - n_noise))).astype(int)
    sizes[0] += n - n_noise - sizes.sum()
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sigma = 0.75 / np.sqrt(dim)  # per-axis spread: cosine to the centre about 0.8
    X = np.concatenate(
        [c + rng.normal(scale=sigma, size=(s, dim)) for c, s in zip(centres, sizes, strict=True)]
    )
    labels = np.repeat(np.arange(k), sizes)
    X = np.concatenate([X, rng.normal(size=(n_noise, dim))])
    labels = np.concatenate([labels, np.full(n_noise, -1)])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    order = rng.permutation(n)
    return X[order].astype(np.float32), labels[order]


def bench_size(n: int, cfg) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from yokai_pipeline.clustering import cluster_embeddings, resolve_config

    X, truth = clustered_embeddings(n)
    cfg = resolve_config(cfg, {"backend": "clip"})
    t0 = time.perf_counter()
    labels, _ = cluster_embeddings(X, cfg)
    seconds = time.perf_counter() - t0
    return {
        "n": n,
        "seconds": round(seconds, 1),
        "clusters_true": int(truth.max() + 1),
        "clusters_found": int(labels.max() + 1),
        "noise_fraction": round(float((labels < 0).mean()), 3),
        "ari": round(float(adjusted_rand_score(truth, labels)), 3),
    }


_NUMBA_PROBE = """
import time, numpy as np
t0 = time.perf_counter()
from yokai_pipeline.clustering import _import_umap, cluster_embeddings
from yokai_pipeline.config import ClusteringConfig
_import_umap()
t1 = time.perf_counter()
X = np.random.default_rng(0).normal(size=(300, 64)).astype(np.float32)
cluster_embeddings(X, ClusteringConfig(pca_dim=0))
t2 = time.perf_counter()
X = np.random.default_rng(0).normal(size=(300, 512)).astype(np.float32)
cluster_embeddings(X, ClusteringConfig())
t3 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {t3 - t2:.2f}")
"""


def bench_numba_start() -> list[dict]:
    """Import + first fits in fresh processes: empty numba cache, then the filled cache."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        for state in ("cold (empty cache)", "warm (cache filled)", "warm again"):
            out = subprocess.run(
                [sys.executable, "-c", _NUMBA_PROBE], env=env, capture_output=True, text=True, check=True
            ).stdout.split()
            imp, fit_cos, fit_pca = (float(v) for v in out[-3:])
            rows.append(
                {"process": state, "import_s": imp, "first_fit_cosine_s": fit_cos, "first_fit_pca_s": fit_pca}
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--pca-dim", type=int, default=None, help="override ClusteringConfig.pca_dim")
    ap.add_argument("--n-epochs", type=int, default=None, help="override ClusteringConfig.n_epochs")
    ap.add_argument("--numba", action="store_true", help="also time numba cold vs warm process start")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from yokai_pipeline.clustering import _import_umap
    from yokai_pipeline.config import ClusteringConfig

    overrides = {
        k: v for k, v in {"pca_dim": args.pca_dim, "n_epochs": args.n_epochs}.items() if v is not None
    }
    cfg = ClusteringConfig(**overrides)
    console = Console()
    result: dict = {"config": cfg.model_dump(mode="json"), "cpus": os.cpu_count(), "sizes": []}
    if args.numba:
        result["numba"] = bench_numba_start()
        t = Table(title="UMAP numba start-up (fresh processes)")
        for col in ("process", "import_s", "first_fit_cosine_s", "first_fit_pca_s"):
            t.add_column(col)
        for r in result["numba"]:
            t.add_row(*(str(r[c]) for c in ("process", "import_s", "first_fit_cosine_s", "first_fit_pca_s")))
        console.print(t)

    _import_umap()  # compile outside the timed runs
    t = Table(title=f"cluster_embeddings, 512-d, pca_dim={cfg.pca_dim}, n_epochs={cfg.n_epochs}")
    for col in ("n", "seconds", "clusters_true", "clusters_found", "noise_fraction", "ari"):
        t.add_column(col)
    for n in args.sizes:
        r = bench_size(n, cfg)
        result["sizes"].append(r)
        console.print(r)
        t.add_row(
            *(str(r[c]) for c in ("n", "seconds", "clusters_true", "clusters_found", "noise_fraction", "ari"))
        )
    console.print(t)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
