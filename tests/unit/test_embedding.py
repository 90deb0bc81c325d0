"""Embedding backends and the per-episode embedding stage, on rendered sample characters.

CLIP is tested with tiny random models built from an open_clip config (nothing downloaded).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yokai_pipeline import embedding
from yokai_pipeline.config import EmbeddingConfig
from yokai_pipeline.embedding import (
    OFFLINE_DIM,
    composite_on_background,
    describe_layer,
    embed_layers,
    get_embedder,
    load_embeddings,
    shutdown_decode_pools,
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


def soft_layer(w: int, h: int, seed: int) -> Image.Image:
    """A ``w`` x ``h`` RGBA layer with a soft matte edge and grain, like a segmented video frame."""
    import cv2

    rng = np.random.default_rng(seed)
    rgba = cv2.resize(
        render_character(seed % len(CHARACTERS), scale=2.0), (w, h), interpolation=cv2.INTER_LINEAR
    )
    rgba[..., 3] = cv2.GaussianBlur(rgba[..., 3], (5, 5), 1.5)
    rgba[..., :3] = np.clip(rgba[..., :3] + rng.normal(0, 3, rgba[..., :3].shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


LAYER_SHAPES = [(150, 420), (600, 170), (40, 70), (1300, 900), (224, 224), (225, 500), (3, 400)]


@pytest.mark.parametrize(
    ("resize_mode", "interpolation", "size"),
    [("shortest", "bicubic", 224), ("shortest", "bicubic", 336), ("squash", "bilinear", 256)],
)
def test_clip_fast_preprocessing_matches_open_clip_pil_transform(resize_mode, interpolation, size):
    """The decode workers' one-call resize + crop against open_clip's own eval transform.

    ("shortest", "bicubic", 224) is ViT-B-32's (and ViT-L-14's) preprocess; squash + bilinear
    is the SigLIP family's. Pixels may differ only where Pillow picks another order for its
    two resampling passes (a uint8 rounding at hard edges).
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from yokai_pipeline.models.clip import resize_plan, split_preprocess

    pp = PreprocessCfg(size=size, interpolation=interpolation, resize_mode=resize_mode)
    pil_transform, mean, std = split_preprocess(image_transform_v2(pp, is_train=False))
    assert mean == pp.mean and std == pp.std
    plan = resize_plan(pil_transform)
    assert plan is not None
    for i, (w, h) in enumerate(LAYER_SHAPES):
        layer = soft_layer(w, h, i)
        ref = np.asarray(pil_transform(composite_on_background(layer)), dtype=np.int16)
        got = embedding._preprocess(layer, plan, None, (size, size)).astype(np.int16)
        assert got.shape == ref.shape == (size, size, 3)
        diff = np.abs(got - ref)
        assert diff.mean() < 0.5 and (diff > 2).mean() < 0.005 and diff.max() <= 24, (
            (w, h),
            diff.mean(),
            diff.max(),
        )


def test_clip_preprocess_that_the_plan_cannot_express_falls_back_to_open_clip(tmp_path):
    """resize_mode 'longest' (ResizeKeepRatio + CenterCropOrPad): the workers run the PIL transform."""
    from yokai_pipeline.models.clip import load_clip

    d = tmp_path / "longest"
    d.mkdir()
    cfg_json = json.loads(json.dumps(TINY_CLIP))
    cfg_json["preprocess_cfg"]["resize_mode"] = "longest"
    (d / "open_clip_config.json").write_text(json.dumps(cfg_json))
    bundle = load_clip(f"local-dir:{d}", None, "cpu")
    assert bundle.resize_plan is None
    layers = [soft_layer(w, h, i) for i, (w, h) in enumerate(LAYER_SHAPES[:4])]
    paths = []
    for i, im in enumerate(layers):
        paths.append(tmp_path / f"l{i}.png")
        im.save(paths[-1])
    emb = get_embedder(clip_cfg(d, batch_size=3))
    with contextlib.closing(emb.pixel_batches(layers)) as batches:
        pixels = np.concatenate([p.copy() for _, p, _ in batches])
    for im, got in zip(layers, pixels, strict=True):
        np.testing.assert_array_equal(got, np.asarray(bundle.pil_transform(composite_on_background(im))))
    inline = emb.embed(layers)
    np.testing.assert_allclose(
        get_embedder(clip_cfg(d, batch_size=3, num_workers=2)).embed(paths), inline, atol=1e-5
    )


