"""Batch sizes from the device's free memory ("auto"), and halving on out-of-memory (no GPU needed)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from pydantic import ValidationError

from tests.unit.test_layering import tiny_u2netp  # noqa: F401 - the fixture
from yokai_pipeline import layering
from yokai_pipeline.config import DetectionConfig, EmbeddingConfig, LayeringConfig
from yokai_pipeline.runtime import batching

torch = pytest.importorskip("torch")
GIB = 1024**3
COST = batching.BatchCost("test", per_item_mib=150, upper=128, cpu_default=16)


@pytest.fixture(autouse=True)
def fresh_choices():
    batching.forget_choices()
    yield
    batching.forget_choices()


def _mem(free_gib: float, total_gib: float):
    calls: list[str] = []

    def mem_get_info(device: str) -> tuple[int, int]:
        calls.append(device)
        return int(free_gib * GIB), int(total_gib * GIB)

    mem_get_info.calls = calls  # type: ignore[attr-defined]
    return mem_get_info


@pytest.mark.parametrize(
    ("free", "total", "expected"),
    [
        # (10 - 0.15 * 24) GiB = 6553 MiB / 150 MiB = 43 items -> 32, the power of two below
        (10, 24, 32),
        # 80 GiB card, 60 free: 327 items fit -> the stage's upper bound
        (60, 80, 128),
        # (2 - 1.2) GiB = 819 MiB -> 5 items -> 4
        (2, 8, 4),
        # less free than the reserve: one item at a time (the halving has nothing left to halve)
        (1, 24, 1),
    ],
)
def test_auto_picks_the_largest_power_of_two_the_free_memory_holds(free, total, expected):
    assert batching.auto_batch_size(COST, "cuda:1", _mem(free, total)) == expected


def test_cpu_gets_the_stage_default_and_integers_are_kept_as_given():
    def no_gpu(device):
        raise AssertionError("no device memory is read for the CPU or an explicit size")

    assert batching.resolve_batch_size(COST, "cpu", "auto", no_gpu) == 16
    assert batching.resolve_batch_size(COST, "cuda:0", 48, no_gpu) == 48


def test_auto_is_chosen_once_per_process_stage_and_device():
    first = _mem(10, 24)
    assert batching.resolve_batch_size(COST, "cuda:0", "auto", first) == 32
    # later the free memory moves (the model's own cache): the choice stays, so a memoised model keeps
    assert batching.resolve_batch_size(COST, "cuda:0", "auto", _mem(2, 24)) == 32
    assert first.calls == ["cuda:0"]
    assert batching.resolve_batch_size(COST, "cuda:1", "auto", _mem(2, 8)) == 4  # another device


def _forward_that_fits(limit: int, calls: list[int]):
    def forward(x):
        calls.append(len(x))
        if len(x) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x * 2

    return forward


def test_out_of_memory_halves_the_batch_and_keeps_the_smaller_size(caplog):
    state = batching.Budget("test", "cuda:0", 32)
    calls: list[int] = []
    x = torch.arange(32.0)
    with caplog.at_level(logging.WARNING, logger=batching.__name__):
        out = batching.run_in_parts(_forward_that_fits(8, calls), x, state, torch.cat)
    assert torch.equal(out, x * 2)  # every item once, in order
    assert state.size == 8
    assert calls[:3] == [32, 16, 8]  # 32 fails, the first 16 fails, then parts of 8
    assert "at batch 32; retrying in batches of 16" in caplog.text
    assert "at batch 16; retrying in batches of 8" in caplog.text
    calls.clear()
    out = batching.run_in_parts(_forward_that_fits(8, calls), torch.arange(20.0), state, torch.cat)
    assert calls == [8, 8, 4] and torch.equal(out, torch.arange(20.0) * 2)  # no failed attempt again


def test_a_kernel_size_limit_halves_the_batch_like_out_of_memory():
    """What the H200 raised for U^2-Net at batch 2026 (141 GB left room, 32-bit indexing did not)."""
    calls: list[int] = []

    def forward(x):
        calls.append(len(x))
        if len(x) > 10:
            raise RuntimeError(
                "upsample_bilinear2d_nhwc only supports output tensors with less than INT_MAX elements, "
                f"but got [{len(x)}, 32, 320, 320]"
            )
        return x + 1

    state = batching.Budget("u2net", "cuda:0", 40)
    out = batching.run_in_parts(forward, torch.arange(40.0), state, torch.cat)
    assert torch.equal(out, torch.arange(40.0) + 1) and state.size == 10 and calls[:3] == [40, 20, 10]


def test_one_item_that_does_not_fit_and_other_errors_are_raised():
    state = batching.Budget("test", "cuda:0", 4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        batching.run_in_parts(_forward_that_fits(0, []), torch.arange(4.0), state, torch.cat)
    assert state.size == 1

    calls: list[int] = []

    def broken(x):
        calls.append(len(x))
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        batching.run_in_parts(broken, torch.arange(4.0), batching.Budget("test", "cuda:0", 4), torch.cat)
    assert calls == [4]  # not retried: only out-of-memory is the batch's fault


def test_config_takes_auto_or_a_bounded_integer():
    assert LayeringConfig(batch_size="auto").batch_size == 0  # kept as 0: a plain integer field
    assert LayeringConfig(batch_size=0) == LayeringConfig(batch_size="auto")
    assert EmbeddingConfig(batch_size=256).batch_size == 256
    # an integer in the JSON schema, so Prefect's custom-run form renders the config as a form
    assert EmbeddingConfig.model_json_schema()["properties"]["batch_size"]["type"] == "integer"
    for bad in (-1, 5000, "max"):
        with pytest.raises(ValidationError):
            EmbeddingConfig(batch_size=bad)


def test_layering_auto_uses_the_segmenter_device_and_model_cost(monkeypatch):
    from yokai_pipeline.models import u2net

    monkeypatch.setattr(u2net, "resolve_device", lambda device: "cuda:1")  # the leased GPU
    monkeypatch.setattr(batching, "_mem_get_info", _mem(16, 24))
    # (16 - 3.6) GiB = 12697 MiB: 84 U^2-Net frames at 150 MiB -> 64; 28 IS-Net frames at 448 MiB -> 16
    assert layering.sized(LayeringConfig(backend="u2net", batch_size="auto")).batch_size == 64
    batching.forget_choices()
    assert layering.sized(LayeringConfig(backend="isnet", batch_size="auto")).batch_size == 16
    assert layering.sized(LayeringConfig(backend="offline", batch_size="auto")).batch_size == 16
    assert layering.sized(LayeringConfig(backend="u2net", batch_size=12)).batch_size == 12


def test_isnet_auto_on_a_large_card_stays_under_the_upsampling_kernel_limit(monkeypatch):
    from yokai_pipeline.models import u2net

    # Measured on an H200 (BENCHMARKS.md "Memory"): IS-Net at 1024 px with 139 GiB free picked
    # 128, the memory cap, and failed every time with "upsample_bilinear2d_nhwc only supports
    # output tensors with less than INT_MAX elements, but got [128, 64, 512, 512]".
    monkeypatch.setattr(u2net, "resolve_device", lambda device: "cuda:0")
    monkeypatch.setattr(batching, "_mem_get_info", _mem(139, 141))
    size = layering.sized(LayeringConfig(backend="isnet", batch_size="auto")).batch_size
    assert 16 <= size and size * 64 * 512 * 512 < 2**31 - 1
    batching.forget_choices()
    # a smaller input side has smaller maps: the memory estimate, not the kernel, bounds it then
    small = layering.sized(LayeringConfig(backend="isnet", isnet_input_size=512, batch_size="auto"))
    assert small.batch_size == 128
    batching.forget_choices()
    assert layering.sized(LayeringConfig(backend="u2net", batch_size="auto")).batch_size == 128


def test_segmenter_out_of_memory_gives_the_masks_of_a_plain_run(tiny_u2netp, monkeypatch, caplog):  # noqa: F811
    from yokai_pipeline.models import u2net

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), np.uint8) for _ in range(6)]
    plain = layering.U2NetSegmenter(tiny_u2netp, "u2netp", device="cpu", batch_size=6).predict_u8(images)
    real = u2net.predict_masks
    sizes: list[int] = []

    def small_device(model, x):
        sizes.append(x.shape[0])
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(model, x)

    monkeypatch.setattr(u2net, "predict_masks", small_device)
    seg = layering.U2NetSegmenter(tiny_u2netp, "u2netp", device="cpu", batch_size=6)
    with caplog.at_level(logging.WARNING, logger=batching.__name__):
        masks = seg.predict_u8(images)
    assert all(np.array_equal(a, b) for a, b in zip(masks, plain, strict=True))
    assert seg._budget.size == 3 and sizes == [6, 3, 3]
    assert "layering on cpu: out of memory (or over a kernel's size limit) at batch 6" in caplog.text


def _out_of_memory_above(module, limit: int, calls: list[int]):
    """``module`` wrapped so a forward pass of more than ``limit`` rows raises CUDA's out-of-memory error."""

    class Limited(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x):
            calls.append(len(x))
            if len(x) > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.inner(x)

    return Limited()


