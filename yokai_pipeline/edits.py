"""Review edits: an append-only log of corrections to the clusters, and how they are applied.

A person reviewing the clusters (``yokai review``) merges, splits, moves, excludes and names
them. Each correction is one JSON line in ``review/edits.jsonl``::

    {"id": "3f2a...", "seq": 4, "who": "ana", "when": "2026-12-01T09:30:00Z", "op": "merge",
     "clusters": [2, 7], "into": 2}

The clustering output (``character_clusters/``) is never rewritten: :func:`replay` folds the
log over it into a :class:`ReviewState`, and :func:`write_reviewed_clusters` writes the
corrected tree ``reviewed_clusters/`` (same format as ``character_clusters/``) that analysis,
selection and augmentation read. Because edits name cluster ids and layer ids, and clustering
keeps ids stable when episodes join, replaying the same log over a grown clusters.json keeps
every edit: new layers of a merged-away cluster land in the merged one.

Operations (fields beside id/seq/who/when/op):

- ``merge``: ``clusters`` (>= 2 live ids), ``into`` (one of them).
- ``split``: ``clusters`` ([source]), ``layers``, ``new_cluster`` (allocated: ids from
  :data:`SPLIT_ID_BASE` on, never reused, so they cannot meet an id clustering hands out).
- ``move``: ``layers``, ``to`` (a live id); ``clusters`` = where they came from.
- ``exclude_images``: ``layers`` (not a character). ``exclude_cluster``: ``clusters`` ([id]).
- ``name``: ``clusters`` ([id]) and any of ``name`` (display), ``trigger``, ``type``.
- ``train``: ``clusters`` ([id]), ``train`` (bool). ``tier``: ``clusters`` ([id]), ``tier``.
- ``undo``: ``target`` (an earlier edit's id, not undone yet).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yokai_pipeline import fsio
from yokai_pipeline.clustering import REVIEW_IDS
from yokai_pipeline.errors import BadInputError, YokaiError
from yokai_pipeline.workspace import Workspace

LOG_VERSION = 1
SPLIT_ID_BASE = REVIEW_IDS.start  # clustering never gives these ids (clustering.clear_of_review_ids)
NOISE = -1
TIERS = ("S", "A", "B", "C", "D")
TYPES = ("human", "yokai", "unknown")
OPS = ("merge", "split", "move", "exclude_images", "exclude_cluster", "name", "train", "tier", "undo")
MAX_TEXT = 80


class EditError(YokaiError):
    """An edit that does not fit the current clusters (unknown id, bad field); nothing is written."""


# --------------------------------------------------------------------------- the log


def edit_log(workspace: Workspace) -> Path:
    return workspace.root / "review" / "edits.jsonl"


def read_edits(workspace: Workspace) -> list[dict[str, Any]]:
    """Every edit in the log, in order ([] without a log); raises BadInputError on a bad line."""
    path = edit_log(workspace)
    if not path.is_file():
        return []
    try:
        rows = fsio.read_jsonl(path)
    except ValueError as exc:
        raise BadInputError(path, f"not a JSON-lines edit log: {exc}") from exc
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or row.get("op") not in OPS or not isinstance(row.get("id"), str):
            raise BadInputError(path, f"line {i + 1} is not an edit (needs id and op in {', '.join(OPS)})")
    return rows


def append_edit(workspace: Workspace, edit: Mapping[str, Any], who: str | None = None) -> dict[str, Any]:
    """Validate ``edit`` against the current state and append it to the log atomically.

    The log is rewritten whole through a temporary file under the workspace's review lock,
    so a crash leaves either the old or the new log, never half a line.

    Args:
        workspace: the run workspace (needs character_clusters/clusters.json).
        edit: ``{"op": ..., ...}`` as in the module docstring (id/seq/who/when are filled in).
        who: the reviewer (default: the OS user).

    Returns:
        The record as written.

    Raises:
        EditError: the edit names an unknown or dead cluster or layer, or a field is invalid.
    """
    with fsio.file_lock(workspace.root / ".locks" / "review.lock"):
        edits = read_edits(workspace)
        state = replay(load_clusters_doc(workspace), edits)
        record = normalise_edit(state, dict(edit), edits)
        record.update(
            id=uuid.uuid4().hex,
            seq=len(edits) + 1,
            who=str(who or _user())[:MAX_TEXT],
            when=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            version=LOG_VERSION,
        )
        fsio.write_jsonl(edit_log(workspace), [*edits, record])
    return record


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def load_clusters_doc(workspace: Workspace) -> dict[str, Any]:
    """The clustering output the edits apply to; BadInputError when there is none."""
    from yokai_pipeline import clustering

    doc = clustering.read_clusters(workspace)
    if doc is None:
        raise BadInputError(clustering.clusters_file(workspace), "no clusters yet: run the pipeline first")
    return doc


# --------------------------------------------------------------------------- state


@dataclass
class ReviewState:
    """The clusters as the edits make them.

    ``assignment`` maps every layer id to its cluster (NOISE for noise, None when excluded);
    ``attrs`` holds per-cluster name / trigger / type / train / tier set by edits.
    """

    members: dict[str, dict[str, Any]]
    original: dict[str, int]
    alias: dict[int, int] = field(default_factory=dict)
    layer_to: dict[str, int | None] = field(default_factory=dict)
    excluded_clusters: set[int] = field(default_factory=set)
    created: set[int] = field(default_factory=set)
    attrs: dict[int, dict[str, Any]] = field(default_factory=dict)
    known_ids: set[int] = field(default_factory=set)
    applied: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    splits: int = 0

    def resolve(self, cid: int) -> int:
        seen = set()
        while cid in self.alias and cid not in seen:
            seen.add(cid)
            cid = self.alias[cid]
        return cid

    def cluster_of(self, layer_id: str) -> int | None:
        cid = self.layer_to.get(layer_id, self.original[layer_id])
        if cid is None:
            return None
        cid = self.resolve(cid)
        return None if cid in self.excluded_clusters else cid

    def groups(self) -> dict[int, list[str]]:
        """Cluster id -> layer ids (noise under NOISE), excluded layers left out."""
        out: dict[int, list[str]] = {}
        for lid in self.members:
            cid = self.cluster_of(lid)
            if cid is not None:
                out.setdefault(cid, []).append(lid)
        return out

    def live_ids(self) -> set[int]:
        """Clusters a new edit may name: known, not merged away, not excluded."""
        return {c for c in self.known_ids if self.resolve(c) == c and c not in self.excluded_clusters}

    def excluded_layers(self) -> list[str]:
        return [lid for lid in self.members if self.cluster_of(lid) is None]


def replay(doc: Mapping[str, Any], edits: Iterable[Mapping[str, Any]]) -> ReviewState:
    """Fold the edit log over a clusters document.

    Undone edits are left out. An edit that no longer fits (a full re-cluster dropped its
    cluster) is skipped and listed in ``state.skipped``; the others still apply.
    """
    members = {m["layer_id"]: m for m in doc["members"]}
    state = ReviewState(members=members, original={k: int(m["cluster"]) for k, m in members.items()})
    state.known_ids = {int(c["id"]) for c in doc["clusters"]}
    edits = list(edits)
    undone = {e.get("target") for e in edits if e.get("op") == "undo"}
    for e in edits:
        if e.get("op") == "split":
            state.splits += 1  # allocated ids are never reused, even when the split is undone
        if e.get("op") == "undo" or e.get("id") in undone:
            continue
        try:
            _check(state, e)
            _apply(state, e)
            state.applied.append(dict(e))
        except EditError as exc:
            state.skipped.append({"id": e.get("id"), "op": e.get("op"), "reason": str(exc)})
    return state


def _apply(state: ReviewState, e: Mapping[str, Any]) -> None:
    op = e["op"]
    if op == "merge":
        for cid in e["clusters"]:
            if cid != e["into"]:
                state.alias[cid] = e["into"]
    elif op in ("split", "move"):
        target = e["new_cluster"] if op == "split" else e["to"]
        if op == "split":
            state.created.add(target)
            state.known_ids.add(target)
        for lid in e["layers"]:
            state.layer_to[lid] = target
    elif op == "exclude_images":
        for lid in e["layers"]:
            state.layer_to[lid] = None
    elif op == "exclude_cluster":
        state.excluded_clusters.add(e["clusters"][0])
    else:  # name / train / tier: attributes of one cluster
        keys = {"name": ("name", "trigger", "type"), "train": ("train",), "tier": ("tier",)}[op]
        attrs = state.attrs.setdefault(e["clusters"][0], {})
        attrs.update({k: e[k] for k in keys if k in e})


def _check(state: ReviewState, e: Mapping[str, Any]) -> None:
    """Raise EditError unless ``e`` (a normalised record) fits ``state`` as it is now."""
    live = state.live_ids()
    layer_op = e["op"] in ("split", "move", "exclude_images")
    named = [c for c in e.get("clusters", []) if c != NOISE or not layer_op]
    for cid in named:
        if cid not in live:
            raise EditError(f"cluster {cid} is not a live cluster (merged away, excluded or unknown)")
    if e["op"] == "move" and e["to"] not in live:
        raise EditError(f"cluster {e['to']} is not a live cluster to move into")
    for lid in e.get("layers", []):
        if lid not in state.members:
            raise EditError(f"layer {lid!r} is not in the clusters")


def follow_splits(state: ReviewState, vectors: Mapping[str, Any]) -> int:
    """Layers of episodes that joined after a split go to the split-off cluster when nearer.

    A split says "these images are another character". Clustering does not know that cluster,
    so a new episode's images of it land in the source cluster; each such layer (one no edit
    names) moves to the split-off cluster when its embedding is nearer (cosine) to that
    cluster's centroid than to the rest of the source's. Updates ``state`` in place.

    Returns:
        How many layers moved.
    """
    import numpy as np

    moved = 0
    for e in state.applied:
        sources = [c for c in e.get("clusters", []) if c != NOISE]
        if e["op"] != "split" or "episodes" not in e or len(sources) != 1:
            continue
        source, target = state.resolve(sources[0]), state.resolve(e["new_cluster"])
        groups = state.groups()
        if source == target or source not in groups or target not in groups:
            continue
        seen = set(e["episodes"])
        fresh = [
            lid
            for lid in groups[source]
            if lid not in state.layer_to
            and str(state.members[lid].get("episode_id")) not in seen
            and lid in vectors
        ]
        rest = [vectors[lid] for lid in groups[source] if lid not in fresh and lid in vectors]
        split = [vectors[lid] for lid in groups[target] if lid in vectors]
        if not fresh or not rest or not split:
            continue
        cents = [np.mean(rows, axis=0) for rows in (rest, split)]
        cents = [c / (np.linalg.norm(c) or 1.0) for c in cents]
        for lid in fresh:
            v = np.asarray(vectors[lid], dtype=np.float64)
            v = v / (np.linalg.norm(v) or 1.0)
            if float(v @ cents[1]) > float(v @ cents[0]):
                state.layer_to[lid] = target
                moved += 1
    return moved


# --------------------------------------------------------------------------- validation of new edits


def normalise_edit(
    state: ReviewState, edit: dict[str, Any], edits: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Check a requested edit against ``state`` and return the record to log (typed fields only).

    Raises:
        EditError: unknown op, cluster or layer; a field of the wrong type or out of range.
    """
    op = edit.get("op")
    if op not in OPS:
        raise EditError(f"unknown edit op {op!r} (one of {', '.join(OPS)})")
    if op == "undo":
        return _normalise_undo(edit, edits or [])
    out: dict[str, Any] = {"op": op, "clusters": _ids(edit.get("clusters", []))}
    if op in ("split", "move", "exclude_images"):
        out["layers"] = _layers(state, edit.get("layers"))
        out["clusters"] = sorted({state.cluster_of(lid) for lid in out["layers"]} - {None})  # type: ignore[type-var]
    if op == "merge":
        if len(set(out["clusters"])) < 2:
            raise EditError("merge needs at least two clusters")
        out["into"] = _id(edit.get("into", min(out["clusters"])))
        if out["into"] not in out["clusters"]:
            raise EditError(f"merge target {out['into']} is not one of the merged clusters")
    elif op == "split":
        out["new_cluster"] = SPLIT_ID_BASE + state.splits
        if out["new_cluster"] not in REVIEW_IDS:
            raise EditError(f"too many splits: ids {REVIEW_IDS.start}-{REVIEW_IDS.stop - 1} are all used")
        # the episodes this split saw: layers of later episodes may follow it (follow_splits)
        out["episodes"] = sorted({str(m.get("episode_id")) for m in state.members.values()})
    elif op == "move":
        out["to"] = _id(edit.get("to"))
        if out["to"] == NOISE:
            raise EditError("move target must be a cluster, not noise")
    elif op in ("exclude_cluster", "name", "train", "tier"):
        if len(out["clusters"]) != 1 or out["clusters"][0] == NOISE:
            raise EditError(f"{op} takes exactly one cluster id")
        out.update(_attributes(op, edit))
    _check(state, out)
    return out


