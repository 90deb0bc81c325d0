"""CCIP identity: imgutils' preprocessing, ONNX vs torch, the metric's own threshold in clustering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.unit import onnx_models
from yokai_pipeline import clustering
from yokai_pipeline.config import ClusteringConfig, EmbeddingConfig
from yokai_pipeline.embedding import embed_layers, get_embedder, load_embeddings
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import save_image, write_jsonl
from yokai_pipeline.models import ccip as ccip_mod
from yokai_pipeline.models import onnx_graph
from yokai_pipeline.synthetic import render_character
from yokai_pipeline.workspace import Workspace

THRESHOLD = 0.3
#: The tiny colour-filter feature model puts one sample character's layers < 0.002 apart and
#: different characters > 0.007 apart: its own "same character" threshold sits between.
TINY_THRESHOLD = 0.004


@pytest.fixture(autouse=True)
def _fresh_caches():
    ccip_mod._cache.clear()
    onnx_graph._cache.clear()
    yield
    ccip_mod._cache.clear()
    onnx_graph._cache.clear()


@pytest.fixture
def ccip_dir(tmp_path):
    """A CCIP model folder laid out as deepghs/ccip_onnx/<model>/ (tiny random feature model)."""
    d = tmp_path / "ccip-tiny"
    d.mkdir()
    onnx_models.ccip_feature(d / ccip_mod.FEATURE_FILE)
    onnx_models.ccip_metric(d / ccip_mod.METRIC_FILE)
    (d / ccip_mod.METRICS_JSON).write_text(json.dumps({"threshold": THRESHOLD, "f1": 0.9}))
    return d


def test_preprocess_matches_imgutils_conventions():
    # imgutils/metrics/ccip.py: RGB (transparent -> white), 384x384 bilinear, /255, CLIP mean/std.
    from PIL import Image

    clear = Image.new("RGBA", (50, 80), (10, 200, 30, 0))
    x = ccip_mod.preprocess(clear)
    assert x.shape == (3, 384, 384) and x.dtype == np.float32
    white = (1.0 - np.array(ccip_mod.MEAN)) / np.array(ccip_mod.STD)
    np.testing.assert_allclose(x[:, 0, 0], white, rtol=1e-5)
    red = ccip_mod.preprocess(np.full((20, 20, 3), (255, 0, 0), dtype=np.uint8))
    np.testing.assert_allclose(
        red[:, 5, 5],
        [(1 - 0.48145466) / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711],
        rtol=1e-5,
    )


def test_features_differences_and_threshold_from_the_model_folder(ccip_dir):
    model = ccip_mod.load_ccip(ccip_dir, device="cpu", batch_size=2)
    assert model.threshold == THRESHOLD and model.dim == 768 and model.size == 384
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40 + 10 * i, 30, 3), dtype=np.uint8) for i in range(5)]
    f = model.features(imgs)
    assert f.shape == (5, 768) and f.dtype == np.float32
    d = model.differences(f)
    assert d.shape == (5, 5)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-5)
    np.testing.assert_allclose(d, d.T, atol=1e-5)
    # Blockwise cross differences equal the corresponding part of one joint run.
    old = ccip_mod.METRIC_BLOCK
    try:
        ccip_mod.METRIC_BLOCK = 4
        np.testing.assert_allclose(model.differences(f[:3], f[2:]), d[:3, 2:], atol=1e-5)
    finally:
        ccip_mod.METRIC_BLOCK = old
    assert ccip_mod.load_ccip(ccip_dir, device="cpu", threshold=0.2).threshold == 0.2


def test_hub_reference_finds_the_three_files_in_the_local_cache(ccip_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for f in (ccip_mod.FEATURE_FILE, ccip_mod.METRIC_FILE, ccip_mod.METRICS_JSON):
        onnx_models.fake_hub_cache(
            tmp_path / "hub", ccip_mod.REPO_ID, f"{ccip_mod.DEFAULT_MODEL}/{f}", ccip_dir / f
        )
    model = ccip_mod.load_ccip(ccip_mod.REPO_ID, device="cpu")
    assert model.threshold == THRESHOLD and model.name == ccip_mod.DEFAULT_MODEL
    with pytest.raises(
        BadInputError, match="deepghs/ccip_onnx/other-model/model_feat.onnx.*Hugging Face cache"
    ):
        ccip_mod.load_ccip("deepghs/ccip_onnx/other-model", device="cpu")


def test_onnxruntime_and_torch_paths_agree(ccip_dir):
    pytest.importorskip("onnx2torch", reason="the torch path needs onnx2torch")
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(3)]
    a = ccip_mod.load_ccip(ccip_dir, device="cpu", runtime="onnxruntime")
    b = ccip_mod.load_ccip(ccip_dir, device="cpu", runtime="torch")
    fa, fb = a.features(imgs), b.features(imgs)
    # Stated tolerance of the two fp32 runtimes: 3e-5 of the features' scale (summation order differs).
    np.testing.assert_allclose(fa, fb, rtol=0, atol=3e-5 * np.abs(fa).max())
    np.testing.assert_allclose(a.differences(fa), b.differences(fa), atol=1e-5)


def test_missing_and_wrong_files_name_themselves(ccip_dir, tmp_path):
    (ccip_dir / ccip_mod.METRIC_FILE).unlink()
    with pytest.raises(BadInputError, match="model_metrics.onnx"):
        ccip_mod.load_ccip(ccip_dir)
    onnx_models.ccip_metric(ccip_dir / ccip_mod.METRIC_FILE)
    (ccip_dir / ccip_mod.METRICS_JSON).write_text("{}")
    with pytest.raises(BadInputError, match="metrics.json.*threshold"):
        ccip_mod.load_ccip(ccip_dir)
    (ccip_dir / ccip_mod.METRICS_JSON).write_text('{"threshold": 0.3}')
    (ccip_dir / ccip_mod.FEATURE_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(BadInputError, match="model_feat.onnx.*not a valid ONNX"):
        ccip_mod.load_ccip(ccip_dir)
    with pytest.raises(
        BadInputError, match="deepghs/ccip_onnx/ccip-caformer-24-randaug-pruned/model_feat.onnx"
    ):
        ccip_mod.load_ccip("deepghs/ccip_onnx")
    with pytest.raises(BadInputError, match="nothing-here"):
        ccip_mod.load_ccip(tmp_path / "nothing-here")


def _grouped_features(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows around random directions, one per group: cosine difference within < 0.05, across ~1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), 768))
    X = np.concatenate([c + 0.15 * rng.normal(size=(n, 768)) for c, n in zip(centres, sizes, strict=True)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return X.astype(np.float32), truth


def test_cluster_by_metric_cuts_at_the_model_threshold(ccip_dir):
    from sklearn.metrics import adjusted_rand_score

    model = ccip_mod.load_ccip(ccip_dir, device="cpu")
    X, truth = _grouped_features([20, 12, 7, 1])
    labels, probs = clustering.cluster_embeddings(X, ClusteringConfig(min_cluster_size=3), metric=model)
    assert labels[-1] == -1  # a lone layer is noise
    assert adjusted_rand_score(truth[:-1], labels[:-1]) == 1.0
    assert list(np.bincount(labels[labels >= 0])) == [20, 12, 7]  # ids by size
    assert (probs[labels >= 0] > 0.5).all() and probs[-1] == 0.0
    # A threshold below the within-group differences leaves every layer on its own -> all noise.
    tight = ccip_mod.load_ccip(ccip_dir, device="cpu", threshold=1e-4)
    assert (
        clustering.cluster_embeddings(X, ClusteringConfig(min_cluster_size=3), metric=tight)[0] == -1
    ).all()
    # Sampled linkage (more layers than the sample) gives the same partition.
    old = clustering.METRIC_LINK_SAMPLE
    try:
        clustering.METRIC_LINK_SAMPLE = 15
        sampled, _ = clustering.cluster_embeddings(X[:-1], ClusteringConfig(min_cluster_size=3), metric=model)
    finally:
        clustering.METRIC_LINK_SAMPLE = old
    assert adjusted_rand_score(truth[:-1], sampled) == 1.0


def _ccip_workspace(root, ccip_dir, episodes=("ep01", "ep02")) -> Workspace:
    ws = Workspace(root)
    rng = np.random.default_rng(0)
    for ep in episodes:
        rows = []
        for k in range(18):
            cid = k % 3
            rgba = render_character(cid, scale=float(rng.uniform(0.6, 1.4)), facing=int(rng.choice([-1, 1])))
            lid = f"{ep}_f{k:06d}_i00"
            rel = f"layered_frames/character/{ep}/{lid}.png"
            save_image(ws.abs(rel), rgba)
            rows.append(
                {
                    "layer_id": lid,
                    "kind": "character",
                    "episode_id": ep,
                    "frame_index": k,
                    "path": rel,
                    "box": [0, 0, rgba.shape[1], rgba.shape[0]],
                    "area": int((rgba[..., 3] > 0).sum()),
                }
            )
        write_jsonl(ws.layers_manifest(ep), rows)
        cfg = EmbeddingConfig(
            backend="ccip", ccip_model=str(ccip_dir), device="cpu", ccip_threshold=TINY_THRESHOLD
        )
        stats = embed_layers(ws, ep, cfg)
        assert stats["dim"] == 768 and not stats["failed"]
    return ws


def test_ccip_backend_embeds_records_and_clusters_incrementally_with_stable_ids(ccip_dir, tmp_path):
    ws = _ccip_workspace(tmp_path / "ws", ccip_dir)
    from sklearn.metrics import adjusted_rand_score

    _, meta = load_embeddings(ws, "ep01")
    assert meta["backend"] == "ccip" and meta["ccip"]["threshold"] == TINY_THRESHOLD
    assert meta["ccip"]["source"] == str(ccip_dir)
    cfg = ClusteringConfig(min_cluster_size=3)
    first = clustering.cluster_layers(ws, ["ep01"], cfg)
    doc = clustering.read_clusters(ws)
    assert doc["embedding"]["backend"] == "ccip" and first["n_layers"] == 18 and first["n_clusters"] == 3
    old = {m["layer_id"]: m["cluster"] for m in doc["members"]}
    stats = clustering.assign_incremental(ws, ["ep02"], cfg)
    after = clustering.read_clusters(ws)
    assert {m["layer_id"]: m["cluster"] for m in after["members"] if m["layer_id"] in old} == old
    assert len(after["members"]) == 36 and stats["joined"] == 18 and stats["new_clusters"] == 0

    def truth(m):
        return int(m["layer_id"].split("_f")[1][:6]) % 3  # character id = frame index mod 3

    members = after["members"]
    assert adjusted_rand_score([truth(m) for m in members], [m["cluster"] for m in members]) == 1.0
    # With the model's published-style threshold far above these differences, all is one character.
    loose = clustering.cluster_by_metric(
        load_embeddings(ws, "ep01")[0], cfg, ccip_mod.load_ccip(ccip_dir, device="cpu")
    )[0]
    assert set(loose.tolist()) == {0}


def test_ccip_embedder_reports_unreadable_layers(ccip_dir, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    emb = get_embedder(EmbeddingConfig(backend="ccip", ccip_model=str(ccip_dir), device="cpu"))
    errors: list = []
    good = tmp_path / "good.png"
    save_image(good, render_character(0))
    out = emb.embed([good, bad], errors=errors)
    assert out.shape == (2, 768) and np.abs(out[0]).sum() > 0 and not out[1].any()
    assert errors and errors[0][0] == 1 and "broken.png" in errors[0][1]
    with pytest.raises(BadInputError, match="broken.png"):
        emb.embed([bad])


@pytest.mark.gpu
def test_cuda_bf16_features_match_onnxruntime(ccip_dir):
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(6)]
    a = ccip_mod.load_ccip(ccip_dir, device="cpu", runtime="onnxruntime").features(imgs)
    b = ccip_mod.load_ccip(ccip_dir, device="cuda", batch_size=4).features(imgs)
    np.testing.assert_allclose(b, a, rtol=0, atol=0.02 * np.abs(a).max())