def test_the_torch_path_of_onnx_detectors_halves_on_out_of_memory(tmp_path):
    pytest.importorskip("onnx2torch", reason="the torch path needs onnx2torch")
    from tests.unit import onnx_models
    from yokai_pipeline.models import detector as det

    path = onnx_models.yolo_detector(tmp_path / "model.onnx", imgsz=64, n_classes=2, seed=3)
    frames = [np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8) for i in range(8)]
    plain = det.load_detector(path, "head", device="cpu", runtime="torch", batch_size=8, conf_threshold=0.0)
    want_raw, want = plain.raw(frames), plain.detect(frames)
    d = det.Detector(onnx_graph_model(path, batch_size=8), "head", conf_threshold=0.0)
    calls: list[int] = []
    d.model._module = _out_of_memory_above(d.model._module, 2, calls)
    np.testing.assert_allclose(d.raw(frames), want_raw, rtol=1e-5, atol=1e-5)
    assert calls[:3] == [8, 4, 2] and d.model._budget.size == 2  # halved twice, and kept
    for a, b in zip(d.detect(frames), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # the device-side path (CUDA post-processing) halves the same way
    x = det.preprocess_batch(frames, d.size)
    d.model._budget.size, calls[:] = 8, []
    on_device = d.model.run_first_on_device(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(on_device, want_raw, rtol=1e-5, atol=1e-5)
    assert calls[:3] == [8, 4, 2]
    assert DetectionConfig(batch_size="auto").batch_size == 0
    assert det.resolve_batch_size(0, "cpu") == det.BATCH_COST.cpu_default


def onnx_graph_model(path, batch_size: int):
    from yokai_pipeline.models.onnx_graph import OnnxModel

    return OnnxModel(path, "cpu", "torch", batch_size)


def test_the_wd14_tagger_halves_on_out_of_memory_and_auto_is_the_cpu_default(tmp_path):
    from tests.unit.test_tagging import build_tiny_tagger
    from yokai_pipeline.config import TagConfig
    from yokai_pipeline.models.wd14 import BATCH_COST, Wd14Tagger

    build_tiny_tagger(tmp_path / "tagger")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"im{i}.png")
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 36, 3), dtype=np.uint8)).save(paths[-1])
    want = Wd14Tagger(tmp_path / "tagger", "cpu", batch_size=6, num_workers=0).predict(paths)
    tagger = Wd14Tagger(tmp_path / "tagger", "cpu", batch_size=6, num_workers=0)
    calls: list[int] = []
    model = tagger.bundle.model
    tagger.bundle.model = _out_of_memory_above(model, 1, calls)
    try:
        got = tagger.predict(paths)
    finally:
        tagger.bundle.model = model  # the bundle is memoised per process
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert calls[:3] == [6, 3, 1] and tagger._budget.size == 1
    assert TagConfig(batch_size="auto").batch_size == 0
    auto = Wd14Tagger(tmp_path / "tagger", "cpu", batch_size="auto", num_workers=0)
    assert auto.batch_size == BATCH_COST.cpu_default