def _normalise_undo(edit: Mapping[str, Any], edits: list[dict[str, Any]]) -> dict[str, Any]:
    target = edit.get("target")
    undone = {e.get("target") for e in edits if e.get("op") == "undo"}
    ids = {e["id"] for e in edits if e.get("op") != "undo"}
    if not isinstance(target, str) or target not in ids or target in undone:
        raise EditError(f"undo target {target!r} is not an edit that can be undone")
    return {"op": "undo", "target": target, "clusters": []}


def _attributes(op: str, edit: Mapping[str, Any]) -> dict[str, Any]:
    if op == "train":
        if not isinstance(edit.get("train"), bool):
            raise EditError("train must be true or false")
        return {"train": edit["train"]}
    if op == "tier":
        if edit.get("tier") not in TIERS:
            raise EditError(f"tier must be one of {', '.join(TIERS)}")
        return {"tier": edit["tier"]}
    if op != "name":
        return {}
    out: dict[str, Any] = {}
    for key in ("name", "trigger"):
        value = edit.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value:
            raise EditError(f"{key} must be text of at most {MAX_TEXT} characters")
        out[key] = value.strip()
    if edit.get("type") is not None:
        if edit["type"] not in TYPES:
            raise EditError(f"type must be one of {', '.join(TYPES)}")
        out["type"] = edit["type"]
    if not out:
        raise EditError("name needs a name, trigger or type")
    return out


