"""Cluster analysis: tiers by the guide's thresholds, quality, type, JSON/markdown/HTML outputs, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from yokai_pipeline import analysis, fsio
from yokai_pipeline.config import AnalysisConfig, EmbeddingConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.synthetic import CHARACTERS, render_character

# One cluster per character; the sizes hit every tier boundary of the guide.
TIER_SIZES = [4, 14, 15, 19, 20, 49, 50, 99, 100, 120]
EXPECTED_TIERS = ["D", "D", "C", "C", "B", "B", "A", "A", "S", "S"]


def render_variant(char_id: int, rng: np.random.Generator, kind: str = "normal") -> np.ndarray:
    """One RGBA layer of a character; ``blur`` and ``dup`` make poor-quality clusters."""
    if kind == "dup":
        return render_character(char_id, scale=1.0, facing=1, pose=0.25)
    img = render_character(
        char_id,
        scale=float(rng.uniform(0.8, 1.3)),
        facing=int(rng.choice([-1, 1])),
        pose=float(rng.uniform()),
    )
    if kind == "blur":
        img = img.copy()
        img[..., :3] = cv2.GaussianBlur(img[..., :3], (0, 0), sigmaX=8)
    return img


def build_clusters(root: Path, specs: list[tuple[int, int, str]], noise: int = 3, seed: int = 0) -> Path:
    """Write ``root/character_clusters`` with clusters.json as docs/data-formats.md describes.

    Args:
        root: the workspace root.
        specs: per cluster (character id, image count, kind); cluster id = index.
        noise: images in ``noise/``.

    Returns:
        The character_clusters folder.
    """
    rng = np.random.default_rng(seed)
    cdir = root / "character_clusters"
    clusters, members = [], []
    frame = 0
    for cid, (char_id, size, kind) in enumerate([*specs, (0, noise, "normal")]):
        is_noise = cid == len(specs)
        folder = "noise" if is_noise else f"cluster_{cid:03d}"
        for _ in range(size):
            layer_id = f"ep01_f{frame:06d}_i00"
            fsio.save_image(cdir / folder / f"{layer_id}.png", render_variant(char_id, rng, kind))
            members.append(
                {
                    "layer_id": layer_id,
                    "cluster": -1 if is_noise else cid,
                    "episode": "ep01.mp4",
                    "episode_id": "ep01",
                    "frame_index": frame,
                    "box": [0, 0, 10, 10],
                    "path": f"layered_frames/character/ep01/{layer_id}.png",
                    "cluster_path": f"character_clusters/{folder}/{layer_id}.png",
                    "probability": 0.9,
                }
            )
            frame += 1
        if not is_noise:
            clusters.append({"id": cid, "folder": folder, "size": size, "centroid": [0.0] * 4})
    fsio.atomic_write_json(
        cdir / "clusters.json",
        {
            "version": 1,
            "embedding": {"backend": "offline", "dim": 4},
            "clustering": {},
            "clusters": clusters,
            "members": members,
        },
    )
    return cdir


def tier_specs() -> list[tuple[int, int, str]]:
    return [(c.id, size, "normal") for c, size in zip(CHARACTERS, TIER_SIZES, strict=True)]


def type_truth() -> dict[int, str]:
    return {cid: CHARACTERS[char].type for cid, (char, _, _) in enumerate(tier_specs())}


@pytest.fixture(scope="module")
def tier_clusters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clusters(tmp_path_factory.mktemp("ws"), tier_specs())


@pytest.fixture(scope="module")
def tier_result(tier_clusters: Path) -> dict:
    return analysis.analyze_clusters(tier_clusters, AnalysisConfig())


@pytest.mark.parametrize(
    ("count", "tier"),
    [
        (0, "D"),
        (14, "D"),
        (15, "C"),
        (19, "C"),
        (20, "B"),
        (49, "B"),
        (50, "A"),
        (99, "A"),
        (100, "S"),
        (5000, "S"),
    ],
)
def test_tier_for_boundaries(count: int, tier: str) -> None:
    assert analysis.tier_for(count) == tier
    dropped = {"S": "A", "A": "B", "B": "C", "C": "D", "D": "D"}[tier]
    assert analysis.tier_for(count, quality_poor=True) == dropped


def test_tiers_match_counts_and_types(tier_result: dict) -> None:
    clusters = tier_result["clusters"]
    assert [c["images"] for c in clusters] == TIER_SIZES
    assert [c["tier"] for c in clusters] == EXPECTED_TIERS
    assert [c["recommended"] for c in clusters] == [t in "SAB" for t in EXPECTED_TIERS]
    assert all(not c["quality"]["poor"] for c in clusters), [c["quality"]["reasons"] for c in clusters]
    assert tier_result["summary"]["by_tier"] == {"S": 2, "A": 2, "B": 2, "C": 2, "D": 2}
    assert tier_result["summary"]["noise_images"] == 3
    assert tier_result["diversity_source"] == "descriptor"
    acc = analysis.type_accuracy(tier_result, type_truth())
    print(f"offline type accuracy on {len(clusters)} synthetic clusters: {acc:.2f}")
    print({c["id"]: (c["type"], c["type_confidence"]) for c in clusters})
    assert acc == 1.0
    for c in clusters:
        assert 0.0 < c["diversity"] < 1.0
        assert len(c["samples"]) == min(c["images"], AnalysisConfig().samples_per_cluster)
        assert c["quality"]["duplicate_ratio"] < 0.2
        assert 0.0 < c["quality"]["alpha_coverage"] < 1.0


def test_format_summary_is_the_guides_format(tier_result: dict) -> None:
    assert analysis.format_summary(tier_result) == (
        "Cluster Analysis Summary\n"
        "========================\n"
        "Total clusters: 10\n"
        "\n"
        "By Tier:\n"
        "  S Tier: 2 clusters (recommended)\n"
        "  A Tier: 2 clusters (recommended)\n"
        "  B Tier: 2 clusters (recommended)\n"
        "  C Tier: 2 clusters (requires augmentation)\n"
        "  D Tier: 2 clusters (not recommended)\n"
        "\n"
        "By Character Type:\n"
        "  Human: 5 clusters\n"
        "  Yokai: 5 clusters\n"
        "  Unknown: 0 clusters"
    )


def test_poor_quality_drops_one_tier(tmp_path: Path) -> None:
    cdir = build_clusters(
        tmp_path, [(3, 60, "blur"), (5, 60, "dup"), (2, 15, "dup"), (4, 20, "normal")], noise=0
    )
    res = analysis.analyze_clusters(cdir)
    got = {c["id"]: (c["count_tier"], c["tier"], c["quality"]["reasons"]) for c in res["clusters"]}
    assert got[0][:2] == ("A", "B") and "blurry" in got[0][2][0]
    assert got[1][:2] == ("A", "B") and "near-duplicates" in got[1][2][0]
    assert got[2][:2] == ("C", "D")
    assert got[3][:2] == ("B", "B") and got[3][2] == []
    assert res["clusters"][1]["quality"]["duplicate_ratio"] > 0.9
    assert res["clusters"][1]["diversity"] < 1e-6  # identical images: no spread


def test_diversity_from_embeddings_when_present(tmp_path: Path) -> None:
    cdir = build_clusters(tmp_path, [(0, 6, "normal"), (1, 6, "normal")], noise=2)
    members = fsio.read_json(cdir / "clusters.json")["members"]
    rows = [{"layer_id": m["layer_id"], "kind": "character", "path": m["path"]} for m in members]
    fsio.write_jsonl(tmp_path / "layered_frames/manifests/ep01.jsonl", rows)
    emb = np.zeros((len(rows), 4), np.float32)
    for i, m in enumerate(members):
        # cluster 0: identical vectors (no spread); cluster 1: orthogonal pairs (spread 1 between pairs)
        emb[i] = [1, 0, 0, 0] if m["cluster"] == 0 else ([0, 1, 0, 0] if i % 2 else [0, 0, 1, 0])
    (tmp_path / "embeddings").mkdir()
    np.save(tmp_path / "embeddings" / "ep01.npy", emb)
    res = analysis.analyze_clusters(cdir)
    assert res["diversity_source"] == "embeddings"
    div = {c["id"]: c["diversity"] for c in res["clusters"]}
    assert div[0] == pytest.approx(0.0, abs=1e-6)
    # 6 vectors, 3 of each orthogonal kind: 9 of 15 pairs differ -> mean distance 0.6
    assert div[1] == pytest.approx(0.6, abs=1e-3)


def test_unreadable_image_is_reported_and_the_rest_analysed(tmp_path: Path) -> None:
    cdir = build_clusters(tmp_path, [(0, 20, "normal"), (1, 15, "normal")], noise=0)
    bad = sorted((cdir / "cluster_000").glob("*.png"))[3]
    bad.write_bytes(b"not a png")
    res = analysis.analyze_clusters(cdir)
    c0, c1 = res["clusters"]
    assert c0["images"] == 19 and c0["tier"] == "C"  # an unreadable image does not count
    assert any(bad.name in e and "cannot read image" in e for e in c0["errors"])
    assert c1["images"] == 15 and c1["errors"] == []
    assert res["errors"] == c0["errors"]


def test_bad_clusters_json_names_the_file(tmp_path: Path) -> None:
    cdir = tmp_path / "character_clusters"
    cdir.mkdir()
    (cdir / "clusters.json").write_text('{"clusters": [{"id": 0, "folder": "../escape"}], "members": []}')
    with pytest.raises(BadInputError, match="clusters.json.*not a plain folder name"):
        analysis.analyze_clusters(cdir)
    (cdir / "clusters.json").write_text("{nope")
    with pytest.raises(BadInputError, match="clusters.json"):
        analysis.analyze_clusters(cdir)
    with pytest.raises(BadInputError, match="not a folder"):
        analysis.analyze_clusters(tmp_path / "missing")


def test_folders_without_clusters_json(tmp_path: Path) -> None:
    cdir = build_clusters(tmp_path, [(0, 15, "normal"), (1, 4, "normal")], noise=0)
    (cdir / "clusters.json").unlink()
    res = analysis.analyze_clusters(cdir)
    assert [(c["id"], c["images"], c["tier"]) for c in res["clusters"]] == [(0, 15, "C"), (1, 4, "D")]
    assert res["source"] is None


def test_outputs_json_markdown_and_escaped_html(tier_result: dict, tmp_path: Path) -> None:
    hostile = {0: '"><script>window.__pwned=1</script>', 3: "../../etc/passwd", 8: "ジバニャン 'q'"}
    jpath, hpath = analysis.write_analysis(
        tier_result,
        tmp_path / "a" / "cluster_analysis.json",
        tmp_path / "a" / "cluster_analysis.html",
        names=hostile,
    )
    back = analysis.read_analysis(jpath)
    assert back["summary"] == tier_result["summary"]
    assert [c["tier"] for c in back["clusters"]] == EXPECTED_TIERS
    html = hpath.read_text(encoding="utf-8")
    assert "<script>window.__pwned" not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "ジバニャン &#39;q&#39;" in html
    assert html.count('<section class="cluster"') == 10
    assert 'id="cluster-003"' in html and 'id="cluster-009"' in html
    assert html.count("data:image/webp;base64,") == sum(len(c["samples"]) for c in tier_result["clusters"])
    assert "file://" not in html and "http" not in html.replace("http-equiv", "")  # self-contained
    md = analysis.analysis_markdown(tier_result, "file:///x/cluster_analysis.html")
    assert "[HTML report](file:///x/cluster_analysis.html)" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "cluster_" in line]
    assert [row.split("|")[1].strip() for row in table] == ["S", "S", "A", "A", "B", "B", "C", "C", "D", "D"]
    with pytest.raises(BadInputError, match="not a cluster_analysis"):
        (tmp_path / "x.json").write_text('{"version": 1}')
        analysis.read_analysis(tmp_path / "x.json")


def test_cli_analyze_prints_summary(tier_clusters: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from yokai_pipeline.cli import app

    out_json, out_html = tmp_path / "ca.json", tmp_path / "ca.html"
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({str(k): v for k, v in type_truth().items()}))
    r = CliRunner().invoke(
        app,
        [
            "analyze",
            str(tier_clusters),
            "--output-json",
            str(out_json),
            "--output-html",
            str(out_html),
            "--truth",
            str(truth),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "Cluster Analysis Summary" in r.output and "S Tier: 2 clusters (recommended)" in r.output
    assert "Type accuracy: 100.0%" in r.output
    assert json.loads(out_json.read_text())["summary"]["total"] == 10
    assert out_html.stat().st_size > 1000
    r = CliRunner().invoke(app, ["analyze", str(tmp_path / "nope")])
    assert r.exit_code != 0 and "nope" in r.output


def test_clip_backend_with_tiny_random_model(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    model_dir = tmp_path / "tiny_clip"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": {
                    "embed_dim": 16,
                    "vision_cfg": {
                        "image_size": 32,
                        "layers": 1,
                        "width": 32,
                        "head_width": 16,
                        "patch_size": 8,
                    },
                    "text_cfg": {
                        "context_length": 77,
                        "vocab_size": 49408,
                        "width": 32,
                        "heads": 2,
                        "layers": 1,
                    },
                },
                "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]},
            }
        )
    )
    cdir = build_clusters(tmp_path, [(0, 5, "normal"), (1, 5, "normal")], noise=0)
    clip_cfg = EmbeddingConfig(backend="clip", model=f"local-dir:{model_dir}", pretrained=None, device="cpu")
    res = analysis.analyze_clusters(cdir, type_backend="clip", clip_cfg=clip_cfg)
    assert res["type_backend"] == "clip"
    for c in res["clusters"]:
        assert c["type"] in ("human", "yokai", "unknown")
        assert 0.5 <= c["type_confidence"] <= 1.0
        assert c["type_scores"]["human"] + c["type_scores"]["yokai"] == pytest.approx(1.0, abs=1e-3)
