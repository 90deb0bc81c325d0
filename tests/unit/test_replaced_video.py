"""A video replaced under the same name (a fixed release of an episode): every stage follows the new file.

The frames keep their names (``ep02_f000123``), the layers their ids (``ep02_f000123_i00``): each
stage must see that the content changed, not only that the names are known.
"""

from __future__ import annotations

import shutil

import pytest

from yokai_pipeline import clustering, embedding, frames, layering, synthetic
from yokai_pipeline.config import PipelineConfig
from yokai_pipeline.fsio import read_jsonl
from yokai_pipeline.workspace import Workspace

pytestmark = pytest.mark.slow


def _stages(ws: Workspace, videos, cfg: PipelineConfig, cluster: bool = True) -> list[str]:
    """Frames, layering and embedding of each video, then clustering as the cluster task runs it."""
    ids = []
    for video in videos:
        ep = frames.extract_frames(video, ws, cfg.frames)["episode_id"]
        ids.append(ep)
        rows = read_jsonl(ws.frames_manifest(ep))
        layering.write_layer_manifest(ws, ep, layering.segment_layers(rows, ws, cfg.layering, cfg.detection))
        embedding.embed_layers(ws, ep, cfg.embedding)
    if not cluster:
        return ids
    doc = clustering.read_clusters(ws)
    if doc is None:
        clustering.cluster_layers(ws, ids, cfg.clustering)
    else:
        changed = clustering.changed_episodes(ws, doc, ids)
        known = {m["episode_id"] for m in doc["members"]}
        clustering.assign_incremental(ws, [e for e in ids if e not in known or e in changed], cfg.clustering)
    return ids


def test_a_replaced_episode_is_cut_embedded_and_clustered_from_the_new_file(tmp_path):
    cfg = PipelineConfig()
    old = synthetic.generate_series(tmp_path / "old", seed=0, episodes=2, seconds=6.0)
    fixed = synthetic.generate_series(tmp_path / "fixed", seed=4, episodes=2, seconds=6.0)
    ws = Workspace(tmp_path / "ws")
    _stages(ws, old.episodes, cfg)
    shutil.copyfile(fixed.episodes[1], old.episodes[1])  # ep02.mp4, fixed in place
    ids = _stages(ws, old.episodes, cfg)

    # a fresh workspace over the fixed file is what the re-run must equal, stage by stage
    fresh = Workspace(tmp_path / "fresh")
    _stages(fresh, old.episodes[1:], cfg, cluster=False)
    for ep in ids[1:]:
        assert read_jsonl(ws.layers_manifest(ep)) == read_jsonl(fresh.layers_manifest(ep))
        for r in read_jsonl(ws.layers_manifest(ep)):
            assert ws.abs(r["path"]).read_bytes() == fresh.abs(r["path"]).read_bytes(), r["path"]
        assert ws.embeddings_path(ep).read_bytes() == fresh.embeddings_path(ep).read_bytes()
    # the clusters hold ep02's new layers, each once, and group them by their true character
    doc = clustering.read_clusters(ws)
    layer_ids = {r["layer_id"] for r in read_jsonl(ws.layers_manifest("ep02")) if r["kind"] == "character"}
    members = [m for m in doc["members"] if m["episode_id"] == "ep02"]
    assert sorted(m["layer_id"] for m in members) == sorted(layer_ids)
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    shutil.copyfile(old.ground_truth[0], truth_dir / "ep01.json")
    shutil.copyfile(fixed.ground_truth[1], truth_dir / "ep02.json")
    labels = synthetic.ground_truth_labels(doc["members"], truth_dir)
    scores = clustering.evaluate_clusters(doc["members"], labels)
    assert scores["purity"] >= 0.95 and scores["ari"] >= 0.9, scores