def _id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EditError(f"cluster id {value!r} is not an integer")
    return value


def _ids(values: Any) -> list[int]:
    if not isinstance(values, list) or len(values) > 10_000:
        raise EditError("clusters must be a list of cluster ids")
    return sorted({_id(v) for v in values})


def _layers(state: ReviewState, values: Any) -> list[str]:
    if not isinstance(values, list) or not values or len(values) > 100_000:
        raise EditError("layers must be a non-empty list of layer ids")
    out = []
    for v in values:
        if not isinstance(v, str) or v not in state.members:
            raise EditError(f"layer {v!r} is not in the clusters")
        out.append(v)
    return sorted(set(out))


# --------------------------------------------------------------------------- applying the edits

REVIEWED_FOLDER = "reviewed_clusters"


def corrected_document(workspace: Workspace, doc: dict[str, Any], state: ReviewState) -> dict[str, Any]:
    """clusters.json as the edits make it: members re-assigned, excluded ones left out, centroids anew."""
    from yokai_pipeline import clustering
    from yokai_pipeline.config import ClusteringConfig

    vectors = clustering._embeddings_of_members(workspace, state.members.values())
    follow_splits(state, vectors)
    members = []
    for lid, m in state.members.items():
        cid = state.cluster_of(lid)
        if cid is None:
            continue
        name = Path(m["path"]).name
        members.append(
            {
                **m,
                "cluster": cid,
                "original_cluster": int(m["cluster"]),
                "cluster_path": f"{REVIEWED_FOLDER}/{clustering.folder_name(cid)}/{name}",
            }
        )
    members = [m for m in members if m["layer_id"] in vectors or m["cluster"] < 0]
    cfg = ClusteringConfig.model_validate(doc.get("clustering") or {})
    out = clustering.build_document(members, vectors, doc.get("embedding", {}), cfg)
    for c in out["clusters"]:
        if state.attrs.get(c["id"]):
            c["review"] = dict(state.attrs[c["id"]])
    out["review"] = {
        "log": "review/edits.jsonl",
        "applied": len(state.applied),
        "skipped": state.skipped,
        "excluded_layers": sorted(state.excluded_layers()),
        "excluded_clusters": sorted(state.excluded_clusters),
    }
    return out


