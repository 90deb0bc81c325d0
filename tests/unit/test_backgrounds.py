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
    summary = prepare_backgrounds(layers, tmp_path / "backgrounds", cfg)
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
    summary = prepare_backgrounds(layers, tmp_path / "backgrounds", cfg)
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

    def embed(paths):
        calls.append([p.name for p in paths])
        return vecs[[int(p.stem[1]) for p in paths]]

    strict = prepare_backgrounds(
        folder, tmp_path / "o1", BackgroundConfig(similarity_threshold=0.95), embed_fn=embed
    )
    assert calls and strict["kept"] == 3  # b1 is 0.96 similar to b0
    assert sorted(Path(r["source"]).name for r in strict["files"]) == ["b0.png", "b2.png", "b3.png"]
    loose = prepare_backgrounds(
        folder, tmp_path / "o2", BackgroundConfig(similarity_threshold=0.97), embed_fn=embed
    )
    assert loose["kept"] == 4


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
    summary = prepare_backgrounds(layers, out, cfg, packaging=PackagingConfig())
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
    summary = prepare_backgrounds(folder, tmp_path / "o", BackgroundConfig())
    assert summary["kept"] == 1 and [Path(s["path"]).name for s in summary["skipped"]] == ["bad.png"]


def test_cli_prepare_backgrounds(layers, tmp_path):
    from yokai_pipeline.cli import app

    out = tmp_path / "bgdata"
    res = CliRunner().invoke(
        app,
        [
            "prepare-backgrounds",
            str(layers),
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