class _KillsTheWorker:
    """Unpickling this in a decode worker ends that process, as the OOM killer would."""

    def __reduce__(self):
        return (os._exit, (3,))


def _png_files(folder: Path, n: int) -> tuple[list[Path], Path]:
    """``n`` layer crops saved as PNG files, and a broken PNG next to them."""
    paths = []
    for i, im in enumerate(crops(n)):
        paths.append(folder / f"c{i}.png")
        im.save(paths[-1])
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    return paths, bad


def test_clip_decode_pool_is_reused_and_survives_bad_files_and_dead_workers(tiny_clip_dir, tmp_path):
    paths, bad = _png_files(tmp_path, 8)
    ref = get_embedder(clip_cfg(tiny_clip_dir, batch_size=3)).embed(paths)
    emb = get_embedder(clip_cfg(tiny_clip_dir, batch_size=3, num_workers=2))
    np.testing.assert_allclose(emb.embed(paths), ref, atol=1e-5)
    pids = [p.pid for p in embedding._decode_pool(2).procs]

    # A bad file aborts the call mid-stream; the tasks still running are waited for, so the next
    # call on the same workers is not fed stale rows.
    with pytest.raises(BadInputError, match="broken.png"):
        emb.embed([*paths[:4], bad, *paths[4:]])
    np.testing.assert_allclose(emb.embed(paths), ref, atol=1e-5)
    assert [p.pid for p in embedding._decode_pool(2).procs] == pids  # same processes, no restart

    # A worker dying mid-call is an error, not a hang; the next call gets a fresh pool.
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="died"):
        emb.embed([*paths, _KillsTheWorker()])
    assert time.monotonic() - t0 < 30
    np.testing.assert_allclose(emb.embed(paths), ref, atol=1e-5)
    # ... and so does one killed between calls
    os.kill(embedding._decode_pool(2).procs[0].pid, signal.SIGKILL)
    embedding._decode_pool(2).procs[0].join(10)
    np.testing.assert_allclose(emb.embed(paths), ref, atol=1e-5)

    procs = embedding._decode_pool(2).procs
    shutdown_decode_pools()
    assert not any(p.is_alive() for p in procs)
    np.testing.assert_allclose(emb.embed(paths), ref, atol=1e-5)  # restarts on demand
    shutdown_decode_pools()


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


@pytest.mark.gpu
def test_clip_on_cuda_from_png_files_through_the_decode_pool(tiny_clip_dir, tmp_path):
    """Pinned staging, asynchronous copies and the copy throttle over several batches, with a bad file."""
    paths, bad = _png_files(tmp_path, 20)
    cpu_embedder = get_embedder(clip_cfg(tiny_clip_dir))
    gpu_embedder = get_embedder(clip_cfg(tiny_clip_dir, device="cuda", batch_size=4, num_workers=2))
    gpu_embedder.bundle.model.load_state_dict(cpu_embedder.bundle.model.state_dict())
    cpu = cpu_embedder.embed(paths)
    errors: list = []
    gpu = gpu_embedder.embed([*paths[:7], bad, *paths[7:]], errors=errors)
    assert [i for i, _ in errors] == [7] and not gpu[7].any()
    gpu = np.delete(gpu, 7, axis=0)
    assert np.min(np.sum(cpu * gpu, axis=1)) > 0.99
    with pytest.raises(BadInputError, match="broken.png"):
        gpu_embedder.embed([*paths, bad])
    again = gpu_embedder.embed(paths)  # same pool after an aborted call; batches now split differently
    assert np.min(np.sum(again * gpu, axis=1)) > 0.999


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