def write_reviewed_clusters(workspace: Workspace, link_mode: str = "hardlink") -> dict[str, Any]:
    """Write ``reviewed_clusters/``: character_clusters with the edit log applied.

    Skipped when clusters.json and the log are unchanged since the last write (a re-run resumes).

    Returns:
        ``{"edits": applied, "skipped_edits": n, "clusters": n, "excluded_layers": n, "rebuilt": bool}``.
    """
    from yokai_pipeline import clustering
    from yokai_pipeline.config import ClusteringConfig

    doc = load_clusters_doc(workspace)
    source = _sources(workspace)
    previous = _previous(workspace)
    if previous.get("review", {}).get("source") == source:
        return _apply_stats(previous, previous["review"], rebuilt=False)
    state = replay(doc, read_edits(workspace))
    out = corrected_document(workspace, doc, state)
    out["review"]["source"] = source
    cfg = ClusteringConfig.model_validate({**(doc.get("clustering") or {}), "link_mode": link_mode})
    clustering.write_cluster_tree(workspace, out, cfg, folder=REVIEWED_FOLDER)
    return _apply_stats(out, out["review"], rebuilt=True)


def _sources(workspace: Workspace) -> dict[str, str | None]:
    """Content hashes of what reviewed_clusters/ is built from."""
    from yokai_pipeline import clustering

    log = edit_log(workspace)
    return {
        "clusters": fsio.file_sha256(clustering.clusters_file(workspace)),
        "edits": fsio.file_sha256(log) if log.is_file() else None,
    }


