"""Background dedup (guide step 8, CLIP similarity >= 0.95) at 100k embeddings, and the old loop.

Two data sets of unit rows (CLIP ViT-B-32 width, 512-d by default):

* ``distinct``: uniform random directions. Nothing is a duplicate, so every row is kept and
  compared with every kept row: the worst case (n^2 / 2 dot products).
* ``pans``: what an anime series gives, near-copies of fewer scenes (a pan or a repeated shot
  per scene, cosine ~0.98 between copies) plus 10% distinct frames.

Timed: :func:`yokai_pipeline.backgrounds.dedup_embeddings` (above 5k rows: LSH candidate pairs,
each checked with the exact cosine), the exact blocked all-pairs path on the same rows (its
result is what ``same_as_exact`` compares against; skip it with ``--no-exact``, it is minutes
at 100k on two cores), then the farthest-point sampling of ``max_backgrounds`` the stage runs
next; the row-by-row loop it all replaced (``np.vstack`` per kept row) is timed on
``--reference-n`` rows. numpy only, no prefect. Examples::

    python bench/bench_backgrounds.py                       # 100k, both data sets
    python bench/bench_backgrounds.py --n 20000 --dim 768   # ViT-L-14 width
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def distinct(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32))


def pans(n: int, dim: int, scenes: int, seed: int = 0) -> np.ndarray:
    """Near-copies of ``scenes`` scene directions (cosine 0.99, so ~0.98 to each other) + 10% distinct rows."""
    rng = np.random.default_rng(seed)
    centres = distinct(scenes, dim, seed + 1)
    n_dup = n - n // 10
    noise = rng.normal(size=(n_dup, dim)).astype(np.float32)
    # noise scale s gives cosine 1 / sqrt(1 + s^2 * dim) to the centre: 0.99 here
    s = np.sqrt((1 / 0.99**2 - 1) / dim)
    near = unit(centres[rng.integers(0, scenes, size=n_dup)] + s * noise)
    rows = np.concatenate([near, distinct(n - n_dup, dim, seed + 2)])
    return rows[rng.permutation(n)]


def old_loop(emb: np.ndarray, threshold: float) -> list[int]:
    """The row-by-row dedup this replaced (kept here only as the reference being measured)."""
    kept: list[int] = []
    kept_mat = np.zeros((0, emb.shape[1]), dtype=emb.dtype)
    for i, v in enumerate(emb):
        if len(kept) and float(np.max(kept_mat @ v)) >= threshold:
            continue
        kept.append(i)
        kept_mat = np.vstack([kept_mat, v[None]])
    return kept


def main() -> None:
    from yokai_pipeline.backgrounds import dedup_embeddings, dedup_exact, farthest_point_sampling

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--scenes", type=int, default=20_000)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--max-backgrounds", type=int, default=500)
    ap.add_argument("--reference-n", type=int, default=2_000)
    ap.add_argument("--no-exact", action="store_true", help="skip the exact all-pairs comparison")
    args = ap.parse_args()

    for name, emb in (
        ("distinct", distinct(args.n, args.dim)),
        ("pans", pans(args.n, args.dim, args.scenes)),
    ):
        t0 = time.perf_counter()
        kept = dedup_embeddings(emb, args.threshold)
        row = {"data": name, "n": args.n, "dim": args.dim, "kept": len(kept)}
        row["dedup_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        farthest_point_sampling(emb[kept], args.max_backgrounds)
        row["fps_s"] = round(time.perf_counter() - t0, 2)
        if not args.no_exact:
            t0 = time.perf_counter()
            row["same_as_exact"] = dedup_exact(emb, args.threshold) == kept
            row["exact_s"] = round(time.perf_counter() - t0, 2)
        ref = emb[: args.reference_n]
        t0 = time.perf_counter()
        slow = old_loop(ref, args.threshold)
        row.update(reference_n=len(ref), old_loop_s=round(time.perf_counter() - t0, 2))
        row["old_loop_agrees"] = slow == dedup_embeddings(ref, args.threshold)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