def test_embed_layers_recomputes_when_a_layer_image_changes_under_the_same_id(tmp_path):
    """A video replaced under the same name gives layers with the same ids and new pixels."""
    ws = Workspace(tmp_path)
    rows = make_episode(ws, "ep01", 4)
    embed_layers(ws, "ep01", EmbeddingConfig())
    before = load_embeddings(ws, "ep01")[0]
    Image.open(ws.abs(rows[0]["path"])).transpose(Image.Transpose.ROTATE_90).save(ws.abs(rows[0]["path"]))
    stats = embed_layers(ws, "ep01", EmbeddingConfig())
    after = load_embeddings(ws, "ep01")[0]
    assert not stats["cached"]
    assert not np.allclose(after[0], before[0]) and np.allclose(after[1:], before[1:])
    assert embed_layers(ws, "ep01", EmbeddingConfig())["cached"]


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


def _graded(rgba: np.ndarray, tint: np.ndarray) -> np.ndarray:
    out = rgba.copy()
    out[..., :3] = (rgba[..., :3].astype(np.float32) * tint).astype(np.uint8)
    return out


def _day_frame(seed: int) -> np.ndarray:
    """A frame of flat paint with a white sign whose size varies (content moves the white point)."""
    rng = np.random.default_rng(seed)
    frame = np.full((180, 320, 3), 90, np.uint8)
    for _ in range(30):
        x, y = rng.integers(0, 300), rng.integers(0, 165)
        frame[y : y + rng.integers(10, 40), x : x + rng.integers(10, 60)] = rng.integers(40, 230, 3)
    frame[5:35, 5 : 55 + int(rng.integers(0, 20))] = 250
    return frame


def test_scene_balance_gives_night_shots_one_gain_and_leaves_day_shots_as_drawn():
    from yokai_pipeline.synthetic import NIGHT_TINT

    whites = {
        ("ep01", s): [embedding.white_point(_day_frame(10 * s + k)) for k in range(3)] for s in range(3)
    }
    for s in range(3, 6):  # the same kind of content under the night grade
        whites[("ep01", s)] = [
            embedding.white_point(_graded(_day_frame(10 * s + k), NIGHT_TINT)) for k in range(3)
        ]
    gains = embedding.scene_gains(whites, 1.5)
    assert all(gains[("ep01", s)] is None for s in range(3)), "near-neutral day shots keep their colours"
    night = [gains[("ep01", s)] for s in range(3, 6)]
    assert all(g is not None and np.array_equal(g, night[0]) for g in night), "one lighting, one gain"
    np.testing.assert_allclose(night[0], 255 / (250 * NIGHT_TINT), rtol=0.05)
    assert all(g is None for g in embedding.scene_gains(whites, 1e9).values())


def test_scene_balance_restores_the_gaps_between_characters_under_a_night_grade():
    """As drawn, the night grade pulls different characters' colours together; balanced by the
    shot's gain, they are as far apart as by day and each is closest to its own day self."""
    from yokai_pipeline.synthetic import NIGHT_TINT

    gain = (255 / (250 * NIGHT_TINT)).astype(np.float32)
    day = {c.id: render_character(c.id, scale=1.0) for c in CHARACTERS}
    night = {k: _graded(v, NIGHT_TINT) for k, v in day.items()}
    d_day = {k: embedding.describe_layer(v) for k, v in day.items()}
    d_raw = {k: embedding.describe_layer(v) for k, v in night.items()}
    d_bal = {k: embedding.describe_layer(v, gain) for k, v in night.items()}
    pairs = [(a, b) for a in day for b in day if a < b]

    def gap(d: dict) -> float:
        return min(1 - float(d[a] @ d[b]) for a, b in pairs)

    assert gap(d_raw) < 0.8 * gap(d_day), "the grade itself brings characters together"
    assert gap(d_bal) >= 0.9 * gap(d_day)
    for k in day:
        own = 1 - float(d_bal[k] @ d_day[k])
        assert own < min(1 - float(d_bal[k] @ d_day[o]) for o in day if o != k), k