def _previous(workspace: Workspace) -> dict[str, Any]:
    index = workspace.reviewed_clusters / "clusters.json"
    try:
        return fsio.read_json(index) if index.is_file() else {}
    except ValueError:
        return {}  # a torn file from another tool: rebuild


def _apply_stats(doc: Mapping[str, Any], review: Mapping[str, Any], rebuilt: bool) -> dict[str, Any]:
    return {
        "edits": review["applied"],
        "skipped_edits": len(review["skipped"]),
        "clusters": len(doc["clusters"]),
        "excluded_layers": len(review["excluded_layers"]),
        "rebuilt": rebuilt,
    }


def review_attributes(workspace: Workspace) -> dict[int, dict[str, Any]]:
    """Per-cluster name / trigger / type / train / tier set by review (from reviewed_clusters)."""
    index = workspace.reviewed_clusters / "clusters.json"
    if not index.is_file():
        return {}
    return {int(c["id"]): dict(c["review"]) for c in fsio.read_json(index)["clusters"] if c.get("review")}


def current_attributes(workspace: Workspace) -> dict[int, dict[str, Any]]:
    """:func:`review_attributes` from the live log; clusters merged away or excluded get ``train: False``.

    For ``yokai select --batch`` between dataset runs: an analysis made before a merge still
    lists the merged-away cluster, and it must not be selected.
    """
    state = replay(load_clusters_doc(workspace), read_edits(workspace))
    groups = state.groups()
    attrs = {cid: dict(a) for cid, a in state.attrs.items() if cid in groups}
    for cid in state.known_ids - groups.keys():
        attrs[cid] = {"train": False}
    for cid in state.excluded_clusters | set(state.alias):
        attrs[cid] = {"train": False}
    return attrs


