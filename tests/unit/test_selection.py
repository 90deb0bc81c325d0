"""Character selection: batch filters, exports, hostile names, scripted interactive sessions, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.test_analysis import build_clusters, tier_specs
from yokai_pipeline import analysis, selection
from yokai_pipeline.cli import app
from yokai_pipeline.commands.select import expand_multi_values
from yokai_pipeline.config import SelectionConfig
from yokai_pipeline.errors import BadInputError, ConfigError

HOSTILE = {
    0: '"quoted" name',
    1: "<script>alert(1)</script>",
    2: "../../evil",
    3: "ジバニャン",
    4: "nul\x00byte",
    5: "a,b\nc",
    6: "..",
    7: "/etc/passwd",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with the ten tier clusters, their analysis JSON and HTML report."""
    root = tmp_path_factory.mktemp("ws")
    cdir = build_clusters(root, tier_specs())
    result = analysis.analyze_clusters(cdir)
    analysis.write_analysis(
        result, root / "analysis/cluster_analysis.json", root / "analysis/cluster_analysis.html"
    )
    return root


def files_of(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def expected_ids(
    result: dict, tiers: set[str], min_images: int = 0, types: set[str] | None = None
) -> list[int]:
    return [
        c["id"]
        for c in result["clusters"]
        if c["tier"] in tiers and c["images"] >= min_images and (types is None or c["type"] in types)
    ]


def run_select(*args: str, input: str | None = None):
    return CliRunner().invoke(app, ["select", *args], input=input)


def test_batch_tiers_S_A_min_images_exports_exactly_the_matching_clusters(
    workspace: Path, tmp_path: Path
) -> None:
    cdir, apath = workspace / "character_clusters", workspace / "analysis/cluster_analysis.json"
    result = analysis.read_analysis(apath)
    out = tmp_path / "selected"
    r = run_select(
        str(cdir),
        "--analysis",
        str(apath),
        "--batch",
        "--output-dir",
        str(out),
        "--tiers",
        "S",
        "A",
        "--min-images",
        "20",
        "--selection-file",
        str(tmp_path / "sel.json"),
    )
    assert r.exit_code == 0, r.output
    want = expected_ids(result, {"S", "A"}, 20)
    assert want == [6, 7, 8, 9]
    sel = selection.read_selection(tmp_path / "sel.json")
    assert [c["cluster"] for c in sel["characters"]] == want
    assert sel["source"] == "character_clusters/clusters.json"
    assert {p.name for p in out.iterdir() if p.is_dir()} == {f"char_{i:03d}" for i in want}
    for cid in want:
        exported = out / f"char_{cid:03d}"
        src = cdir / f"cluster_{cid:03d}"
        assert files_of(exported) == files_of(src)
        some = sorted(src.iterdir())[0]
        assert os.path.samefile(some, exported / some.name)  # hard link, no copy
    assert json.loads((out / "selection.json").read_text()) == sel

    # More values per flag and other filters: types, a higher size bar, explicit ids with a name.
    r = run_select(
        str(cdir),
        "--analysis",
        str(apath),
        "--batch",
        "--tiers",
        "S",
        "A",
        "--types",
        "yokai",
        "--selection-file",
        str(tmp_path / "s2.json"),
    )
    assert r.exit_code == 0, r.output
    got = [c["cluster"] for c in selection.read_selection(tmp_path / "s2.json")["characters"]]
    assert got == expected_ids(result, {"S", "A"}, types={"yokai"}) == [6, 8]
    r = run_select(
        str(cdir),
        "--analysis",
        str(apath),
        "--batch",
        "--clusters",
        "1",
        "2",
        "--name",
        "2=Jibanyan",
        "--selection-file",
        str(tmp_path / "s3.json"),
    )
    assert r.exit_code == 0, r.output
    chars = selection.read_selection(tmp_path / "s3.json")["characters"]
    assert [(c["cluster"], c["name"], c["trigger"]) for c in chars] == [
        (1, "char_001", "char001"),  # the guide: folder char_001, trigger word char001
        (2, "Jibanyan", "jibanyan"),
    ]


def test_cli_rejects_bad_options(workspace: Path, tmp_path: Path) -> None:
    cdir, apath = workspace / "character_clusters", workspace / "analysis/cluster_analysis.json"
    r = run_select(str(cdir), "--analysis", str(apath), "--batch", "--tiers", "X")
    assert r.exit_code == 2 and "tiers" in r.output
    r = run_select(str(cdir), "--analysis", str(apath), "--batch", "--name", "Jibanyan")
    assert r.exit_code != 0 and "ID=NAME" in r.output
    r = run_select(str(cdir), "--analysis", str(apath), "--batch", "--clusters", "77")
    assert r.exit_code == 1 and "77" in r.output
    r = run_select(str(cdir), "--analysis", str(tmp_path / "missing.json"), "--batch")
    assert r.exit_code == 1 and "missing.json" in r.output


def test_expand_multi_values() -> None:
    assert expand_multi_values(["C", "--tiers", "S", "A", "--min-images", "20", "--clusters", "1", "2"]) == [
        "C",
        "--tiers",
        "S",
        "--tiers",
        "A",
        "--min-images",
        "20",
        "--clusters",
        "1",
        "--clusters",
        "2",
    ]
    assert expand_multi_values(["--name", "3=Jiba nyan", "--batch"]) == ["--name", "3=Jiba nyan", "--batch"]


def fake_analysis() -> dict:
    rows = [
        (0, "S", 120, "human"),
        (1, "A", 60, "yokai"),
        (2, "B", 30, "yokai"),
        (3, "C", 16, "human"),
        (4, "D", 5, "unknown"),
        (5, "B", 19 + 1, "human"),
    ]
    return {
        "version": 1,
        "clusters_dir": "/w/character_clusters",
        "source": "character_clusters/clusters.json",
        "clusters": [
            {"id": i, "tier": t, "images": n, "type": k, "recommended": t in "SAB"} for i, t, n, k in rows
        ],
    }


def test_select_clusters_filters_ids_and_names() -> None:
    a = fake_analysis()
    ids = lambda sel: [c["cluster"] for c in sel["characters"]]  # noqa: E731
    # default: the guide's recommended S/A/B plus C (its "requires augmentation" tier), not D
    assert ids(selection.select_clusters(a)) == [0, 1, 2, 3, 5]
    assert [c["tier"] for c in selection.select_clusters(a)["characters"]] == ["S", "A", "B", "C", "B"]
    assert ids(selection.select_clusters(a, SelectionConfig(tiers=["B", "C"], min_images=20))) == [2, 5]
    assert ids(selection.select_clusters(a, SelectionConfig(types=["yokai"]))) == [1, 2]
    assert ids(selection.select_clusters(a, SelectionConfig(clusters=[4, 3], tiers=["S"]))) == [3, 4]
    sel = selection.select_clusters(a, SelectionConfig(tiers=["S"], names={"0": "Keita Amano"}))
    assert sel["characters"] == [
        {
            "cluster": 0,
            "name": "Keita_Amano",
            "trigger": "keita_amano",
            "type": "human",
            "tier": "S",
            "images": 120,
        }
    ]
    with pytest.raises(ConfigError, match="9"):
        selection.select_clusters(a, SelectionConfig(clusters=[9]))
    with pytest.raises(ConfigError, match="share the name"):
        selection.select_clusters(a, SelectionConfig(names={"0": "Nyan", "1": "nyan"}))
    with pytest.raises(ConfigError, match="not a cluster id"):
        selection.select_clusters(a, SelectionConfig(names={"x": "Nyan"}))


def test_hostile_names_are_safe_folder_names_and_triggers(workspace: Path, tmp_path: Path) -> None:
    result = analysis.read_analysis(workspace / "analysis/cluster_analysis.json")
    cfg = SelectionConfig(clusters=list(HOSTILE), names={str(k): v for k, v in HOSTILE.items()})
    sel = selection.select_clusters(result, cfg)
    names = [c["name"] for c in sel["characters"]]
    triggers = [c["trigger"] for c in sel["characters"]]
    print("hostile names ->", list(zip(HOSTILE.values(), names, triggers, strict=True)))
    for n, t in zip(names, triggers, strict=True):
        assert n and "/" not in n and "\\" not in n and "\x00" not in n and n not in (".", "..")
        assert not n.startswith(".")
        assert t and not any(ch in t for ch in ", \n\t\x00/")
    assert names[3] == "ジバニャン"  # unicode letters survive
    assert names[6] == "char_006" and triggers[6] == "char006"  # nothing left of ".." -> the defaults
    out = tmp_path / "exp" / "out"
    before = set(tmp_path.rglob("*"))
    counts = selection.export_selection(sel, workspace / "character_clusters", out)
    created = set(tmp_path.rglob("*")) - before
    assert all(p == out or out in p.parents or p == out.parent for p in created)
    assert {p.name for p in out.iterdir() if p.is_dir()} == set(names)
    assert sum(counts.values()) == sum(c["images"] for c in sel["characters"])
    # The same names in the HTML report end up escaped.
    html = analysis.render_report(result, names=HOSTILE)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;quoted&#34; name" in html


def test_read_selection_rejects_unsafe_files(tmp_path: Path) -> None:
    p = tmp_path / "selection.json"
    p.write_text(
        json.dumps(
            {
                "version": 1,
                "source": "x",
                "characters": [
                    {
                        "cluster": 0,
                        "name": "../up",
                        "trigger": "t",
                        "type": "human",
                        "tier": "S",
                        "images": 100,
                    }
                ],
            }
        )
    )
    with pytest.raises(BadInputError, match=r"selection.json.*safe folder name"):
        selection.read_selection(p)
    p.write_text(
        json.dumps(
            {
                "version": 1,
                "source": "x",
                "characters": [
                    {
                        "cluster": 0,
                        "name": "ok",
                        "trigger": "a, b",
                        "type": "human",
                        "tier": "S",
                        "images": 100,
                    }
                ],
            }
        )
    )
    with pytest.raises(BadInputError, match="trigger"):
        selection.read_selection(p)
    p.write_text("[]")
    with pytest.raises(BadInputError, match="selection.json"):
        selection.read_selection(p)


def test_interactive_session_driven_by_a_script(workspace: Path, tmp_path: Path) -> None:
    cdir = workspace / "character_clusters"
    result = analysis.read_analysis(workspace / "analysis/cluster_analysis.json")
    report = workspace / "analysis/cluster_analysis.html"
    script = iter(
        [
            "l",
            "f tier S A",  # view: 6 7 8 9
            "n",  # -> 7
            "o",  # open the report at cluster 7
            "+",  # select 7
            "g 9",
            "name Jibanyan",  # names and selects 9
            "f min 100",  # view: 8 9 (current 9 stays)
            "p",  # -> 8
            "s",  # show sample paths
            "f clear",
            "g 2",
            "select",  # select 2
            "auto",  # + every recommended: 4..9
            "- 4 5 6",
            "deselect 8",
            "name 3=Whisp <b>",  # names and selects 3
            "bogus",
            "sel",
            "export",
            "save",
            "q",
            "+ 0",  # never read: the session ended
        ]
    )
    printed: list[str] = []
    opened: list[str] = []
    out, sel_path = tmp_path / "out", tmp_path / "selection.json"
    sel = selection.interactive_select(
        result,
        cdir,
        report,
        input_fn=lambda _prompt: next(script),
        print_fn=printed.append,
        open_fn=opened.append,
        output_dir=out,
        selection_path=sel_path,
    )
    text = "\n".join(printed)
    chosen = [(c["cluster"], c["name"]) for c in sel["characters"]]
    assert chosen == [(2, "char_002"), (3, "Whisp_b"), (7, "char_007"), (9, "Jibanyan")]
    assert opened == [f"{report.resolve().as_uri()}#cluster-007"]
    assert "unknown command 'bogus'" in text
    sample_lines = [line.strip() for line in printed if line.strip().endswith(".png")]
    assert sample_lines and all(Path(p).is_file() for p in sample_lines)
    assert any("cluster_008" in p for p in sample_lines)  # 's' showed cluster 8's samples
    # export and save wrote exactly what was chosen
    assert selection.read_selection(sel_path) == sel
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"char_002", "Whisp_b", "char_007", "Jibanyan"}
    assert files_of(out / "Jibanyan") == files_of(cdir / "cluster_009")


def test_interactive_cli_with_stdin(workspace: Path, tmp_path: Path) -> None:
    cdir, apath = workspace / "character_clusters", workspace / "analysis/cluster_analysis.json"
    out = tmp_path / "out"
    r = run_select(
        str(cdir),
        "--analysis",
        str(apath),
        "--output-dir",
        str(out),
        "--name",
        "8=Sakana",
        "--selection-file",
        str(tmp_path / "sel.json"),
        input="f type human\nn\n+\nq\n",
    )
    assert r.exit_code == 0, r.output
    chars = selection.read_selection(tmp_path / "sel.json")["characters"]
    human_ids = [c["id"] for c in analysis.read_analysis(apath)["clusters"] if c["type"] == "human"]
    assert [c["cluster"] for c in chars] == sorted([human_ids[1], 8])
    assert {p.name for p in out.iterdir() if p.is_dir()} == {c["name"] for c in chars}
