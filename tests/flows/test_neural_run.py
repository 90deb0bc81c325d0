"""`yokai run` end to end with the anime IS-Net and CCIP backends, tiny random models for the weights."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _ccip_dir(tmp_path):
    """A tiny CCIP (feature + metric ONNX graphs and its threshold) in the published layout."""
    from tests.unit import onnx_models
    from yokai_pipeline.models import ccip

    ccip_dir = tmp_path / "ccip"
    ccip_dir.mkdir()
    onnx_models.ccip_feature(ccip_dir / ccip.FEATURE_FILE)
    onnx_models.ccip_metric(ccip_dir / ccip.METRIC_FILE)
    (ccip_dir / ccip.METRICS_JSON).write_text(json.dumps({"threshold": 0.004}))
    return ccip_dir


def _isnet_weights(tmp_path, all_foreground: bool = False):
    """A tiny random IS-Net's state dict; ``all_foreground``: its mask says foreground everywhere."""
    import torch

    from yokai_pipeline.models import isnet

    torch.manual_seed(0)
    net = isnet.build_isnet(width=4)
    if all_foreground:
        with torch.no_grad():
            net.side1.weight.zero_()
            net.side1.bias.fill_(4.0)
    weights = tmp_path / "isnetis.pth"
    torch.save(net.state_dict(), weights)
    return weights


def _run(tmp_path, seed: int, config: dict):
    """``yokai run`` on a generated 8 s episode with ``config``; the workspace."""
    from typer.testing import CliRunner

    from yokai_pipeline import synthetic
    from yokai_pipeline.cli import app

    series = tmp_path / "series"
    synthetic.generate_series(series, seed=seed, episodes=1, seconds=8.0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, "selection": {"tiers": ["S", "A", "B", "C", "D"]}}))
    ws = tmp_path / "ws"
    res = CliRunner().invoke(
        app, ["run", str(series / "episodes"), "--workspace", str(ws), "--config", str(path)]
    )
    assert res.exit_code == 0, res.output
    return ws


def test_run_with_isnet_and_ccip_completes(tmp_path):
    pytest.importorskip("torch", reason="the isnet backend needs torch")
    pytest.importorskip("onnxruntime", reason="the ccip backend needs onnxruntime on CPU")
    layering = {
        "backend": "isnet",
        "weights": str(_isnet_weights(tmp_path)),
        "device": "cpu",
        "isnet_input_size": 64,
    }
    embedding = {"backend": "ccip", "ccip_model": str(_ccip_dir(tmp_path)), "device": "cpu"}
    ws = _run(tmp_path, 3, {"layering": layering, "embedding": embedding})
    [sidecar] = (ws / "embeddings").glob("*.json")
    assert json.loads(sidecar.read_text())["backend"] == "ccip"
    doc = json.loads((ws / "character_clusters" / "clusters.json").read_text())
    assert doc["embedding"]["backend"] == "ccip" and doc["embedding"]["ccip"]["threshold"] == 0.004
    assert (ws / "summary.json").is_file()
    assert any((ws / "layered_frames" / "masks").rglob("*.png"))


def test_run_with_the_neural_detector_isnet_and_ccip_cuts_layers_inside_the_boxes(tmp_path):
    pytest.importorskip("torch", reason="the isnet backend needs torch")
    pytest.importorskip("onnxruntime", reason="the detector and ccip run on onnxruntime on CPU")
    import cv2
    import numpy as np

    from tests.unit import onnx_models
    from yokai_pipeline import fsio
    from yokai_pipeline.models.detector import load_detector

    # the segmenter says "foreground" everywhere: the detector's boxes alone cut the layers
    weights = _isnet_weights(tmp_path, all_foreground=True)
    yolo = onnx_models.yolo_detector(tmp_path / "person.onnx", imgsz=64, seed=1)
    head = onnx_models.yolo_detector(tmp_path / "head.onnx", imgsz=64, seed=2)
    config = {
        "layering": {"backend": "isnet", "weights": str(weights), "device": "cpu", "isnet_input_size": 64},
        "detection": {
            "backend": "yolo",
            "model": str(yolo),
            "head_model": str(head),
            "device": "cpu",
            "batch_size": 4,
        },
        "embedding": {"backend": "ccip", "ccip_model": str(_ccip_dir(tmp_path)), "device": "cpu"},
        "packaging": {"min_resolution": 16},  # the sample's crops are small; keep them all
    }
    ws = _run(tmp_path, 5, config)
    rows = [r for p in (ws / "layered_frames" / "manifests").glob("*.jsonl") for r in fsio.read_jsonl(p)]
    chars = [r for r in rows if r["kind"] == "character"]
    assert len(chars) >= 10, "random boxes still cut layers out of an all-foreground mask"
    detector = load_detector(yolo, "person", device="cpu")
    sources = {"neck", "ratio", "head_detector"}
    for r in chars[:40]:
        x0, y0, x1, y1, score, _ = r["detector_box"]
        assert score >= 0.35  # detection.score_threshold
        # the box is the detector's own on that frame
        frame = cv2.cvtColor(cv2.imread(str(ws / r["frame_path"])), cv2.COLOR_BGR2RGB)
        (boxes,) = detector.detect([frame])
        assert np.abs(boxes - np.array(r["detector_box"], np.float32)).max(axis=1).min() < 0.05
        # every pixel of the layer lies inside its detector box
        alpha = cv2.imread(str(ws / r["path"]), cv2.IMREAD_UNCHANGED)[..., 3]
        ys, xs = np.nonzero(alpha)
        lx, ly = r["box"][:2]
        assert xs.min() + lx >= round(x0) and xs.max() + lx < round(x1) + 1
        assert ys.min() + ly >= round(y0) and ys.max() + ly < round(y1) + 1
        # the 3-stage crops are recorded and lie inside the layer
        assert r["crop_kind"] == "full_body" and r["crop_source"] in sources
        for kind in ("upper_body", "head"):
            cx0, cy0, cx1, cy1 = r["crops"][kind]
            assert r["box"][0] <= cx0 <= cx1 <= r["box"][2] and r["box"][1] <= cy0 <= cy1 <= r["box"][3]
    assert any(r["crop_source"] == "head_detector" for r in chars), "the head detector's boxes are used"
    made = [m for p in (ws / "augmented_clusters").rglob("crops_manifest.jsonl") for m in fsio.read_jsonl(p)]
    assert {m["crop_kind"] for m in made} == {"upper_body", "head"}
    # the kohya folders hold every kind, each captioned with its framing tag
    tags = {
        "full_body": "full body",
        "upper_body": "upper body",
        "head": "portrait",
    }  # as kohya captions write them
    seen = set()
    for img in (ws / "training_data" / "characters").rglob("*.png"):
        kind = next(
            (k for k in ("upper_body", "head") if img.stem.split("_aug")[0].endswith(f"_{k}")), "full_body"
        )
        caption = img.with_suffix(".txt").read_text()
        assert tags[kind] in caption.strip().split(", "), (img, caption)
        seen.add(kind)
    assert seen == set(tags)
