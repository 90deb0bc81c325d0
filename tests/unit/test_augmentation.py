"""Augmentation: the guide's multiplier table, determinism, alpha, provenance, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from yokai_pipeline.augmentation import (
    INTENSITY_RANGES,
    MANIFEST_NAME,
    apply_transform,
    augment_cluster,
    augment_clusters,
    is_symmetric,
    multiplier_for,
    target_count,
)
from yokai_pipeline.config import AugmentConfig
from yokai_pipeline.fsio import read_jsonl
from yokai_pipeline.synthetic import CHARACTERS, render_character

PAD = 0.15  # layer crops carry a transparent margin around the character


def _layer(char_id: int, k: int) -> np.ndarray:
    a = render_character(char_id, scale=0.8 + 0.05 * (k % 4), facing=1 if k % 2 == 0 else -1, pose=k / 7)
    h, w = a.shape[:2]
    py, px = int(h * PAD) + 2, int(w * PAD) + 2
    return np.pad(a, ((py, py), (px, px), (0, 0)))


def _make_cluster(root: Path, name: str, char_id: int, n: int) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for k in range(n):
        Image.fromarray(_layer(char_id, k), "RGBA").save(folder / f"ep01_f{k:06d}_i00.png")
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


# --- the guide's table ------------------------------------------------------------------

# The guide's "Augmentation Multipliers (Auto)": rows (first n, last n) -> multiplier range and,
# where the guide gives one, the final image count range.
GUIDE_ROWS = {(5, 10): ((6, 8), (40, 60)), (11, 15): ((4, 5), (50, 70)), (16, 20): ((3, 4), (60, 80)),
              (21, 30): ((1.5, 2), None)}  # fmt: skip


@pytest.mark.parametrize("n", range(4, 32))
def test_multiplier_is_automatic_by_count_and_lands_in_the_guides_final_range(n):
    got = multiplier_for(n, min_original=5, max_original=30)
    row = next((v for (lo, hi), v in GUIDE_ROWS.items() if lo <= n <= hi), None)
    if row is None:  # 4 and 31: outside min/max original, left as they are
        assert got == 1.0
        return
    (m_lo, m_hi), final = row
    assert m_lo <= got <= m_hi
    if final is not None:
        assert final[0] <= target_count(n, got) <= final[1], (n, got)
    # the guide's worked example: 5 images give 40-60 at every intensity (was 35 at medium)
    if n == 5:
        assert target_count(5, got) == 40


def test_multiplier_respects_min_and_max_original():
    assert multiplier_for(12, min_original=13) == 1.0
    assert multiplier_for(12, max_original=11) == 1.0
    assert multiplier_for(0) == 1.0
    assert multiplier_for(3, min_original=2) == 8.0  # below the table: the smallest clusters' row


def test_intensity_changes_transform_strength_not_count(tmp_path):
    src = _make_cluster(tmp_path / "clusters", "cluster_004", 1, 6)
    light = augment_cluster(src, tmp_path / "l" / "cluster_004", AugmentConfig(intensity="light"))
    heavy = augment_cluster(src, tmp_path / "h" / "cluster_004", AugmentConfig(intensity="heavy"))
    assert light["total"] == heavy["total"] == target_count(6, multiplier_for(6))

    def max_angle(folder):
        rows = read_jsonl(folder / MANIFEST_NAME)
        return max(abs(r["transform"]["rotate"]["angle"]) for r in rows if r["kind"] == "augmented")

    assert max_angle(tmp_path / "l" / "cluster_004") <= 2.0 < max_angle(tmp_path / "h" / "cluster_004") <= 5.0


def test_target_count_rounds_half_up():
    assert target_count(5, 6.0) == 30
    assert target_count(11, 4.5) == 50  # 49.5 -> 50
    assert target_count(21, 1.5) == 32  # 31.5 -> 32
    assert target_count(40, 1.0) == 40


def test_intensity_ranges_stay_within_guide_bounds():
    for r in INTENSITY_RANGES.values():
        assert 0 < r.rotate_deg <= 5
        assert 0 < r.brightness <= 0.2
        assert 0 < r.contrast <= 0.1
        assert 0 < r.hue_deg <= 10
        assert 0.95 <= r.crop_min < 1
    light, medium, heavy = (INTENSITY_RANGES[k] for k in ("light", "medium", "heavy"))
    assert light.rotate_deg < medium.rotate_deg < heavy.rotate_deg == 5
    assert (
        heavy.brightness == 0.2 and heavy.contrast == 0.1 and heavy.hue_deg == 10 and heavy.crop_min == 0.95
    )


# --- one cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug")
    asym = next(c for c in CHARACTERS if not c.symmetric)  # flips would change its identity
    src = _make_cluster(root / "clusters", "cluster_003", asym.id, 6)
    cfg = AugmentConfig(intensity="heavy", seed=7)
    first = augment_cluster(src, root / "out1" / "cluster_003", cfg)
    second = augment_cluster(src, root / "out2" / "cluster_003", cfg)
    return src, root, cfg, first, second


def test_total_is_n_times_multiplier(augmented):
    src, root, cfg, first, _ = augmented
    assert first["multiplier"] == 7.6  # 6 images: between the 5-10 row's 8x (5) and 6x (10)
    assert first["total"] == 46 and first["originals"] == 6 and first["augmented"] == 40
    pngs = list((root / "out1" / "cluster_003").glob("*.png"))
    assert len(pngs) == 46


def test_augmentation_is_deterministic(augmented):
    _, root, _, _, _ = augmented
    h1, h2 = _hashes(root / "out1" / "cluster_003"), _hashes(root / "out2" / "cluster_003")
    h1.pop("augment_summary.json"), h2.pop("augment_summary.json")  # holds timings and paths
    assert h1 == h2


def test_different_seed_gives_different_images(augmented, tmp_path):
    src, root, cfg, _, _ = augmented
    augment_cluster(src, tmp_path / "c", cfg.model_copy(update={"seed": 8}))
    a = _hashes(root / "out1" / "cluster_003")
    b = _hashes(tmp_path / "c")
    changed = [k for k in b if "_aug" in k and a.get(k) != b[k]]
    assert len(changed) == 40


def test_alpha_is_preserved(augmented):
    src, root, _, _, _ = augmented
    rows = read_jsonl(root / "out1" / "cluster_003" / MANIFEST_NAME)
    for row in rows:
        if row["kind"] != "augmented":
            continue
        out = np.asarray(Image.open(root / "out1" / "cluster_003" / row["path"]))
        orig = np.asarray(Image.open(src / row["source"]))
        assert out.shape == orig.shape and out.dtype == np.uint8, row["path"]
        alpha = out[..., 3]
        opaque = alpha > 0
        # Not empty: the character keeps (almost) its area; crops enlarge by at most 1/0.95^2.
        ratio = opaque.sum() / (orig[..., 3] > 0).sum()
        assert 0.8 < ratio < 1.25, (row["path"], ratio)
        # Binary-ish: partial alpha only in a thin anti-aliased rim (3 px) along the 50 % contour, no haze.
        partial = (alpha > 10) & (alpha < 245)
        k = np.ones((7, 7), np.uint8)
        rim = (cv2.dilate((alpha < 128).astype(np.uint8), k) > 0) & (
            cv2.dilate((alpha >= 128).astype(np.uint8), k) > 0
        )
        assert not (partial & ~rim).any(), row["path"]
        assert partial.sum() / opaque.sum() < 0.2, row["path"]  # these layers are small: the rim is ~12 %
        # The transparent border of the layer stays transparent.
        border = np.concatenate(
            [alpha[:2].ravel(), alpha[-2:].ravel(), alpha[:, :2].ravel(), alpha[:, -2:].ravel()]
        )
        assert border.max() == 0, row["path"]


def test_colour_transforms_change_rgb_only():
    a = _layer(3, 0)
    out = apply_transform(
        a, {"color": {"brightness": 1.2, "contrast": 0.9, "hue_deg": 10.0}, "blur": {"sigma": 0.7}}
    )
    assert np.array_equal(out[..., 3], a[..., 3])
    assert not np.array_equal(out[..., :3], a[..., :3])


def test_hue_shift_preserves_colour_identity():
    a = _layer(3, 0)  # nyan: red body
    out = apply_transform(a, {"color": {"brightness": 1.0, "contrast": 1.0, "hue_deg": 10.0}})
    mask = a[..., 3] > 0
    body = (a[..., 0] > 200) & (a[..., 1] < 80) & mask
    assert body.sum() > 100
    r, g, b = (out[..., i][body].astype(int) for i in range(3))
    assert np.median(r) > 180 and np.median(g) < 110 and np.median(b) < 110  # still red


def test_every_output_records_source_and_transform(augmented):
    src, root, _, _, _ = augmented
    out = root / "out1" / "cluster_003"
    rows = read_jsonl(out / MANIFEST_NAME)
    by_path = {r["path"]: r for r in rows}
    assert set(by_path) == {p.name for p in out.glob("*.png")}
    for r in rows:
        source = src / r["source"]
        assert source.exists()
        assert r["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert isinstance(r["transform"], dict)
        if r["kind"] == "original":
            assert r["transform"] == {} and (out / r["path"]).read_bytes() == source.read_bytes()
        else:
            t = r["transform"]
            assert r["path"].startswith(Path(r["source"]).stem)
            assert abs(t["rotate"]["angle"]) <= 5
            assert 0.95 <= t["crop"]["frac"] <= 1
            assert 0.8 <= t["color"]["brightness"] <= 1.2 and 0.9 <= t["color"]["contrast"] <= 1.1
            assert abs(t["color"]["hue_deg"]) <= 10
            assert "hflip" not in t  # the character is not symmetric and flips were not allowed
    # The recorded parameters reproduce the image.
    r = next(r for r in rows if r["kind"] == "augmented")
    again = apply_transform(np.asarray(Image.open(src / r["source"])), r["transform"])
    assert np.array_equal(again, np.asarray(Image.open(out / r["path"])))


def test_flip_only_for_symmetric_or_allowed(tmp_path):
    whisp = next(c for c in CHARACTERS if c.name == "whisp")
    src = _make_cluster(tmp_path / "clusters", "cluster_001", whisp.id, 5)
    cfg = AugmentConfig(intensity="light")
    plain = augment_cluster(src, tmp_path / "a", cfg)
    sym = augment_cluster(src, tmp_path / "b", cfg, symmetric=True)
    allowed = augment_cluster(src, tmp_path / "c", cfg.model_copy(update={"allow_flip": True}))
    flips = [
        sum("hflip" in r["transform"] for r in read_jsonl(d / MANIFEST_NAME))
        for d in (tmp_path / "a", tmp_path / "b", tmp_path / "c")
    ]
    assert plain["total"] == sym["total"] == allowed["total"] == 40
    assert flips[0] == 0 and flips[1] > 5 and flips[2] == flips[1]


def test_symmetry_is_decided_per_character_by_config():
    cfg = AugmentConfig(symmetric={"1": True, "keita": False, "nyan": True})
    assert is_symmetric(cfg, "cluster_001") and is_symmetric(cfg, 1, "someone")
    assert is_symmetric(cfg, 3, "nyan") and not is_symmetric(cfg, 0, "keita")
    assert not is_symmetric(cfg, 2, "fumi")  # unlisted: never flipped
    assert not is_symmetric(AugmentConfig(), 1)


def test_resume_skips_complete_cluster_and_redoes_incomplete(augmented, tmp_path):
    src, _, cfg, _, _ = augmented
    out = tmp_path / "cluster_003"
    augment_cluster(src, out, cfg)
    again = augment_cluster(src, out, cfg)
    assert again["status"] == "resumed"
    victim = next(out.glob("*_aug003.png"))
    data = victim.read_bytes()
    victim.unlink()
    redone = augment_cluster(src, out, cfg)
    assert redone["status"] == "augmented" and victim.read_bytes() == data
    # A different intensity is a different plan (same count, other transforms): the cluster is redone.
    light = augment_cluster(src, out, cfg.model_copy(update={"intensity": "light"}))
    assert light["status"] == "augmented" and light["total"] == 46 and victim.read_bytes() != data
    # A plan without augmentation removes the stale augmented images.
    plain = augment_cluster(src, out, cfg.model_copy(update={"max_original": 5}))
    assert plain["status"] == "copied" and len(list(out.glob("*.png"))) == 6


def test_clusters_outside_range_copied_unchanged_and_bad_images_reported(tmp_path):
    clusters = tmp_path / "clusters"
    _make_cluster(clusters, "cluster_000", 5, 3)  # below min_original
    big = clusters / "cluster_001"
    big.mkdir(parents=True)
    small = _layer(6, 0)[::4, ::4]
    for k in range(31):  # above max_original
        Image.fromarray(np.roll(small, k, axis=1), "RGBA").save(big / f"x{k:02d}.png")
    mid = _make_cluster(clusters, "cluster_002", 8, 5)
    (mid / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (clusters / "noise").mkdir()
    Image.fromarray(small, "RGBA").save(clusters / "noise" / "n.png")

    summary = augment_clusters(clusters, tmp_path / "out", AugmentConfig(intensity="medium"))
    res = {r["cluster"]: r for r in summary["results"]}
    assert set(res) == {"cluster_000", "cluster_001", "cluster_002"}
    assert res["cluster_000"]["status"] == "copied" and res["cluster_001"]["status"] == "copied"
    for name in ("cluster_000", "cluster_001"):
        src_h = _hashes(clusters / name)
        out_h = {k: v for k, v in _hashes(tmp_path / "out" / name).items() if k.endswith(".png")}
        assert out_h == src_h
    assert res["cluster_002"]["total"] == 40  # 5 readable images x 8 (the guide: 5 -> 40-60)
    assert summary["failed"] == [dict(res["cluster_002"]["failed"][0], cluster="cluster_002")]
    assert summary["failed"][0]["name"] == "broken.png" and "unreadable" in summary["failed"][0]["problem"]
    assert json.loads((tmp_path / "out" / "augment_summary.json").read_text())["total"] == 3 + 31 + 40
    again = augment_clusters(clusters, tmp_path / "out", AugmentConfig(intensity="medium"))
    assert again["resumed_clusters"] == 3


def test_selection_and_analysis_pick_clusters_and_flips(tmp_path):
    clusters = tmp_path / "clusters"
    _make_cluster(clusters, "cluster_000", 1, 5)
    _make_cluster(clusters, "cluster_004", 2, 5)
    selection = {
        "version": 1,
        "characters": [{"cluster": 4, "name": "fumi", "trigger": "fumi", "type": "human"}],
    }
    analysis = {"clusters": [{"id": 4, "folder": "cluster_004", "type": "human", "symmetric": True}]}
    summary = augment_clusters(
        clusters, tmp_path / "out", AugmentConfig(), analysis=analysis, selection=selection
    )
    assert [r["cluster"] for r in summary["results"]] == ["cluster_004"]
    assert summary["results"][0]["symmetric"] is True
    assert not (tmp_path / "out" / "cluster_000").exists()
