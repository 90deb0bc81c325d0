"""Reference naming: clusters take character names from a folder of reference images.

``refs/<Name>/`` holds 1-3 images of one character (more are used too). Each reference is
embedded with the backend the clusters were built from, and compared with each cluster's
representative members under the same identity distance clustering used: CCIP's own metric
and threshold for ``ccip`` embeddings, cosine distance otherwise. A cluster takes the name
(and the trigger word made from it) of the reference it matches best within the threshold;
names and clusters are paired one to one (Hungarian assignment on the distances).

The report says which clusters stayed unnamed, which references matched nothing, and every
ambiguity: a reference close to two clusters, a cluster close to two references, a reference
image that on its own points at another cluster. Each line names the files concerned.

References also seed clustering: a reference that matches no cluster collects the noise
layers that match it (and no other reference better); when there are at least
``min_seed_layers`` of them they become a new cluster with that name, so a rare character
with a reference is not lost in the noise. Ids of existing clusters never change.

Outputs: ``naming.json`` in the workspace (names and report), the names in
``selection.json`` when it exists (``yokai select`` also picks them up from naming.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from yokai_pipeline import clustering, fsio
from yokai_pipeline.config import ClusteringConfig, EmbeddingConfig, NamingConfig
from yokai_pipeline.errors import BadInputError, ConfigError
from yokai_pipeline.workspace import Workspace

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NAMING_FILE = "naming.json"


def read_references(refs_dir: str | Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Character name -> its image files, and problem lines for folders that cannot be used.

    Raises:
        BadInputError: the folder is missing or holds no reference image at all.
    """
    root = Path(refs_dir)
    if not root.is_dir():
        raise BadInputError(root, "reference folder not found")
    refs: dict[str, list[Path]] = {}
    problems: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if files:
            refs[folder.name] = files
        else:
            problems.append(f"{folder}: no reference image (expected 1-3 of {', '.join(IMAGE_SUFFIXES)})")
    if not refs:
        raise BadInputError(
            root, "holds no reference image: expected one folder per character name with 1-3 images"
        )
    return refs, problems


def embedding_config_for(doc: dict[str, Any], base: EmbeddingConfig) -> EmbeddingConfig:
    """The embedding settings that reproduce the clusters' embeddings (backend and model as recorded)."""
    rec = doc.get("embedding") or {}
    backend = rec.get("backend")
    if backend not in ("offline", "clip", "ccip"):
        raise ConfigError(
            f"clusters were built from {backend!r} embeddings; naming supports offline, clip and ccip"
        )
    update: dict[str, Any] = {"backend": backend}
    if backend == "clip" and rec.get("model"):
        update["model"] = rec["model"]
    if backend == "ccip":
        ccip = rec.get("ccip") or {}
        update.update(ccip_model=ccip.get("source", base.ccip_model), ccip_threshold=ccip.get("threshold"))
    return base.model_copy(update=update)


class _Space:
    """Distances between feature rows as clustering measured them (identity metric or cosine)."""

    def __init__(self, embedding: dict[str, Any], max_distance: float | None, cosine_default: float):
        self.metric = clustering.identity_metric(embedding)
        default = self.metric.threshold if self.metric is not None else cosine_default
        self.threshold = float(default if max_distance is None else max_distance)

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.metric is not None:
            return self.metric.differences(a, b)
        return 1.0 - clustering.normalise_rows(a) @ clustering.normalise_rows(b).T


def _embed_references(
    refs: dict[str, list[Path]], cfg: EmbeddingConfig, problems: list[str]
) -> dict[str, tuple[list[Path], np.ndarray]]:
    from yokai_pipeline.embedding import get_embedder

    embedder = get_embedder(cfg)
    files = [f for fs in refs.values() for f in fs]
    errors: list[tuple[int, str]] = []
    X = embedder.embed(files, errors=errors)
    bad = {i for i, _ in errors}
    problems += [f"unreadable reference image {msg}" for _, msg in errors]
    out: dict[str, tuple[list[Path], np.ndarray]] = {}
    k = 0
    for name, fs in refs.items():
        idx = [i for i in range(k, k + len(fs)) if i not in bad]
        k += len(fs)
        if idx:
            out[name] = ([files[i] for i in idx], X[idx])
        else:
            problems.append(f"{fs[0].parent}: none of its images could be read; {name!r} is not used")
    return out


