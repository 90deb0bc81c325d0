"""What the review page shows: the clusters as the edits make them, with tiers, tags and look-alikes.

No web framework here: :class:`ReviewView` reads the workspace (clusters.json, the edit log,
the analysis, the embeddings) and answers plain dicts; ``review.app`` serves them.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from yokai_pipeline import clustering, edits, fsio
from yokai_pipeline.config import ReviewConfig, SelectionConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.workspace import Workspace

LAYER_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,200}$")
TAG_SAMPLES = 24
TOP_TAGS = 8


class NotFound(LookupError):
    """An id the request names is not in the workspace."""


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


class ReviewView:
    """The review state of one workspace, re-read whenever clusters.json or the edit log change."""

    def __init__(self, workspace: str | Path, cfg: ReviewConfig | None = None):
        self.ws = Workspace(workspace)
        self.cfg = cfg or ReviewConfig()
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._vectors: tuple[tuple | None, dict[str, np.ndarray]] = (None, {})
        self.doc: dict[str, Any] = {}
        self.state: edits.ReviewState | None = None
        self.edits: list[dict[str, Any]] = []

    def refresh(self) -> edits.ReviewState:
        """Reload when the clusters or the log changed; returns the current state."""
        key = (_stamp(clustering.clusters_file(self.ws)), _stamp(edits.edit_log(self.ws)))
        with self._lock:
            if key != self._key or self.state is None:
                self.doc = edits.load_clusters_doc(self.ws)
                self.edits = edits.read_edits(self.ws)
                self.state = edits.replay(self.doc, self.edits)
                self._key = key
                if any(e["op"] == "split" for e in self.state.applied):  # as the dataset flow will
                    edits.follow_splits(self.state, self._load_vectors())
            return self.state

    def vectors(self) -> dict[str, np.ndarray]:
        """layer id -> embedding (loaded once per clusters.json)."""
        self.refresh()
        with self._lock:
            return self._load_vectors()

    def _load_vectors(self) -> dict[str, np.ndarray]:
        stamp = _stamp(clustering.clusters_file(self.ws))
        if self._vectors[0] != stamp:
            vecs = clustering._embeddings_of_members(self.ws, self.doc["members"])
            self._vectors = (stamp, vecs)
        return self._vectors[1]

    # ------------------------------------------------------------------ reading

    def image_path(self, layer_id: str) -> Path:
        """The layer file of a member, checked to lie inside the workspace.

        Raises:
            NotFound: not a member id, or its path leaves the workspace or does not exist.
        """
        state = self.refresh()
        if not LAYER_ID.match(layer_id) or layer_id not in state.members:
            raise NotFound(f"no layer {layer_id!r}")
        rel = str(state.members[layer_id].get("path") or "")
        path = (self.ws.root / rel).resolve()
        if not path.is_relative_to(self.ws.root) or not path.is_file():
            raise NotFound(f"layer {layer_id!r} has no file inside the workspace")
        return path

    def member_page(self, cluster_id: int, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """One page of a cluster's layer ids (noise is cluster -1)."""
        groups = self.refresh().groups()
        if cluster_id not in groups:
            raise NotFound(f"no cluster {cluster_id}")
        limit = min(max(1, limit or self.cfg.page_size), 1000)
        ids = sorted(groups[cluster_id])
        offset = max(0, offset)
        return {
            "cluster": cluster_id,
            "total": len(ids),
            "offset": offset,
            "layers": ids[offset : offset + limit],
        }

    def clusters(self) -> list[dict[str, Any]]:
        """Every cluster card: id, size, tier, type, name, train, tags, look-alikes, first page."""
        state = self.refresh()
        groups = state.groups()
        analysed = self._analysis()
        selection_cfg = self._selection_config()
        alike = self.lookalikes(groups)
        cards = []
        for cid in sorted(groups, key=lambda c: (c == edits.NOISE, c)):
            layer_ids = sorted(groups[cid])
            cards.append(
                self._card(cid, layer_ids, state, analysed.get(cid), selection_cfg, alike.get(cid, []))
            )
        for cid in sorted(state.excluded_clusters):
            cards.append({**self._blank(cid), "excluded": True})
        return cards

    def _blank(self, cid: int) -> dict[str, Any]:
        return {
            "id": cid, "label": "noise" if cid == edits.NOISE else clustering.folder_name(cid),
            "size": 0, "tier": "-", "type": "-", "name": "", "trigger": "", "train": False,
            "tags": [], "alike": [], "layers": [], "excluded": False, "overrides": {}, "split": False,
        }  # fmt: skip

    def _card(
        self,
        cid: int,
        layer_ids: list[str],
        state: edits.ReviewState,
        analysed: dict[str, Any] | None,
        selection_cfg: SelectionConfig,
        alike: list[dict[str, Any]],
    ) -> dict[str, Any]:
        from yokai_pipeline import analysis

        card = self._blank(cid)
        card.update(size=len(layer_ids), layers=layer_ids[: self.cfg.page_size], alike=alike)
        if cid == edits.NOISE:
            return card
        attrs = state.attrs.get(cid, {})
        same = analysed is not None and int(analysed["images"]) == len(layer_ids)
        poor = bool(analysed and analysed.get("quality", {}).get("poor"))
        computed_tier = analysed.get("tier_computed", analysed["tier"]) if same else None  # type: ignore[index]
        computed_type = (analysed or {}).get("type_computed", (analysed or {}).get("type", "unknown"))
        card.update(
            tier=attrs.get("tier") or computed_tier or analysis.tier_for(len(layer_ids), poor),
            type=attrs.get("type") or computed_type,
            name=attrs.get("name", ""),
            trigger=attrs.get("trigger", ""),
            overrides={k: v for k, v in attrs.items()},
            tags=self._top_tags(layer_ids, analysed),
            split=cid in state.created,
        )
        default_train = selection_cfg.clusters is None and analysis_matches(card, selection_cfg)
        card["train"] = attrs.get("train", default_train)
        return card

    def lookalikes(self, groups: dict[int, list[str]]) -> dict[int, list[dict[str, Any]]]:
        """For each cluster the clusters whose centroids lie within ``lookalike_distance`` (cosine).

        Returns:
            cluster id -> up to 3 ``{"id", "distance", "alike": True}``, or only the nearest
            with ``"alike": False`` when none is that close.
        """
        vecs = self.vectors()
        ids, cents = [], []
        for cid, lids in groups.items():
            rows = [vecs[lid] for lid in lids if lid in vecs]
            if cid == edits.NOISE or not rows:
                continue
            ids.append(cid)
            cents.append(clustering.normalise_rows(np.mean(rows, axis=0, keepdims=True))[0])
        if len(ids) < 2:
            return {}
        C = np.asarray(cents, dtype=np.float32)
        dist = 1.0 - C @ C.T
        np.fill_diagonal(dist, np.inf)
        out: dict[int, list[dict[str, Any]]] = {}
        for i, cid in enumerate(ids):
            order = np.argsort(dist[i])[:3]
            near = [
                {"id": ids[j], "distance": round(float(dist[i, j]), 3), "alike": True}
                for j in order
                if dist[i, j] <= self.cfg.lookalike_distance
            ]
            # nothing close: still name the nearest, so a reviewer sees how far apart they are
            j = int(order[0])
            out[cid] = near or [{"id": ids[j], "distance": round(float(dist[i, j]), 3), "alike": False}]
        return out

    def _analysis(self) -> dict[int, dict[str, Any]]:
        path = self.ws.analysis_dir / "cluster_analysis.json"
        if not path.is_file():
            return {}
        try:
            from yokai_pipeline import analysis

            return {int(c["id"]): c for c in analysis.read_analysis(path)["clusters"]}
        except BadInputError:
            return {}  # a broken analysis must not keep the page from showing the clusters

    def _selection_config(self) -> SelectionConfig:
        path = self.ws.root / "config.json"
        try:
            return SelectionConfig.model_validate(fsio.read_json(path).get("selection", {}))
        except (OSError, ValueError, AttributeError):
            return SelectionConfig()

    def _top_tags(self, layer_ids: list[str], analysed: dict[str, Any] | None) -> list[str]:
        """Top tags from the analysis, or from per-image ``.tags.json`` sidecars beside the layers."""
        if analysed and analysed.get("top_tags"):
            return [str(t) for t in list(analysed["top_tags"])[:TOP_TAGS]]
        counts: Counter[str] = Counter()
        state = self.state
        assert state is not None
        step = max(1, len(layer_ids) // TAG_SAMPLES)
        for lid in layer_ids[::step][:TAG_SAMPLES]:
            sidecar = (self.ws.root / state.members[lid]["path"]).with_suffix(".tags.json")
            if not sidecar.is_file():
                continue
            try:
                data = fsio.read_json(sidecar)
            except ValueError:
                continue
            tags = data.get("tags", data) if isinstance(data, dict) else {}
            counts.update(str(t) for t in tags)
        return [t for t, _ in counts.most_common(TOP_TAGS)]

    def edit_list(self) -> list[dict[str, Any]]:
        """The log, newest first, each with ``undone``."""
        self.refresh()
        undone = {e.get("target") for e in self.edits if e["op"] == "undo"}
        return [{**e, "undone": e["id"] in undone} for e in reversed(self.edits)]

    def last_undoable(self) -> str | None:
        for e in self.edit_list():
            if e["op"] != "undo" and not e["undone"]:
                return e["id"]
        return None


def analysis_matches(card: dict[str, Any], cfg: SelectionConfig) -> bool:
    """Whether the selection filters pick a cluster with this card's tier, type and size."""
    from yokai_pipeline import selection

    return selection.matches_filters(
        {"tier": card["tier"], "type": card["type"], "images": card["size"]},
        cfg.tiers,
        cfg.types,
        cfg.min_images,
    )
