"""Embedding backends and the per-episode embedding stage, on rendered sample characters.

CLIP is tested with tiny random models built from an open_clip config (nothing downloaded).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from yokai_pipeline.config import EmbeddingConfig
from yokai_pipeline.embedding import (
    OFFLINE_DIM,
    composite_on_background,
    describe_layer,
    embed_layers,
    get_embedder,
    load_embeddings,
    sidecar_path,
)
from yokai_pipeline.errors import BadInputError, ConfigError
from yokai_pipeline.fsio import save_image, write_jsonl
from yokai_pipeline.synthetic import CHARACTERS, render_character
from yokai_pipeline.workspace import Workspace

TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_clip")
    (d / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    return d


def clip_cfg(model_dir, **kw) -> EmbeddingConfig:
    base = dict(backend="clip", model=f"local-dir:{model_dir}", pretrained=None, device="cpu", num_workers=0)
    return EmbeddingConfig(**{**base, **kw})


def crops(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = render_character(
            i % len(CHARACTERS),
            scale=float(rng.uniform(0.4, 1.4)),
            facing=int(rng.choice([-1, 1])),
            pose=float(rng.uniform()),
        )
        out.append(Image.fromarray(arr, "RGBA"))
    return out


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- offline


def test_offline_same_character_across_scale_facing_pose_is_closer_than_other_characters():
    rng = np.random.default_rng(1)
    vecs = {
        cid: [
            describe_layer(
                render_character(cid, scale=float(rng.uniform(0.4, 1.6)), facing=f, pose=float(rng.uniform()))
            )
            for f in (-1, 1, -1, 1)
        ]
        for cid in range(len(CHARACTERS))
    }
    worst_same = min(cos(a, b) for v in vecs.values() for a in v for b in v)
    best_other = max(
        cos(a, b) for c1, v1 in vecs.items() for c2, v2 in vecs.items() if c1 < c2 for a in v1 for b in v2
    )
    assert worst_same > best_other + 0.1, (worst_same, best_other)


def test_offline_embedder_output_is_unit_norm_float32_and_accepts_paths(tmp_path):
    images = crops(5)
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"c{i}.png")
        im.save(paths[-1])
    emb = get_embedder(EmbeddingConfig(backend="offline", num_workers=2))
    a = emb.embed(images)
    b = emb.embed(str(p) for p in paths)
    assert a.shape == (5, OFFLINE_DIM) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-6)  # PNG round trip is lossless


def test_offline_bad_file_raises_naming_it_or_yields_zero_row_without_losing_the_rest(tmp_path):
    good = crops(3)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    transparent = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    emb = get_embedder(EmbeddingConfig(backend="offline"))
    with pytest.raises(BadInputError, match="broken.png"):
        emb.embed([good[0], bad])
    errors: list = []
    out = emb.embed([good[0], bad, good[1], transparent, good[2]], errors=errors)
    assert [i for i, _ in errors] == [1, 3]
    assert "broken.png" in errors[0][1] and "opaque" in errors[1][1]
    assert np.all(out[[1, 3]] == 0)
    np.testing.assert_allclose(np.linalg.norm(out[[0, 2, 4]], axis=1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- clip


def test_clip_shapes_norms_and_batch_size_invariance(tiny_clip_dir):
    images = crops(10)
    one = get_embedder(clip_cfg(tiny_clip_dir, batch_size=1)).embed(images)
    seven = get_embedder(clip_cfg(tiny_clip_dir, batch_size=7)).embed(images)
    assert one.shape == (10, 32) and one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one, seven, atol=1e-5)
    assert np.abs(one[0] - one[1]).max() > 1e-3  # different images, different rows


def test_clip_composites_rgba_on_grey_and_workers_give_the_same_rows(tiny_clip_dir, tmp_path):
    rgba = crops(4)
    flat = [composite_on_background(im) for im in rgba]
    assert flat[0].mode == "RGB" and flat[0].getpixel((0, 0)) == (128, 128, 128)  # corner is transparent
    paths = []
    for i, im in enumerate(rgba):
        paths.append(tmp_path / f"l{i}.png")
        im.save(paths[-1])
    inline = get_embedder(clip_cfg(tiny_clip_dir, batch_size=3)).embed(rgba)
    np.testing.assert_allclose(inline, get_embedder(clip_cfg(tiny_clip_dir)).embed(flat), atol=1e-5)
    workers = get_embedder(clip_cfg(tiny_clip_dir, batch_size=3, num_workers=2)).embed(paths)
    np.testing.assert_allclose(inline, workers, atol=1e-5)


def test_clip_bad_file_is_named_or_skipped(tiny_clip_dir, tmp_path):
    bad = tmp_path / "nope.png"
    bad.write_bytes(b"\x89PNG broken")
    emb = get_embedder(clip_cfg(tiny_clip_dir, batch_size=2))
    with pytest.raises(BadInputError, match="nope.png"):
        emb.embed([crops(1)[0], bad])
    errors: list = []
    out = emb.embed([*crops(2), bad], errors=errors)
    assert [i for i, _ in errors] == [2] and np.all(out[2] == 0)
    np.testing.assert_allclose(np.linalg.norm(out[:2], axis=1), 1.0, atol=1e-5)


def test_clip_model_is_loaded_once_per_process(tiny_clip_dir):
    a = get_embedder(clip_cfg(tiny_clip_dir))
    b = get_embedder(clip_cfg(tiny_clip_dir, batch_size=5))
    assert a.bundle is b.bundle


def test_clip_unknown_model_or_tag_is_a_config_error_without_downloading():
    with pytest.raises(ConfigError, match="not an open_clip model"):
        get_embedder(EmbeddingConfig(backend="clip", model="ViT-Nope-99", pretrained=None, device="cpu"))
    with pytest.raises(ConfigError, match="neither a tag"):
        get_embedder(
            EmbeddingConfig(backend="clip", model="ViT-B-32", pretrained="no_such_tag", device="cpu")
        )


@pytest.mark.slow
def test_clip_vit_b32_random_weights_small_batch():
    out = get_embedder(
        EmbeddingConfig(backend="clip", model="ViT-B-32", pretrained=None, device="cpu", batch_size=2)
    ).embed(crops(3))
    assert out.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.gpu
def test_clip_on_cuda_bf16_matches_cpu_fp32(tiny_clip_dir):
    images = crops(16)
    cpu_embedder = get_embedder(clip_cfg(tiny_clip_dir))
    gpu_embedder = get_embedder(clip_cfg(tiny_clip_dir, device="cuda", batch_size=8, num_workers=2))
    # random weights are drawn per load: give the CUDA model the CPU model's weights
    gpu_embedder.bundle.model.load_state_dict(cpu_embedder.bundle.model.state_dict())
    cpu = cpu_embedder.embed(images)
    gpu = gpu_embedder.embed(images)
    assert gpu.dtype == np.float32
    assert np.min(np.sum(cpu * gpu, axis=1)) > 0.99  # bf16 autocast: close, not equal


# ----------------------------------------------------------------------------- stage


def make_episode(
    ws: Workspace, episode_id: str, n: int, seed: int = 0, broken: int | None = None
) -> list[dict]:
    """A layer manifest of ``n`` character crops (+ a background row per frame)."""
    rows = []
    for i, im in enumerate(crops(n, seed)):
        layer_id = f"{episode_id}_f{i:06d}_i00"
        rel = f"layered_frames/character/{episode_id}/{layer_id}.png"
        if i == broken:
            ws.abs(rel).parent.mkdir(parents=True, exist_ok=True)
            ws.abs(rel).write_bytes(b"garbage")
        else:
            save_image(ws.abs(rel), im)
        rows.append(
            {
                "layer_id": layer_id,
                "kind": "character",
                "episode": f"{episode_id}.mp4",
                "episode_id": episode_id,
                "frame_index": i,
                "shot_id": 0,
                "box": [0, 0, im.width, im.height],
                "area": 1,
                "path": rel,
            }
        )
        rows.append(
            {
                "layer_id": f"{episode_id}_f{i:06d}_bg",
                "kind": "background",
                "episode": f"{episode_id}.mp4",
                "episode_id": episode_id,
                "frame_index": i,
                "shot_id": 0,
                "box": [0, 0, 640, 360],
                "area": 0,
                "path": f"layered_frames/background/{episode_id}/{episode_id}_f{i:06d}.png",
            }
        )
    write_jsonl(ws.layers_manifest(episode_id), rows)
    return [r for r in rows if r["kind"] == "character"]


def test_embed_layers_writes_aligned_npy_and_sidecar_then_skips_when_cached(tmp_path):
    ws = Workspace(tmp_path)
    rows = make_episode(ws, "ep01", 6)
    cfg = EmbeddingConfig(backend="offline")
    stats = embed_layers(ws, "ep01", cfg)
    assert (
        stats["n"] == 6 and stats["dim"] == OFFLINE_DIM and not stats["cached"] and stats["images_per_s"] > 0
    )
    X, meta = load_embeddings(ws, "ep01")
    assert X.shape == (6, OFFLINE_DIM)
    assert meta["layer_ids"] == [r["layer_id"] for r in rows]
    assert meta["backend"] == "offline" and meta["dim"] == OFFLINE_DIM and meta["config_hash"]
    # row i is the i-th character row's image
    np.testing.assert_allclose(
        X[4], describe_layer(np.asarray(Image.open(ws.abs(rows[4]["path"])))), atol=1e-6
    )

    mtime = ws.embeddings_path("ep01").stat().st_mtime_ns
    again = embed_layers(ws, "ep01", cfg.model_copy(update={"batch_size": 3, "num_workers": 0}))
    assert again["cached"] and ws.embeddings_path("ep01").stat().st_mtime_ns == mtime
    assert not [p for p in os.listdir(ws.root / "embeddings") if p.startswith(".tmp-")]


def test_embed_layers_recomputes_when_the_manifest_changes(tmp_path):
    ws = Workspace(tmp_path)
    make_episode(ws, "ep01", 4)
    embed_layers(ws, "ep01", EmbeddingConfig())
    make_episode(ws, "ep01", 5)
    stats = embed_layers(ws, "ep01", EmbeddingConfig())
    assert not stats["cached"] and load_embeddings(ws, "ep01")[0].shape[0] == 5


def test_embed_layers_keeps_going_past_a_broken_layer(tmp_path):
    ws = Workspace(tmp_path)
    make_episode(ws, "ep01", 5, broken=2)
    stats = embed_layers(ws, "ep01", EmbeddingConfig())
    assert [f["layer_id"] for f in stats["failed"]] == ["ep01_f000002_i00"]
    X, meta = load_embeddings(ws, "ep01")
    assert np.all(X[2] == 0) and np.all(np.linalg.norm(X[[0, 1, 3, 4]], axis=1) > 0.99)
    assert json.loads(sidecar_path(ws, "ep01").read_text())["failed"][0]["layer_id"] == "ep01_f000002_i00"


def test_embed_layers_missing_manifest_names_it(tmp_path):
    with pytest.raises(BadInputError, match="ep09.jsonl"):
        embed_layers(Workspace(tmp_path), "ep09", EmbeddingConfig())


def test_embed_layers_with_clip_records_the_model(tiny_clip_dir, tmp_path):
    ws = Workspace(tmp_path)
    make_episode(ws, "ep01", 3)
    cfg = clip_cfg(tiny_clip_dir, batch_size=2)
    stats = embed_layers(ws, "ep01", cfg)
    X, meta = load_embeddings(ws, "ep01")
    assert stats["dim"] == 32 and X.shape == (3, 32)
    assert meta["backend"] == "clip" and meta["model"] == cfg.model