def _assign(D: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one (cluster row, reference column) pairs within the threshold, minimum total distance."""
    from scipy.optimize import linear_sum_assignment

    if D.size == 0:
        return []
    big = threshold * 10 + float(np.nanmax(D)) + 1.0
    rows, cols = linear_sum_assignment(np.where(D <= threshold, D, big))
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if D[r, c] <= threshold]


def name_clusters(
    workspace: Workspace,
    refs_dir: str | Path,
    cfg: NamingConfig | None = None,
    embedding_cfg: EmbeddingConfig | None = None,
    clustering_cfg: ClusteringConfig | None = None,
) -> dict[str, Any]:
    """Name clusters after reference images; write ``naming.json`` (and ``selection.json`` names).

    Args:
        workspace: a workspace with ``character_clusters/clusters.json`` and its embeddings.
        refs_dir: one folder per character name with 1-3 images.
        cfg: threshold, seeding.
        embedding_cfg: device / batch settings for embedding the references (the backend and
            model are those the clusters were built from).
        clustering_cfg: how a seeded cluster's folder is placed (link mode).

    Returns:
        The naming document (see :func:`naming_report_lines` for its report).

    Raises:
        BadInputError: no clusters.json, or no usable reference image at all.
    """
    cfg = cfg or NamingConfig()
    clustering_cfg = clustering_cfg or ClusteringConfig()
    doc = clustering.read_clusters(workspace)
    if doc is None:
        raise BadInputError(clustering.clusters_file(workspace), "not found; run clustering first")
    refs, problems = read_references(refs_dir)
    emb_cfg = embedding_config_for(doc, embedding_cfg or EmbeddingConfig())
    space = _Space(doc["embedding"], cfg.max_distance, cfg.cosine_max_distance)
    embedded = _embed_references(refs, emb_cfg, problems)
    if not embedded:
        raise BadInputError(refs_dir, "none of the reference images could be read")

    X_by_layer = clustering._embeddings_of_members(workspace, doc["members"])
    reps = _representatives(doc, X_by_layer, cfg.representatives)
    names = list(embedded)
    cids = sorted(reps)
    D = np.array([[float(space.distances(embedded[n][1], reps[c]).mean()) for n in names] for c in cids])
    D = D.reshape(len(cids), len(names))
    pairs = _assign(D, space.threshold)
    named = {cids[r]: names[c] for r, c in pairs}
    report = _report(D, cids, names, named, embedded, reps, space)
    seeded = (
        _seed(workspace, doc, X_by_layer, embedded, named, space, cfg, clustering_cfg)
        if cfg.seed_clusters
        else []
    )
    for s in seeded:
        named[s["cluster"]] = s["name"]
    result = {
        "version": 1,
        "references": {n: [str(f) for f in embedded[n][0]] for n in names},
        "threshold": space.threshold,
        "distance": "ccip" if space.metric is not None else "cosine",
        "names": {str(c): n for c, n in sorted(named.items())},
        "seeded": seeded,
        "problems": problems,
        **report,
    }
    fsio.atomic_write_json(workspace.root / NAMING_FILE, result)
    _write_selection_names(workspace, named)
    return result


def _representatives(doc: dict[str, Any], X_by_layer: dict[str, np.ndarray], k: int) -> dict[int, np.ndarray]:
    members = [m for m in doc["members"] if m["cluster"] >= 0 and m["layer_id"] in X_by_layer]
    if not members:
        return {}
    X = np.stack([X_by_layer[m["layer_id"]] for m in members])
    labels = np.array([m["cluster"] for m in members])
    return clustering.representatives(X, labels, k=k)


def _report(
    D: np.ndarray,
    cids: list[int],
    names: list[str],
    named: dict[int, str],
    embedded: dict[str, tuple[list[Path], np.ndarray]],
    reps: dict[int, np.ndarray],
    space: _Space,
) -> dict[str, Any]:
    """Unmatched clusters and references, and the ambiguous matches (with the files concerned)."""
    t = space.threshold
    within = D <= t
    ambiguous: list[dict[str, Any]] = []
    for c, name in enumerate(names):
        hits = [cids[r] for r in np.flatnonzero(within[:, c])]
        if len(hits) > 1:
            ambiguous.append(
                {
                    "reference": name,
                    "files": [str(f) for f in embedded[name][0]],
                    "clusters": hits,
                    "why": "reference matches several clusters",
                }
            )
    for r, cid in enumerate(cids):
        hits = [names[c] for c in np.flatnonzero(within[r])]
        if len(hits) > 1:
            ambiguous.append(
                {"cluster": cid, "references": hits, "why": "cluster matches several references"}
            )
    by_name = {n: c for c, n in named.items()}
    for name, (files, X) in embedded.items():
        if not cids:
            break
        per_file = np.stack([space.distances(X, reps[c]).mean(axis=1) for c in cids], axis=1)
        for f, row in zip(files, per_file, strict=True):
            best = int(np.argmin(row))
            if row[best] <= t and cids[best] != by_name.get(name):
                ambiguous.append(
                    {
                        "reference": name,
                        "files": [str(f)],
                        "clusters": [cids[best]],
                        "why": "this image alone matches another cluster than its character",
                    }
                )
    return {
        "distances": {
            str(cid): {n: round(float(D[r, c]), 4) for c, n in enumerate(names)} for r, cid in enumerate(cids)
        },
        "unmatched_clusters": [c for c in cids if c not in named],
        "unmatched_references": [n for n in names if n not in by_name],
        "ambiguous": ambiguous,
    }


def _seed(
    workspace: Workspace,
    doc: dict[str, Any],
    X_by_layer: dict[str, np.ndarray],
    embedded: dict[str, tuple[list[Path], np.ndarray]],
    named: dict[int, str],
    space: _Space,
    cfg: NamingConfig,
    clustering_cfg: ClusteringConfig,
) -> list[dict[str, Any]]:
    """New clusters from noise layers that match a reference which matched no cluster."""
    free = [n for n in embedded if n not in named.values()]
    noise = [m for m in doc["members"] if m["cluster"] < 0 and m["layer_id"] in X_by_layer]
    if not free or not noise:
        return []
    Xn = np.stack([X_by_layer[m["layer_id"]] for m in noise])
    all_names = list(embedded)
    # Distance of each noise layer to every reference: it joins the nearest, if within the threshold.
    Dn = np.stack([space.distances(Xn, embedded[n][1]).mean(axis=1) for n in all_names], axis=1)
    nearest = Dn.argmin(axis=1)
    next_id = max((c["id"] for c in doc["clusters"]), default=-1) + 1
    seeded = []
    for name in free:
        j = all_names.index(name)
        take = [i for i in range(len(noise)) if nearest[i] == j and Dn[i, j] <= space.threshold]
        if len(take) < cfg.min_seed_layers:
            continue
        for i in take:
            noise[i]["cluster"] = next_id
            noise[i]["probability"] = round(float(np.clip(1.0 - Dn[i, j] / space.threshold, 0.0, 1.0)), 4)
            noise[i]["cluster_path"] = (
                f"character_clusters/{clustering.folder_name(next_id)}/{Path(noise[i]['path']).name}"
            )
        seeded.append({"cluster": next_id, "name": name, "layers": len(take)})
        next_id += 1
    if seeded:
        new_doc = clustering.build_document(doc["members"], X_by_layer, doc["embedding"], clustering_cfg)
        new_doc["clustering"] = doc.get("clustering", new_doc["clustering"])
        new_doc["episodes"] = doc.get("episodes", {})  # the same layers: their stamps hold
        clustering.write_cluster_tree(workspace, new_doc, clustering_cfg)
    return seeded


def _write_selection_names(workspace: Workspace, named: dict[int, str]) -> None:
    """Put the names (and trigger words) into an existing selection.json, validated as a whole."""
    from yokai_pipeline.selection import character_name, read_selection, trigger_word, write_selection

    path = workspace.root / "selection.json"
    if not path.is_file() or not named:
        return
    sel = read_selection(path)
    for ch in sel["characters"]:
        if ch["cluster"] in named:
            ch["name"] = character_name(named[ch["cluster"]], ch["cluster"])
            ch["trigger"] = trigger_word(named[ch["cluster"]], ch["cluster"])
    write_selection(path, sel)


def read_names(workspace: Workspace) -> dict[str, str]:
    """Cluster id (string) -> name from ``naming.json``; empty when there is none."""
    path = workspace.root / NAMING_FILE
    if not path.is_file():
        return {}
    try:
        return dict(fsio.read_json(path).get("names", {}))
    except (OSError, ValueError, AttributeError) as exc:
        raise BadInputError(path, f"not a naming.json ({exc})") from exc


def naming_report_lines(result: dict[str, Any]) -> list[str]:
    """The naming result as lines for a person: names, unmatched, ambiguous, problems."""
    lines = [f"cluster {c:>4}  -> {n}" for c, n in ((int(k), v) for k, v in result["names"].items())]
    lines += [
        f"seeded cluster {s['cluster']} for {s['name']!r} from {s['layers']} noise layers"
        for s in result["seeded"]
    ]
    if result["unmatched_clusters"]:
        lines.append(
            f"unnamed clusters (no reference within {result['threshold']:.3g}): {result['unmatched_clusters']}"
        )
    for n in result["unmatched_references"]:
        if not any(s["name"] == n for s in result["seeded"]):
            lines.append(f"reference {n!r} matched no cluster ({', '.join(result['references'][n])})")
    for a in result["ambiguous"]:
        if "cluster" in a:
            lines.append(f"ambiguous: cluster {a['cluster']} matches references {a['references']}")
        else:
            lines.append(f"ambiguous: {a['why']} {a['clusters']}: {', '.join(a['files'])}")
    lines += [f"problem: {p}" for p in result["problems"]]
    return lines
