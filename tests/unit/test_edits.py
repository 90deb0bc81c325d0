"""Review edits on rendered sample characters: replay, validation, undo, selection, new episodes.

The workspace is the clustering tests' (10 characters over 3 episodes, offline embeddings);
ground truth (character per layer) decides what each edit must have done.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter

import pytest

from tests.unit.test_clustering import EPISODES, build_workspace
from yokai_pipeline import analysis, clustering, edits, fsio, selection
from yokai_pipeline.config import ClusteringConfig, SelectionConfig
from yokai_pipeline.errors import BadInputError, ConfigError
from yokai_pipeline.workspace import Workspace

HOSTILE = "<script>alert(1)</script> ../../etc \"q\" 'x'"


@pytest.fixture(scope="module")
def _clustered(tmp_path_factory):
    """Episodes 1-2 clustered; episode 3 embedded but not yet clustered."""
    ws, truth = build_workspace(tmp_path_factory.mktemp("edits_series"))
    clustering.cluster_layers(ws, EPISODES[:2], ClusteringConfig())
    return ws, truth


@pytest.fixture
def series(_clustered, tmp_path):
    ws, truth = _clustered
    shutil.copytree(ws.root, tmp_path / "ws", symlinks=True)
    return Workspace(tmp_path / "ws"), truth


def by_character(ws: Workspace, truth: dict[str, int]) -> dict[int, int]:
    """Ground-truth character -> its cluster id (clustering is pure on this series)."""
    doc = clustering.read_clusters(ws)
    out: dict[int, Counter] = {}
    for m in doc["members"]:
        if m["cluster"] >= 0:
            out.setdefault(truth[m["layer_id"]], Counter())[m["cluster"]] += 1
    return {char: c.most_common(1)[0][0] for char, c in out.items()}


def layers_of(ws: Workspace, cluster_id: int) -> list[str]:
    return sorted(
        m["layer_id"] for m in clustering.read_clusters(ws)["members"] if m["cluster"] == cluster_id
    )


def reviewed(ws: Workspace) -> dict[str, int]:
    return {
        m["layer_id"]: m["cluster"] for m in fsio.read_json(ws.reviewed_clusters / "clusters.json")["members"]
    }


def make_edits(ws: Workspace, truth: dict[str, int]) -> dict:
    """Merge characters 0+1, split half of 2's crops off, move one of 3's crops into 4, exclude 5 and one crop."""
    cid = by_character(ws, truth)
    a, b, c, d, e, f = (cid[k] for k in range(6))
    split_layers = layers_of(ws, c)[::2]
    moved = layers_of(ws, d)[0]
    dropped = layers_of(ws, e)[0]
    edits.append_edit(ws, {"op": "merge", "clusters": [a, b], "into": a}, who="ana")
    split = edits.append_edit(ws, {"op": "split", "layers": split_layers})
    edits.append_edit(ws, {"op": "move", "layers": [moved], "to": e})
    edits.append_edit(ws, {"op": "exclude_cluster", "clusters": [f]})
    edits.append_edit(ws, {"op": "exclude_images", "layers": [dropped]})
    edits.append_edit(
        ws, {"op": "name", "clusters": [a], "name": HOSTILE, "trigger": "jiba nyan", "type": "yokai"}
    )
    edits.append_edit(ws, {"op": "tier", "clusters": [d], "tier": "S"})
    edits.append_edit(ws, {"op": "train", "clusters": [e], "train": False})
    return {
        "a": a, "b": b, "c": c, "d": d, "e": e, "f": f, "new": split["new_cluster"],
        "split": split_layers, "moved": moved, "dropped": dropped,
    }  # fmt: skip


def test_edits_are_logged_and_applied_without_touching_the_clustering(series):
    ws, truth = series
    source = (ws.character_clusters / "clusters.json").read_bytes()
    e = make_edits(ws, truth)
    log = fsio.read_jsonl(edits.edit_log(ws))
    assert [r["op"] for r in log][:2] == ["merge", "split"] and log[0]["who"] == "ana"
    assert all(r["id"] and r["when"].endswith("Z") and r["seq"] == i + 1 for i, r in enumerate(log))
    assert log[1]["new_cluster"] == edits.SPLIT_ID_BASE and log[1]["clusters"] == [e["c"]]

    stats = edits.write_reviewed_clusters(ws)
    assert stats["edits"] == len(log) and stats["rebuilt"]
    assert (ws.character_clusters / "clusters.json").read_bytes() == source  # never rewritten
    got = reviewed(ws)
    merged = {lid for lid, c in got.items() if c == e["a"]}
    assert {truth[lid] for lid in merged} == {0, 1}
    assert set(layers_of(ws, e["a"])) | set(layers_of(ws, e["b"])) == merged
    assert e["b"] not in got.values() and e["f"] not in got.values()
    assert {lid for lid, c in got.items() if c == e["new"]} == set(e["split"])
    assert got[e["moved"]] == e["e"] and e["dropped"] not in got
    assert not set(layers_of(ws, e["f"])) & got.keys()
    # the corrected tree is laid out like character_clusters: one folder per cluster, files present
    doc = fsio.read_json(ws.reviewed_clusters / "clusters.json")
    for m in doc["members"]:
        assert ws.abs(m["cluster_path"]).is_file() and m["cluster_path"].startswith("reviewed_clusters/")
    assert {c["id"]: c["size"] for c in doc["clusters"]} == dict(Counter(v for v in got.values() if v >= 0))
    again = edits.write_reviewed_clusters(ws)
    assert not again["rebuilt"]  # nothing changed: resumes without rebuilding


def test_selection_and_analysis_follow_the_edits(series):
    ws, truth = series
    e = make_edits(ws, truth)
    edits.write_reviewed_clusters(ws)
    result = analysis.analyze_clusters(ws.reviewed_clusters)
    attrs = edits.review_attributes(ws)
    result = edits.apply_to_analysis(result, attrs)
    rows = {c["id"]: c for c in result["clusters"]}
    assert rows[e["d"]]["tier"] == "S" and rows[e["d"]]["tier_computed"] == analysis.tier_for(
        rows[e["d"]]["images"], rows[e["d"]]["quality"]["poor"]
    )
    assert rows[e["a"]]["type"] == "yokai" and rows[e["a"]]["name"] == HOSTILE
    assert result["summary"]["by_tier"]["S"] == sum(1 for c in result["clusters"] if c["tier"] == "S")

    sel = edits.select_with_edits(result, SelectionConfig(tiers=["S", "A", "B", "C", "D"]), attrs)
    chosen = {c["cluster"]: c for c in sel["characters"]}
    assert e["a"] in chosen and e["b"] not in chosen and e["f"] not in chosen
    assert e["e"] not in chosen  # train switched off in review
    assert e["new"] in chosen  # the split-off cluster is a character of its own
    a = chosen[e["a"]]
    assert a["trigger"] == "jiba_nyan" and a["type"] == "yokai"
    assert a["name"] == fsio.safe_name(a["name"]) and "/" not in a["name"] and "<" not in a["name"]
    assert a["images"] == sum(1 for c in reviewed(ws).values() if c == e["a"])
    selection.write_selection(ws.selection_file, sel)  # passes the selection.json validation


def test_undo_restores_and_cannot_be_repeated(series):
    ws, truth = series
    cid = by_character(ws, truth)
    merge = edits.append_edit(ws, {"op": "merge", "clusters": [cid[0], cid[1]]})
    assert edits.replay(edits.load_clusters_doc(ws), edits.read_edits(ws)).resolve(cid[1]) == cid[0]
    edits.append_edit(ws, {"op": "undo", "target": merge["id"]})
    state = edits.replay(edits.load_clusters_doc(ws), edits.read_edits(ws))
    assert state.resolve(cid[1]) == cid[1] and state.applied == []
    with pytest.raises(edits.EditError):
        edits.append_edit(ws, {"op": "undo", "target": merge["id"]})
    # an undone split's id is not handed out again
    split = edits.append_edit(ws, {"op": "split", "layers": layers_of(ws, cid[2])[:2]})
    edits.append_edit(ws, {"op": "undo", "target": split["id"]})
    again = edits.append_edit(ws, {"op": "split", "layers": layers_of(ws, cid[2])[:2]})
    assert again["new_cluster"] == split["new_cluster"] + 1


@pytest.mark.parametrize(
    "edit",
    [
        {"op": "merge", "clusters": [0, 999]},
        {"op": "merge", "clusters": [0]},
        {"op": "merge", "clusters": [0, 1], "into": 2},
        {"op": "move", "layers": ["ep01_f999999_i00"], "to": 0},
        {"op": "move", "layers": ["../../etc/passwd"], "to": 0},
        {"op": "split", "layers": []},
        {"op": "tier", "clusters": [0], "tier": "Z"},
        {"op": "name", "clusters": [0], "type": "robot"},
        {"op": "name", "clusters": [0], "name": "x" * 200},
        {"op": "train", "clusters": [0], "train": "yes"},
        {"op": "exclude_cluster", "clusters": ["0"]},
        {"op": "rm -rf", "clusters": [0]},
        {"op": "undo", "target": "nope"},
    ],
)
def test_bad_edits_are_refused_and_the_log_is_unchanged(series, edit):
    ws, _ = series
    edits.append_edit(ws, {"op": "tier", "clusters": [0], "tier": "A"})
    before = edits.edit_log(ws).read_bytes()
    with pytest.raises(edits.EditError):
        edits.append_edit(ws, edit)
    assert edits.edit_log(ws).read_bytes() == before


def test_a_merged_away_cluster_cannot_be_edited_again(series):
    ws, truth = series
    cid = by_character(ws, truth)
    edits.append_edit(ws, {"op": "merge", "clusters": [cid[0], cid[1]], "into": cid[0]})
    with pytest.raises(edits.EditError, match="not a live cluster"):
        edits.append_edit(ws, {"op": "name", "clusters": [cid[1]], "name": "Komasan"})


def test_a_crash_while_appending_leaves_the_old_log(series, monkeypatch):
    ws, _ = series
    edits.append_edit(ws, {"op": "tier", "clusters": [0], "tier": "A"})
    before = edits.edit_log(ws).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        edits.append_edit(ws, {"op": "tier", "clusters": [0], "tier": "B"})
    monkeypatch.undo()
    assert edits.edit_log(ws).read_bytes() == before
    assert len(edits.read_edits(ws)) == 1


def test_a_corrupt_log_names_the_file(series):
    ws, _ = series
    edits.edit_log(ws).parent.mkdir(parents=True, exist_ok=True)
    edits.edit_log(ws).write_text('{"op": "merge", "id": "a"}\n{"op": "boom"}\n')
    with pytest.raises(BadInputError, match="edits.jsonl.*line 2"):
        edits.read_edits(ws)


def test_every_edit_survives_a_new_episode(series):
    ws, truth = series
    e = make_edits(ws, truth)
    edits.write_reviewed_clusters(ws)
    before = reviewed(ws)

    clustering.assign_incremental(ws, ["ep03"], ClusteringConfig())
    stats = edits.write_reviewed_clusters(ws)
    assert stats["rebuilt"] and stats["skipped_edits"] == 0
    after = reviewed(ws)
    old = {lid: c for lid, c in after.items() if lid in before}
    assert old == before  # every earlier layer is where the edits put it
    new = {lid: c for lid, c in after.items() if lid.startswith("ep03")}
    assert new, "episode 3 added no layers"
    # new crops of the merged-away character land in the merged cluster; the excluded one stays out
    for lid, c in new.items():
        if truth[lid] in (0, 1):
            assert c == e["a"], lid
    assert (
        any(truth[lid] == 1 for lid in new) and e["b"] not in after.values() and e["f"] not in after.values()
    )
    ep03_of_5 = [lid for lid, c in truth.items() if c == 5 and lid.startswith("ep03")]
    assert ep03_of_5 and sum(lid not in after for lid in ep03_of_5) >= 0.8 * len(ep03_of_5)
    attrs = edits.review_attributes(ws)
    assert (
        attrs[e["a"]]["name"] == HOSTILE and attrs[e["d"]]["tier"] == "S" and attrs[e["e"]]["train"] is False
    )


def test_an_edit_whose_cluster_vanished_is_skipped_not_fatal(series):
    ws, truth = series
    cid = by_character(ws, truth)
    edits.append_edit(ws, {"op": "name", "clusters": [cid[3]], "name": "Whisper"})
    edits.append_edit(ws, {"op": "name", "clusters": [cid[4]], "name": "Komasan"})
    doc = clustering.read_clusters(ws)
    doc["clusters"] = [c for c in doc["clusters"] if c["id"] != cid[3]]  # as if a recluster dropped it
    for m in doc["members"]:
        if m["cluster"] == cid[3]:
            m["cluster"] = -1
    state = edits.replay(doc, edits.read_edits(ws))
    assert [s["op"] for s in state.skipped] == ["name"] and "not a live cluster" in state.skipped[0]["reason"]
    assert state.attrs == {cid[4]: {"name": "Komasan"}}


def test_duplicate_trigger_words_from_review_are_refused(series):
    ws, truth = series
    cid = by_character(ws, truth)
    for k in (0, 1):
        edits.append_edit(ws, {"op": "name", "clusters": [cid[k]], "name": f"n{k}", "trigger": "same"})
    edits.write_reviewed_clusters(ws)
    result = analysis.analyze_clusters(ws.reviewed_clusters)
    cfg = SelectionConfig(clusters=[cid[0], cid[1]])
    with pytest.raises(ConfigError, match="trigger word 'same'"):
        edits.select_with_edits(result, cfg, edits.review_attributes(ws))


def select_batch(clusters, analysis_path):
    """``yokai select CLUSTERS --analysis A --batch --tiers S A B C``."""
    from typer.testing import CliRunner

    from yokai_pipeline.cli import app

    args = [
        "select",
        str(clusters),
        "--analysis",
        str(analysis_path),
        "--batch",
        "--tiers",
        "S",
        "A",
        "B",
        "C",
    ]
    return CliRunner().invoke(app, args)


def test_select_batch_reads_the_same_log_as_the_flow(series):
    ws, truth = series
    e = make_edits(ws, truth)
    edits.write_reviewed_clusters(ws)
    result = edits.apply_to_analysis(
        analysis.analyze_clusters(ws.reviewed_clusters), edits.review_attributes(ws)
    )
    apath = ws.analysis_dir / "cluster_analysis.json"
    analysis.write_analysis(result, apath, None)
    r = select_batch(ws.reviewed_clusters, apath)
    assert r.exit_code == 0, r.output
    got = fsio.read_json(ws.selection_file)
    cfg = SelectionConfig(tiers=["S", "A", "B", "C"])
    assert got == edits.select_with_edits(result, cfg, edits.review_attributes(ws))
    chosen = {c["cluster"] for c in got["characters"]}
    assert e["d"] in chosen and e["e"] not in chosen and e["b"] not in chosen  # tier S override; train off


def test_a_split_keeps_new_episodes_images_of_the_split_off_character(series):
    """Two characters clustered together, split apart in review: episode 3 follows the split."""
    ws, truth = series
    cid = by_character(ws, truth)
    edits.append_edit(ws, {"op": "merge", "clusters": [cid[0], cid[1]], "into": cid[0]})  # the "mistake"
    ones = layers_of(ws, cid[1])
    split = edits.append_edit(ws, {"op": "split", "layers": ones})  # the fix
    assert split["episodes"] == ["ep01", "ep02"] and split["clusters"] == [cid[0]]

    clustering.assign_incremental(ws, ["ep03"], ClusteringConfig())
    edits.write_reviewed_clusters(ws)
    got = reviewed(ws)
    new = {lid: c for lid, c in got.items() if lid.startswith("ep03") and truth[lid] in (0, 1)}
    assert {truth[lid] for lid in new} == {0, 1}
    for lid, c in new.items():
        assert c == (split["new_cluster"] if truth[lid] == 1 else cid[0]), (lid, truth[lid], c)
    assert {lid for lid, c in got.items() if c == split["new_cluster"] and not lid.startswith("ep03")} == set(
        ones
    )


def test_select_batch_between_dataset_runs_uses_the_live_log(series):
    ws, truth = series
    apath = ws.analysis_dir / "cluster_analysis.json"
    analysis.write_analysis(analysis.analyze_clusters(ws.character_clusters), apath, None)  # before review
    e = make_edits(ws, truth)
    r = select_batch(ws.character_clusters, apath)
    assert r.exit_code == 0, r.output
    assert "changed since the last dataset run" in r.output
    chosen = {c["cluster"]: c for c in fsio.read_json(ws.selection_file)["characters"]}
    assert e["a"] in chosen and chosen[e["a"]]["trigger"] == "jiba_nyan"
    assert not {e["b"], e["f"], e["e"]} & chosen.keys()  # merged away, excluded, train off


def test_interactive_select_starts_from_the_review_log(series, tmp_path):
    """``yokai select`` without --batch: review's trained clusters start selected, with its names and triggers."""
    from typer.testing import CliRunner

    from yokai_pipeline.cli import app

    ws, truth = series
    cid = by_character(ws, truth)
    edits.append_edit(ws, {"op": "name", "clusters": [cid[2]], "name": "Alice", "trigger": "alicetok"})
    edits.append_edit(ws, {"op": "train", "clusters": [cid[2]], "train": True})
    edits.append_edit(ws, {"op": "train", "clusters": [cid[3]], "train": True})
    edits.write_reviewed_clusters(ws)
    result = analysis.analyze_clusters(ws.reviewed_clusters)
    apath = ws.analysis_dir / "cluster_analysis.json"
    analysis.write_analysis(result, apath, None)
    sel_path = tmp_path / "sel.json"
    args = ["select", str(ws.reviewed_clusters), "--analysis", str(apath), "--selection-file", str(sel_path)]
    r = CliRunner().invoke(app, args, input="q\n")  # quit at once: what review chose is what is saved
    assert r.exit_code == 0, r.output
    chars = {c["cluster"]: c for c in fsio.read_json(sel_path)["characters"]}
    assert set(chars) == {cid[2], cid[3]}
    assert chars[cid[2]]["name"] == "Alice" and chars[cid[2]]["trigger"] == "alicetok"
    # the person can still change review's choice: deselect Alice, keep the other
    r = CliRunner().invoke(app, args, input=f"- {cid[2]}\nq\n")
    assert r.exit_code == 0, r.output
    assert [c["cluster"] for c in fsio.read_json(sel_path)["characters"]] == [cid[3]]
