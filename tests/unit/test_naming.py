"""Reference naming on the rendered sample series (offline embeddings, real clustering)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.unit.test_clustering import EPISODES, build_workspace, majority
from yokai_pipeline import naming
from yokai_pipeline.clustering import cluster_layers, read_clusters
from yokai_pipeline.config import ClusteringConfig, NamingConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import atomic_write_json, save_image
from yokai_pipeline.synthetic import render_character
from yokai_pipeline.workspace import Workspace

#: Three sample characters (a main one, a mid one and a rare one) and the names users give them.
REFS = {0: "Jibanyan", 4: "Komasan", 8: "Whisper"}


@pytest.fixture(scope="module")
def _clustered(tmp_path_factory):
    ws, truth = build_workspace(tmp_path_factory.mktemp("series"))
    cluster_layers(ws, EPISODES, ClusteringConfig())
    return ws, truth


@pytest.fixture
def series(_clustered, tmp_path):
    ws, truth = _clustered
    shutil.copytree(ws.root, tmp_path / "ws")
    return Workspace(tmp_path / "ws"), truth


def _write_refs(root, chars: dict[int, str], n: int = 2, seed: int = 7):
    """New renders (poses and scales the series did not use) as refs/<Name>/<k>.png."""
    rng = np.random.default_rng(seed)
    for cid, name in chars.items():
        for k in range(n):
            img = render_character(
                cid,
                scale=float(rng.uniform(0.7, 1.3)),
                facing=int(rng.choice([-1, 1])),
                pose=float(rng.uniform()),
            )
            save_image(root / name / f"{k}.png", img)
    return root


def _cluster_of(doc, truth) -> dict[int, list[int]]:
    """Character id -> the clusters whose majority it is."""
    out: dict[int, list[int]] = {}
    for cluster, char in majority(doc["members"], truth).items():
        out.setdefault(char, []).append(cluster)
    return out


def test_references_of_three_characters_name_exactly_their_clusters(series, tmp_path):
    ws, truth = series
    doc = read_clusters(ws)
    owners = _cluster_of(doc, truth)
    assert all(len(owners[c]) == 1 for c in REFS)  # the clustering gives each of them one cluster
    # A selection made before naming gets the names and trigger words.
    chars = [
        {
            "cluster": c["id"],
            "name": f"char{c['id']:03d}",
            "trigger": f"char{c['id']:03d}",
            "type": "unknown",
            "tier": "A",
            "images": c["size"],
        }
        for c in doc["clusters"]
    ]
    atomic_write_json(ws.root / "selection.json", {"version": 1, "source": "x", "characters": chars})

    result = naming.name_clusters(ws, _write_refs(tmp_path / "refs", REFS))
    expected = {str(owners[c][0]): name for c, name in REFS.items()}
    assert result["names"] == expected
    assert sorted(result["unmatched_clusters"]) == sorted(
        c["id"] for c in doc["clusters"] if str(c["id"]) not in expected
    )
    assert result["unmatched_references"] == [] and result["ambiguous"] == [] and result["seeded"] == []
    saved = json.loads((ws.root / "naming.json").read_text())
    assert saved["names"] == expected
    sel = {ch["cluster"]: ch for ch in json.loads((ws.root / "selection.json").read_text())["characters"]}
    for cid, name in expected.items():
        assert sel[int(cid)]["name"] == name and sel[int(cid)]["trigger"] == name.lower()
    assert naming.read_names(ws) == expected
    assert read_clusters(ws)["members"] == doc["members"]  # nothing to seed: clusters untouched


def test_a_reference_matching_two_clusters_is_reported_with_its_files(series, tmp_path):
    ws, truth = series
    doc = read_clusters(ws)
    target = _cluster_of(doc, truth)[0][0]
    # Split character 0's cluster in two (as clustering sometimes does): its reference now matches both.
    new_id = max(c["id"] for c in doc["clusters"]) + 1
    members = [m for m in doc["members"] if m["cluster"] == target]
    for m in members[::2]:
        m["cluster"] = new_id
    doc["clusters"].append(
        {"id": new_id, "folder": f"cluster_{new_id:03d}", "size": len(members[::2]), "centroid": []}
    )
    atomic_write_json(ws.character_clusters / "clusters.json", doc)
    refs = _write_refs(tmp_path / "refs", {0: "Jibanyan"})
    result = naming.name_clusters(ws, refs)
    assert list(result["names"].values()) == ["Jibanyan"] and set(result["names"]) <= {
        str(target),
        str(new_id),
    }
    amb = [
        a
        for a in result["ambiguous"]
        if a.get("reference") == "Jibanyan" and a["why"].startswith("reference")
    ]
    assert amb and set(amb[0]["clusters"]) == {target, new_id}
    lines = naming.naming_report_lines(result)
    assert any("ambiguous" in line and str(refs / "Jibanyan" / "0.png") in line for line in lines)


def test_a_rare_character_with_a_reference_gets_its_own_cluster_from_the_noise(series, tmp_path):
    ws, truth = series
    doc = read_clusters(ws)
    rare = _cluster_of(doc, truth)[9][0]
    hidden = {m["layer_id"] for m in doc["members"] if m["cluster"] == rare}
    for m in doc["members"]:  # as if clustering had left character 9 in the noise
        if m["cluster"] == rare:
            m["cluster"] = -1
    doc["clusters"] = [c for c in doc["clusters"] if c["id"] != rare]
    atomic_write_json(ws.character_clusters / "clusters.json", doc)

    result = naming.name_clusters(
        ws, _write_refs(tmp_path / "refs", {9: "Usapyon"}), NamingConfig(min_seed_layers=3)
    )
    [seed] = result["seeded"]
    assert seed["name"] == "Usapyon" and seed["cluster"] > max(c["id"] for c in doc["clusters"])
    after = read_clusters(ws)
    got = {m["layer_id"] for m in after["members"] if m["cluster"] == seed["cluster"]}
    assert got and got <= hidden and len(got) >= 0.8 * len(hidden)  # only character 9's layers
    assert result["names"] == {str(seed["cluster"]): "Usapyon"}
    assert (ws.character_clusters / f"cluster_{seed['cluster']:03d}").is_dir()
    old = {m["layer_id"]: m["cluster"] for m in doc["members"] if m["cluster"] >= 0}
    assert {m["layer_id"]: m["cluster"] for m in after["members"] if m["layer_id"] in old} == old


def test_bad_reference_folders_are_named(series, tmp_path):
    ws, _ = series
    with pytest.raises(BadInputError, match="refs-missing.*not found"):
        naming.name_clusters(ws, tmp_path / "refs-missing")
    empty = tmp_path / "empty"
    (empty / "Jibanyan").mkdir(parents=True)
    (empty / "Jibanyan" / "notes.txt").write_text("no image here")
    with pytest.raises(BadInputError, match="empty.*holds no reference image"):
        naming.name_clusters(ws, empty)
    refs = _write_refs(tmp_path / "refs", {0: "Jibanyan"})
    (refs / "Ghost").mkdir()
    (refs / "Broken").mkdir()
    (refs / "Broken" / "a.png").write_bytes(b"not a png")
    (refs / "Jibanyan" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    result = naming.name_clusters(ws, refs)
    assert list(result["names"].values()) == ["Jibanyan"]  # the good images still count
    text = "\n".join(naming.naming_report_lines(result))
    assert str(refs / "Ghost") in text and "no reference image" in text
    assert str(refs / "Broken" / "a.png") in text and str(refs / "Jibanyan" / "bad.jpg") in text


def test_naming_needs_clusters(tmp_path):
    with pytest.raises(BadInputError, match="clusters.json.*run clustering first"):
        naming.name_clusters(Workspace(tmp_path), _write_refs(tmp_path / "refs", {0: "A"}, n=1))


def test_yokai_name_command_prints_the_report_and_fails_clearly(series, tmp_path):
    from typer.testing import CliRunner

    from yokai_pipeline.cli import app

    ws, truth = series
    owners = _cluster_of(read_clusters(ws), truth)
    refs = _write_refs(tmp_path / "refs", {4: "Komasan"})
    (refs / "Ghost").mkdir()
    res = CliRunner().invoke(app, ["name", str(ws.root), "--refs", str(refs)])
    assert res.exit_code == 0, res.output
    assert f"cluster {owners[4][0]:>4}  -> Komasan" in res.output
    assert f"problem: {refs / 'Ghost'}: no reference image" in res.output
    bad = CliRunner().invoke(app, ["name", str(ws.root), "--refs", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "nope" in bad.output and "not found" in bad.output