def reviewed_is_current(workspace: Workspace) -> bool:
    """Whether reviewed_clusters/ was built from the clusters.json and edit log as they are now."""
    if not (workspace.reviewed_clusters / "clusters.json").is_file():
        return not edit_log(workspace).is_file()
    return _previous(workspace).get("review", {}).get("source") == _sources(workspace)


def apply_to_analysis(result: dict[str, Any], attrs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Tier / type overrides and display names from review, into an analysis result (in place).

    The computed values are kept as ``tier_computed`` / ``type_computed``.
    """
    from yokai_pipeline import analysis

    for c in result["clusters"]:
        a = attrs.get(int(c["id"]), {})
        for key in ("tier", "type"):
            if key in a and a[key] != c[key]:
                c[f"{key}_computed"] = c[key]
                c[key] = a[key]
                c[f"{key}_source"] = "review"
        if a.get("name"):
            c["name"] = a["name"]
    result["summary"] = analysis.summarize(result["clusters"], result["summary"].get("noise_images", 0))
    return result


def display_names(attrs: Mapping[int, Mapping[str, Any]]) -> dict[int, str]:
    return {cid: a["name"] for cid, a in attrs.items() if a.get("name")}


def select_with_edits(
    result: dict[str, Any], cfg: Any, attrs: Mapping[int, Mapping[str, Any]]
) -> dict[str, Any]:
    """The selection the filters make, corrected by review: train on/off, names, trigger words.

    Args:
        result: the analysis (with :func:`apply_to_analysis` already applied).
        cfg: SelectionConfig; names given there lose to names given in review.
        attrs: :func:`review_attributes`.

    Raises:
        ConfigError: two characters end up with the same name or trigger word.
    """
    from yokai_pipeline import selection
    from yokai_pipeline.errors import ConfigError

    present = {int(c["id"]) for c in result["clusters"]}
    if not attrs:
        return selection.select_clusters(result, cfg)
    if cfg.clusters is not None:
        ids = set(cfg.clusters)
    else:
        ids = {
            int(c["id"])
            for c in result["clusters"]
            if selection.matches_filters(c, cfg.tiers, cfg.types, cfg.min_images)
        }
    ids |= {cid for cid, a in attrs.items() if a.get("train") is True}
    ids -= {cid for cid, a in attrs.items() if a.get("train") is False}
    ids &= present  # a cluster merged away or excluded in review is no longer a character
    names = {k: v for k, v in cfg.names.items() if k.strip().lstrip("-").isdigit() and int(k) in present}
    names.update({str(cid): n for cid, n in display_names(attrs).items() if cid in present})
    sel = selection.select_clusters(result, cfg.model_copy(update={"clusters": sorted(ids), "names": names}))
    seen: dict[str, int] = {}
    for ch in sel["characters"]:
        trigger = attrs.get(ch["cluster"], {}).get("trigger")
        if trigger:
            ch["trigger"] = selection.trigger_word(trigger, ch["cluster"])
        if ch["trigger"] in seen:
            raise ConfigError(
                f"clusters {seen[ch['trigger']]} and {ch['cluster']} would share the trigger word "
                f"{ch['trigger']!r}; rename one in review"
            )
        seen[ch["trigger"]] = ch["cluster"]
    return sel


def dataset_clusters(workspace: Workspace) -> Path:
    """The cluster tree the dataset stages read: reviewed_clusters once written, else character_clusters."""
    reviewed = workspace.reviewed_clusters
    return reviewed if (reviewed / "clusters.json").is_file() else workspace.character_clusters
