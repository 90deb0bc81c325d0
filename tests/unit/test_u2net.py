"""U^2-Net / U^2-NetP: official key names and sizes, weight round-trips, inference contract."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the u2net backend needs torch (pip install '.[ml]')")

from yokai_pipeline.errors import BadInputError  # noqa: E402
from yokai_pipeline.models import u2net  # noqa: E402


def _random_model(variant: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random model with non-trivial batch-norm statistics (so folding them is tested)."""
    torch.manual_seed(seed)
    model = u2net.build_u2net(variant)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def _images(n: int = 2, h: int = 72, w: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(autouse=True)
def _fresh_cache():
    u2net._cache.clear()
    yield
    u2net._cache.clear()


def test_parameter_counts_match_published_sizes():
    # Published: U^2-Net 44.0 M parameters (176.3 MB fp32), U^2-NetP 1.13 M (4.7 MB).
    full = u2net.count_parameters(u2net.build_u2net("u2net"))
    small = u2net.count_parameters(u2net.build_u2net("u2netp"))
    assert full == 44_009_869
    assert small == 1_131_181
    assert abs(full * 4 / 1e6 - 176.3) < 0.5


@pytest.mark.parametrize("variant", ["u2net", "u2netp"])
def test_official_state_dict_key_names(variant):
    keys = u2net.build_u2net(variant).state_dict()
    # Names and shapes as in the official u2net.pth / u2netp.pth files.
    mid = 32 if variant == "u2net" else 16
    expected = {
        "stage1.rebnconvin.conv_s1.weight": (64, 3, 3, 3),
        "stage1.rebnconv1.conv_s1.weight": (mid, 64, 3, 3),
        "stage1.rebnconv7.bn_s1.running_var": (mid,),
        "stage1.rebnconv6d.conv_s1.weight": (mid, 2 * mid, 3, 3),
        "stage1d.rebnconv1d.bn_s1.num_batches_tracked": (),
        "stage5.rebnconv4.conv_s1.bias": (256 if variant == "u2net" else 16,),
        "stage6.rebnconv3d.conv_s1.weight": (256, 512, 3, 3) if variant == "u2net" else (16, 32, 3, 3),
        "side1.weight": (1, 64, 3, 3),
        "side6.weight": (1, 512, 3, 3) if variant == "u2net" else (1, 64, 3, 3),
        "outconv.weight": (1, 6, 1, 1),
    }
    for key, shape in expected.items():
        assert tuple(keys[key].shape) == shape, key
    assert len(keys) == 798
    assert not any(k.startswith(("pool", "upscore")) for k in keys)


def test_dilations_follow_the_paper():
    m = u2net.build_u2net("u2netp")
    assert m.stage1.rebnconv7.conv_s1.dilation == (2, 2)
    assert [getattr(m.stage5, f"rebnconv{i}").conv_s1.dilation[0] for i in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert m.stage5.rebnconv3d.conv_s1.dilation == (4, 4)


def test_forward_returns_seven_sigmoid_maps():
    m = _random_model("u2netp")
    with torch.inference_mode():
        out = m(torch.randn(1, 3, 64, 64))
    assert len(out) == 7
    for d in out:
        assert d.shape == (1, 1, 64, 64)
        assert float(d.min()) >= 0 and float(d.max()) <= 1


def test_weights_round_trip_pth_and_safetensors(tmp_path):
    model = _random_model("u2netp", seed=1)
    pth = tmp_path / "u2netp.pth"
    # DataParallel-style prefix, as some released checkpoints have.
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, pth)
    st = u2net.save_u2net_safetensors(model, tmp_path / "u2netp.safetensors")

    a = u2net.load_u2net(pth, "u2netp", device="cpu")
    b = u2net.load_u2net(st, "u2netp", device="cpu")
    assert a is not b
    batch = _images()
    ma, mb = u2net.predict_masks(a, batch, input_size=128), u2net.predict_masks(b, batch, input_size=128)
    assert torch.equal(ma, mb)

    # Same function as the unfused original (batch norms folded into the convs on load).
    model.fused_only = True
    ref = u2net.predict_masks(model, batch, input_size=128)
    assert torch.allclose(ma, ref, atol=2e-4)


def test_load_is_memoised(tmp_path):
    st = u2net.save_u2net_safetensors(_random_model("u2netp"), tmp_path / "w.safetensors")
    assert u2net.load_u2net(st, "u2netp", device="cpu") is u2net.load_u2net(st, "u2netp", device="cpu")


def test_predict_masks_shape_range_and_determinism(tmp_path):
    st = u2net.save_u2net_safetensors(_random_model("u2netp", seed=2), tmp_path / "w.safetensors")
    model = u2net.load_u2net(st, "u2netp", device="cpu")
    nhwc = _images(2, 90, 160, seed=3)
    masks = u2net.predict_masks(model, nhwc, input_size=128)
    assert masks.shape == (2, 90, 160) and masks.dtype == torch.float32
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    # NCHW input gives the same masks, bit-identical (so repeated calls are deterministic).
    assert torch.equal(u2net.predict_masks(model, nhwc.permute(0, 3, 1, 2), input_size=128), masks)
    # The official 320x320 input; per-image min-max normalisation makes each map span [0, 1].
    small = u2net.predict_masks(model, nhwc[:1], resize_back=False)
    assert small.shape == (1, 320, 320)
    assert float(small.min()) == pytest.approx(0.0, abs=1e-6) and float(small.max()) == pytest.approx(1.0)


def test_normalisation_tensors_are_made_once_per_device(tmp_path, monkeypatch):
    # Made per call they would be a blocking host-to-device copy on CUDA (stalls the pipeline).
    st = u2net.save_u2net_safetensors(_random_model("u2netp", seed=2), tmp_path / "w.safetensors")
    model = u2net.load_u2net(st, "u2netp", device="cpu")
    monkeypatch.setattr(u2net, "_norm_cache", {})
    first = u2net.predict_masks(model, _images(1), input_size=64)
    ((mean, std),) = u2net._norm_cache.values()
    assert torch.equal(u2net.predict_masks(model, _images(1), input_size=64), first)
    assert list(u2net._norm_cache.values()) == [(mean, std)]
    assert mean.shape == std.shape == (1, 3, 1, 1)


def test_wrong_variant_is_rejected_with_the_file_named(tmp_path):
    st = u2net.save_u2net_safetensors(_random_model("u2netp"), tmp_path / "small.safetensors")
    with pytest.raises(BadInputError) as err:
        u2net.load_u2net(st, "u2net", device="cpu")
    msg = str(err.value)
    assert "small.safetensors" in msg and "not a u2net state dict" in msg and "wrong shapes" in msg


def test_unreadable_and_missing_weight_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(BadInputError, match="junk.pth: cannot read U2Net weights"):
        u2net.load_u2net(junk, "u2netp", device="cpu")
    partial = tmp_path / "partial.pth"
    state = u2net.build_u2net("u2netp").state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("side")}, partial)
    with pytest.raises(BadInputError, match=r"partial.pth: .*missing keys \(e.g. side1.bias"):
        u2net.load_u2net(partial, "u2netp", device="cpu")
    with pytest.raises(BadInputError, match="not found"):
        u2net.load_u2net(tmp_path / "nope.pth", "u2netp", device="cpu")


def test_a_pickled_object_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(BadInputError, match="evil.pth"):
        u2net.load_u2net(bad, "u2netp", device="cpu")


def test_fused_model_cannot_be_saved(tmp_path):
    st = u2net.save_u2net_safetensors(_random_model("u2netp"), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="fused"):
        u2net.save_u2net_safetensors(
            u2net.load_u2net(st, "u2netp", device="cpu"), tmp_path / "again.safetensors"
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cuda_masks_match_fp32_cpu(tmp_path):
    st = u2net.save_u2net_safetensors(_random_model("u2netp", seed=4), tmp_path / "w.safetensors")
    cpu = u2net.predict_masks(u2net.load_u2net(st, "u2netp", device="cpu"), _images(4))  # 320x320
    gpu = u2net.predict_masks(u2net.load_u2net(st, "u2netp", device="cuda"), _images(4)).cpu()
    assert gpu.shape == cpu.shape
    assert float((gpu - cpu).abs().mean()) < 0.03
