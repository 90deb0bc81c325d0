"""Anime YOLO detectors: imgutils' pre/post-processing on fixed inputs, ONNX vs torch, bad files."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit import onnx_models
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.models import detector as det
from yokai_pipeline.models import onnx_graph


@pytest.fixture(autouse=True)
def _fresh_caches():
    det._detectors.clear()
    onnx_graph._cache.clear()
    yield
    det._detectors.clear()
    onnx_graph._cache.clear()


def _frames(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(90, 160), (64, 64), (120, 80)]
    return [rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8) for i in range(n)]


def test_nms_and_box_conversion_follow_imgutils_examples():
    # The examples in imgutils/generic/yolo.py's docstrings (_yolo_nms, _yolo_xywh2xyxy).
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float32)
    assert det.nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5) == [0, 2]
    np.testing.assert_array_equal(det.xywh_to_xyxy(np.array([[10, 10, 20, 20]])), [[0, 0, 20, 20]])


def test_postprocess_scales_boxes_to_source_pixels_and_applies_thresholds():
    # Three candidates in a 64x64 model input, for a 128x96 (w x h) source: centre/size layout.
    raw = np.array(
        [
            [16, 17, 48],  # cx
            [16, 17, 40],  # cy
            [16, 16, 8],  # w
            [16, 16, 8],  # h
            [0.9, 0.8, 0.2],  # score of the one class
        ],
        dtype=np.float32,
    )
    out = det.postprocess(
        raw, 1, conf_threshold=0.3, iou_threshold=0.5, source_size=(128, 96), model_size=(64, 64)
    )
    # Box 2 is below the threshold; box 1 overlaps box 0 (IoU ~0.8) and is suppressed.
    assert out.shape == (1, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [16, 12, 48, 36, 0.9, 0], rtol=1e-6)  # x*2, y*1.5


def test_postprocess_end_to_end_layout_and_clipping():
    raw = np.array([[-4, 10, 70, 60, 0.7, 0], [5, 5, 9, 9, 0.1, 0]], dtype=np.float32)
    out = det.postprocess(raw, 1, 0.25, 0.7, source_size=(64, 64), model_size=(64, 64))
    np.testing.assert_allclose(out, [[0, 10, 64, 60, 0.7, 0]])


def test_preprocess_is_a_stretch_resize_to_unit_range():
    img = np.zeros((30, 90, 3), dtype=np.uint8)
    img[..., 0] = 255
    x = det.preprocess(img, (64, 48))
    assert x.shape == (3, 48, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], 1.0)  # no mean/std, no letterbox padding
    np.testing.assert_allclose(x[1:], 0.0)


def test_detector_reads_size_and_labels_from_metadata_and_detects_per_image(tmp_path):
    path = onnx_models.yolo_detector(tmp_path / "model.onnx", imgsz=64)
    d = det.load_detector(path, "person", device="cpu", batch_size=2, conf_threshold=0.0)
    assert d.size == (64, 64) and d.labels == ["person"] and d.runtime == "onnxruntime"
    frames = _frames(3)
    boxes = d.detect(frames)
    assert len(boxes) == 3
    for b, im in zip(boxes, frames, strict=True):
        assert b.ndim == 2 and b.shape[1] == 6 and len(b) >= 1
        h, w = im.shape[:2]
        assert (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all() and (b[:, :4] >= 0).all()
        assert (np.diff(b[:, 4]) <= 0).all()  # NMS order: best score first
    assert det.load_detector(path, "person", device="cpu", batch_size=2, conf_threshold=0.0) is d


def test_onnxruntime_and_torch_paths_agree(tmp_path):
    pytest.importorskip("onnx2torch", reason="the torch path needs onnx2torch")
    path = onnx_models.yolo_detector(tmp_path / "model.onnx", imgsz=64, n_classes=2, seed=3)
    frames = _frames(4, seed=1)
    ort = det.load_detector(path, "head", device="cpu", runtime="onnxruntime", conf_threshold=0.0)
    pt = det.load_detector(path, "head", device="cpu", runtime="torch", conf_threshold=0.0)
    assert pt.runtime == "torch"
    # Stated tolerance of the two runtimes in fp32: 1e-4 relative on the raw head output.
    np.testing.assert_allclose(ort.raw(frames), pt.raw(frames), rtol=1e-4, atol=1e-3)
    for a, b in zip(ort.detect(frames), pt.detect(frames), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2)


def test_fixed_batch_graph_runs_image_by_image(tmp_path):
    path = onnx_models.yolo_detector(tmp_path / "b1.onnx", imgsz=64, batch=1)
    d = det.load_detector(path, device="cpu", batch_size=8, conf_threshold=0.0)
    assert d.model.batch_size == 1
    assert len(d.detect(_frames(3))) == 3


def test_hub_reference_is_found_in_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = onnx_models.yolo_detector(tmp_path / "m.onnx")
    onnx_models.fake_hub_cache(
        tmp_path / "hub", "deepghs/anime_head_detection", "head_detect_v2.0_s/model.onnx", model
    )
    d = det.load_detector("deepghs/anime_head_detection", "head", device="cpu")
    assert d.conf_threshold == 0.4 and d.iou_threshold == 0.7  # imgutils' head defaults
    assert d.model.path.name == "model.onnx"
    with pytest.raises(BadInputError, match="deepghs/anime_person_detection/person_detect_v1.1_m/model.onnx"):
        det.load_detector("deepghs/anime_person_detection")
    # A file path inside the repo works the same way.
    d2 = det.load_detector("deepghs/anime_head_detection/head_detect_v2.0_s/model.onnx", "head", device="cpu")
    assert d2.model.path == d.model.path
    with pytest.raises(BadInputError, match="weights/model.onnx: model file not found"):
        det.load_detector("weights/model.onnx")


def test_missing_wrong_and_uncached_model_files_name_themselves(tmp_path):
    with pytest.raises(BadInputError, match="nowhere.onnx"):
        det.load_detector(tmp_path / "nowhere.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(BadInputError, match="bad.onnx.*not a valid ONNX"):
        det.load_detector(bad)
    ccip = onnx_models.ccip_metric(tmp_path / "metric.onnx")
    with pytest.raises(BadInputError, match="metric.onnx.*not a YOLO detector"):
        det.load_detector(ccip)


@pytest.mark.gpu
def test_cuda_bf16_torch_path_matches_onnxruntime(tmp_path):
    path = onnx_models.yolo_detector(tmp_path / "model.onnx", imgsz=64, n_classes=2, seed=3)
    frames = _frames(4, seed=1)
    ort = det.load_detector(path, "person", device="cpu", runtime="onnxruntime")
    gpu = det.load_detector(path, "person", device="cuda", batch_size=4)
    assert gpu.runtime == "torch"  # CUDA picks the torch path
    # bf16 keeps ~3 significant digits: 2% of the output scale.
    a, b = ort.raw(frames), gpu.raw(frames)
    np.testing.assert_allclose(b, a, rtol=0, atol=0.02 * np.abs(a).max())


def _drawn_frame(h: int = 360, w: int = 640) -> np.ndarray:
    """A drawn frame (painted background, outlined characters): what the detector sees in practice."""
    from yokai_pipeline import synthetic

    frame = synthetic.paint_backgrounds(h, w, seed=1)[0][:, :w].copy()
    for cid, fx in ((0, 0.1), (3, 0.5)):
        rgba = synthetic.render_character(cid, scale=h / 240)
        ch, cw = rgba.shape[:2]
        x, y = int(fx * w), (h - ch) // 2
        np.copyto(frame[y : y + ch, x : x + cw], rgba[..., :3], where=rgba[..., 3:] > 0)
    return frame


@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_batched_device_resize_follows_pils_bicubic(device):
    # Upstream (imgutils/generic/yolo.py) resizes with PIL bicubic: det.preprocess is that reference.
    frames = [_drawn_frame(), _drawn_frame(90, 160), _drawn_frame()]
    if device == "cpu":
        x = det.preprocess_batch(frames, (320, 320), "cpu")
    else:
        pytest.importorskip("torch")
        x = det.torch_resize(frames, (320, 320), "cpu").numpy()  # the CUDA path's code, run on CPU
    assert x.shape == (3, 3, 320, 320) and x.dtype == np.float32
    for got, im in zip(x, frames, strict=True):
        ref = det.preprocess(im, (320, 320))
        # 640x360 -> 320 (a 1280x720 frame into a 640 model) and 160x90 enlarged: mean
        # difference below 1/255, a few levels at line-art edges
        diff = np.abs(got - ref) * 255
        assert diff.mean() < 1 and np.percentile(diff, 99) < 10
        assert diff.max() < (48 if device == "cpu" else 24)  # at most a thin outline's worth
    with pytest.raises(ValueError, match="RGB uint8"):
        det.preprocess_batch([frames[0][..., 0]], (64, 48))


def test_detect_batches_frames_and_matches_frame_by_frame(tmp_path, monkeypatch):
    path = onnx_models.yolo_detector(tmp_path / "model.onnx", imgsz=64, seed=2)
    d = det.load_detector(path, "person", device="cpu", batch_size=4, conf_threshold=0.0)
    frames = _frames(10, seed=4)
    calls: list[int] = []
    run = d.model.run
    monkeypatch.setattr(d.model, "run", lambda x: calls.append(len(x)) or run(x))
    batched = d.detect(frames)
    assert calls == [4, 4, 2]  # model.batch_size frames per resize + forward pass
    for b, im in zip(batched, frames, strict=True):
        (one,) = d.detect([im])
        np.testing.assert_allclose(b, one, rtol=1e-5, atol=1e-4)
    assert d.detect([]) == []
