"""Background LoRA data: near-duplicates removed, most diverse kept, captions, kohya configs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.unit import kohya_rules
from yokai_pipeline.backgrounds import (
    caption_background,
    dedup_embeddings,
    farthest_point_sampling,
    prepare_backgrounds,
)
from yokai_pipeline.config import BackgroundConfig, PackagingConfig
from yokai_pipeline.synthetic import paint_backgrounds
from yokai_pipeline.validation import validate_training_data

SCENES = 4
# the painted test layers are 180x320 (the last test's 64x64): below the guide's 512 px minimum
LOW_RES_OK = PackagingConfig(min_resolution=0)


@pytest.fixture(scope="module")
def layers(tmp_path_factory) -> Path:
    """Per scene: 3 near-identical layers (pans of 0/3/6 px + noise) and one from the far end of the pan."""
    root = tmp_path_factory.mktemp("bg") / "layered_frames" / "background"
    rng = np.random.default_rng(0)
    for k, bg in enumerate(paint_backgrounds(180, 320, seed=0)[:SCENES]):
        ep = root / f"ep{k:02d}"
        ep.mkdir(parents=True)
        for i, off in enumerate((0, 3, 6, 190)):
            crop = bg[:, off : off + 320].astype(np.int16) + rng.integers(-3, 4, size=(180, 320, 3))
            Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(ep / f"ep{k:02d}_f{i:06d}.png")
    return root


def _scene_and_pan(source: str) -> tuple[int, int]:
    p = Path(source)
    return int(p.parent.name[2:]), int(p.stem.split("_f")[1])


def test_near_duplicates_removed_and_scenes_kept(layers, tmp_path):
    cfg = BackgroundConfig(repeat_count=10, max_backgrounds=500, similarity_threshold=0.95)
    summary = prepare_backgrounds(layers, tmp_path / "backgrounds", cfg, packaging=LOW_RES_OK)
    assert summary["input_images"] == SCENES * 4
    kept = [_scene_and_pan(r["source"]) for r in summary["files"]]
    # each scene's three small pans collapse to one; every scene survives
    assert {s for s, _ in kept} == set(range(SCENES))
    for scene in range(SCENES):
        small_pans = [i for s, i in kept if s == scene and i < 3]
        assert len(small_pans) == 1, kept
    assert summary["duplicates_removed"] >= 2 * SCENES
    assert summary["kept"] == len(summary["files"]) == summary["after_dedup"]


def test_max_backgrounds_keeps_the_most_diverse(layers, tmp_path):
    cfg = BackgroundConfig(max_backgrounds=SCENES, similarity_threshold=0.999)
    summary = prepare_backgrounds(layers, tmp_path / "backgrounds", cfg, packaging=LOW_RES_OK)
    kept = [_scene_and_pan(r["source"]) for r in summary["files"]]
    assert len(kept) == SCENES and {s for s, _ in kept} == set(
        range(SCENES)
    )  # one per scene, not 4 pans of one


def test_embed_fn_is_used_and_threshold_applies(tmp_path):
    folder = tmp_path / "bg"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 60, 100, 200)).save(folder / f"b{i}.png")
    vecs = np.array([[1, 0, 0], [0.96, 0.28, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    calls = []

    def embed(paths, errors):
        calls.append([p.name for p in paths])
        return vecs[[int(p.stem[1]) for p in paths]]

    strict = prepare_backgrounds(
        folder,
        tmp_path / "o1",
        BackgroundConfig(similarity_threshold=0.95),
        embed_fn=embed,
        packaging=LOW_RES_OK,
    )
    assert calls and strict["kept"] == 3  # b1 is 0.96 similar to b0
    assert sorted(Path(r["source"]).name for r in strict["files"]) == ["b0.png", "b2.png", "b3.png"]
    loose = prepare_backgrounds(
        folder,
        tmp_path / "o2",
        BackgroundConfig(similarity_threshold=0.97),
        embed_fn=embed,
        packaging=LOW_RES_OK,
    )
    assert loose["kept"] == 4 and len(calls) == 2  # one embedding call per run: one decode per image


def _greedy_reference(emb: np.ndarray, threshold: float) -> list[int]:
    """The guide's dedup written the slow, obvious way: keep a row unless a kept row is that similar."""
    kept: list[int] = []
    for i in range(len(emb)):
        if all(float(emb[i] @ emb[j]) < threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_dedup_equals_the_greedy_rule(block):
    from yokai_pipeline.backgrounds import dedup_indexed

    rng = np.random.default_rng(3)
    base = rng.normal(size=(60, 16)).astype(np.float32)
    # near-copies of earlier rows, some within one block, some across blocks
    noisy = base[rng.integers(0, 60, size=140)] + rng.normal(scale=0.12, size=(140, 16)).astype(np.float32)
    emb = np.concatenate([base, noisy])[rng.permutation(200)]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for threshold in (0.9, 0.95, 0.99):
        expected = _greedy_reference(emb, threshold)
        assert dedup_embeddings(emb, threshold, block=block) == expected
        assert dedup_embeddings(emb, threshold, exact_max=0) == dedup_indexed(emb, threshold) == expected
        assert 60 <= len(expected) < 200 or threshold == 0.99


def test_indexed_dedup_finds_pairs_right_at_the_threshold():
    from yokai_pipeline.backgrounds import dedup_exact, dedup_indexed

    rng = np.random.default_rng(5)
    dim, n_pairs = 512, 2000
    base = rng.normal(size=(4000, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    # a partner at cosine 0.951 for the first 2000 rows: u = c * v + sqrt(1 - c^2) * w, w orthogonal to v
    v = base[:n_pairs]
    w = rng.normal(size=(n_pairs, dim)).astype(np.float32)
    w -= (w * v).sum(axis=1, keepdims=True) * v
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    partners = 0.951 * v + np.sqrt(1 - 0.951**2) * w
    emb = np.concatenate([base, partners.astype(np.float32)])
    assert np.allclose((emb[:n_pairs] * emb[4000:]).sum(axis=1), 0.951, atol=1e-4)
    kept = dedup_indexed(emb, 0.95)
    assert kept == dedup_exact(emb, 0.95) == list(range(4000))  # every planted partner found


def test_low_resolution_backgrounds_are_left_out_and_listed(layers, tmp_path):
    summary = prepare_backgrounds(layers, tmp_path / "o", BackgroundConfig(), packaging=PackagingConfig())
    assert summary["kept"] == 0 and len(summary["low_resolution"]) == SCENES * 4
    assert "shorter side 180 px < min_resolution 512" in summary["low_resolution"][0]["problem"]


def test_configured_embedder_is_clip_when_configured(monkeypatch):
    from yokai_pipeline import backgrounds, embedding
    from yokai_pipeline.config import EmbeddingConfig

    assert backgrounds.configured_embed_fn(EmbeddingConfig()) is backgrounds.embed_backgrounds
    seen = {}

    class FakeClip:
        def embed(self, paths, errors):
            seen["paths"] = paths
            return np.ones((len(paths), 4), np.float32)

    monkeypatch.setattr(embedding, "get_embedder", lambda cfg: seen.setdefault("cfg", cfg) and FakeClip())
    fn = backgrounds.configured_embed_fn(EmbeddingConfig(backend="clip", model="ViT-B-16"))
    assert fn([Path("a.png")], []).shape == (1, 4)
    assert seen["cfg"].backend == "clip" and seen["cfg"].model == "ViT-B-16"


def test_fps_and_dedup_units():
    emb = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]
    assert dedup_embeddings(emb, 0.95) == [0, 2, 3]
    pts = np.array([[1, 0], [0.99, 0.141], [0, 1], [-1, 0]], dtype=np.float32)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    chosen = farthest_point_sampling(pts, 3)
    assert len(chosen) == 3 and not {0, 1} <= set(chosen)  # never both of the two close points


def test_configs_captions_and_validation(layers, tmp_path):
    out = tmp_path / "training_data" / "backgrounds"
    cfg = BackgroundConfig(repeat_count=7, trigger="yw_bg\n[x]")
    # upscaling only because it is configured, and recorded per image
    summary = prepare_backgrounds(layers, out, cfg, packaging=PackagingConfig(upscale_to=512))
    assert summary["upscaled_images"] == summary["kept"] and summary["low_resolution"] == []
    assert all(r["upscaled"] and r["source_size"] == [320, 180] for r in summary["files"])
    folder = Path(summary["image_dir"])
    assert folder.name == "7_background" and folder.parent == out.resolve()
    assert kohya_rules.check_config_files(summary["config"]) == []
    args = tomllib.loads(Path(summary["config"]).read_text())
    flat = {k: v for sec in args.values() for k, v in sec.items()}
    assert flat["unet_lr"] == 5e-5 and flat["text_encoder_lr"] == 1e-5 and flat["network_dim"] == 32
    assert "masked_loss" not in flat  # opaque backgrounds
    assert flat["output_dir"] == str((tmp_path / "trained_models" / "backgrounds").resolve())
    ds = tomllib.loads(Path(summary["dataset_config"]).read_text())
    assert ds["datasets"][0]["subsets"][0]["num_repeats"] == 7
    for txt in folder.glob("*.txt"):
        caption = txt.read_text().strip()
        assert caption.startswith(summary["trigger"] + ", ") and ("scene" in caption)
    assert "\n" not in summary["trigger"]
    report = validate_training_data(out, min_resolution=512)
    assert report["passed"] and report["total_images"] == summary["kept"]


def test_caption_reads_colours():
    sky = np.zeros((90, 160, 3), np.uint8)
    sky[:45] = (90, 160, 240)
    sky[45:] = (60, 170, 60)
    assert caption_background(Image.fromarray(sky), "bg") == (
        "bg, outdoor scene, blue sky, green ground, soft lighting, no humans"
    )


def test_unreadable_layer_is_skipped(tmp_path):
    folder = tmp_path / "bg"
    folder.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / "ok.png")
    (folder / "bad.png").write_bytes(b"not a png")
    summary = prepare_backgrounds(folder, tmp_path / "o", BackgroundConfig(), packaging=LOW_RES_OK)
    assert summary["kept"] == 1 and [Path(s["path"]).name for s in summary["skipped"]] == ["bad.png"]


def test_cli_prepare_backgrounds(layers, tmp_path):
    from yokai_pipeline.cli import app

    out = tmp_path / "bgdata"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[packaging]\nmin_resolution = 0\n")
    res = CliRunner().invoke(
        app,
        [
            "prepare-backgrounds",
            str(layers),
            "--config",
            str(cfg),
            "--output-dir",
            str(out),
            "--repeat-count",
            "10",
            "--max-backgrounds",
            "3",
            "--similarity-threshold",
            "0.95",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (
        "Kept (most diverse): 3" in res.output
        and "accelerate launch train_network.py --config_file" in res.output
    )
    assert len(list((out / "10_background").glob("*.png"))) == 3
    bad = CliRunner().invoke(app, ["prepare-backgrounds", str(layers), "--embedder", "dino"])
    assert bad.exit_code == 2
