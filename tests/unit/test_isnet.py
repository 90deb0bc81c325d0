"""Anime IS-Net (skytnt/anime-segmentation "isnetis"): upstream names and sizes, checkpoint forms, inference."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the isnet backend needs torch (pip install '.[ml]')")

from yokai_pipeline.config import LayeringConfig  # noqa: E402
from yokai_pipeline.errors import BadInputError  # noqa: E402
from yokai_pipeline.models import isnet  # noqa: E402

# Facts of upstream model/isnet.py ISNetDIS (in_ch=3, out_ch=1): its state dict has 798 entries
# and 44,046,790 parameters; a few names and shapes from it.
UPSTREAM_KEYS = 798
UPSTREAM_PARAMS = 44_046_790
UPSTREAM_SHAPES = {
    "conv_in.weight": (64, 3, 3, 3),
    "stage1.rebnconvin.conv_s1.weight": (64, 64, 3, 3),
    "stage1.rebnconv7.conv_s1.weight": (32, 32, 3, 3),
    "stage5.rebnconv4.bn_s1.running_var": (256,),
    "stage5d.rebnconvin.conv_s1.weight": (512, 1024, 3, 3),
    "stage1d.rebnconv1d.conv_s1.weight": (64, 32, 3, 3),
    "side6.weight": (1, 512, 3, 3),
}


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = isnet.build_isnet(width=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(autouse=True)
def _fresh_cache():
    isnet._cache.clear()
    yield
    isnet._cache.clear()


def test_full_model_has_the_upstream_state_dict():
    model = isnet.build_isnet()
    state = model.state_dict()
    assert len(state) == UPSTREAM_KEYS
    assert sum(p.numel() for p in model.parameters()) == UPSTREAM_PARAMS
    for key, shape in UPSTREAM_SHAPES.items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("form", ["lightning", "net_state_dict", "safetensors"])
def test_published_checkpoint_forms_load_strictly(tmp_path, form):
    model = _tiny()
    state = model.state_dict()
    if form == "lightning":
        # isnetis.ckpt: AnimeSegmentation's Lightning checkpoint with net. and gt_encoder. weights.
        path = tmp_path / "isnetis.ckpt"
        ckpt = {
            "state_dict": {
                **{f"net.{k}": v for k, v in state.items()},
                "gt_encoder.side1.weight": torch.zeros(1),
            }
        }
        torch.save({"epoch": 3, "global_step": 10, **ckpt}, path)
    elif form == "net_state_dict":
        path = tmp_path / "isnetis.pth"
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "isnetis.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = isnet.load_isnet(path, device="cpu")
    assert loaded.width == 4
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_wrong_and_missing_weights_name_the_file(tmp_path):
    with pytest.raises(BadInputError, match="nope.ckpt.*not found"):
        isnet.load_isnet(tmp_path / "nope.ckpt", device="cpu")
    state = _tiny().state_dict()
    del state["side3.weight"]
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(BadInputError, match="cut.pth.*missing keys.*side3.weight"):
        isnet.load_isnet(path, device="cpu")
    gt_only = tmp_path / "gt.pth"
    torch.save({"gt_encoder.conv_in.conv.weight": torch.zeros(1)}, gt_only)
    with pytest.raises(BadInputError, match="gt.pth.*ground-truth encoder"):
        isnet.load_isnet(gt_only, device="cpu")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BadInputError, match="junk.ckpt.*cannot read"):
        isnet.load_isnet(junk, device="cpu")


def test_letterbox_geometry_is_upstreams():
    # inference.py get_mask: the longer side becomes s, the image centred, int() truncation.
    assert isnet.letterbox_geometry(720, 1280, 1024) == (576, 1024, 224, 0)
    assert isnet.letterbox_geometry(1000, 600, 1024) == (1024, 614, 0, 205)


def test_predict_masks_equals_the_upstream_procedure_on_a_fixed_input():
    model = _tiny()
    img = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    got = isnet.predict_masks(model, torch.from_numpy(img)[None], input_size=64)
    assert got.shape == (1, 48, 80) and 0 <= float(got.min()) <= float(got.max()) <= 1
    # Upstream steps by hand: /255, resize to 38x64, centre on a 64x64 black square, side1 sigmoid,
    # crop, resize back.
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(38, 64), mode="bilinear", align_corners=False)
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[:, :, 13:51] = x
    with torch.no_grad():
        ref = torch.sigmoid(model(canvas)[0])[:, :, 13:51]
    ref = torch.nn.functional.interpolate(ref, size=(48, 80), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got, ref)
    # Batched = one by one.
    two = np.stack([img, img[::-1].copy()])
    batched = isnet.predict_masks(model, torch.from_numpy(two), input_size=64)
    torch.testing.assert_close(batched[0], got[0], atol=1e-5, rtol=1e-4)


def test_isnet_backend_segments_through_the_layering_stage_machinery(tmp_path):
    from yokai_pipeline import layering

    path = tmp_path / "isnetis.pth"
    torch.save(_tiny().state_dict(), path)
    assert LayeringConfig().isnet_input_size == 1024  # upstream's size by default
    # 64: upstream's 1024 takes minutes on 2 CPU cores.
    cfg = LayeringConfig(backend="isnet", weights=path, device="cpu", batch_size=2, isnet_input_size=64)
    seg = layering.get_segmenter(cfg)
    assert isinstance(seg, layering.ISNetSegmenter) and seg.input_size == 64
    frames = [np.random.default_rng(i).integers(0, 256, (36, 64, 3), dtype=np.uint8) for i in range(3)]
    masks = seg.predict_u8(frames)
    assert [m.shape for m in masks] == [(36, 64)] * 3 and all(m.dtype == np.uint8 for m in masks)
    ref = isnet.predict_masks(seg.model, torch.from_numpy(frames[1])[None], input_size=64)[0]
    np.testing.assert_allclose(masks[1], (ref * 255).round().numpy(), atol=1)


@pytest.mark.gpu
def test_cuda_bf16_masks_match_cpu_fp32():
    model = _tiny()
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 72, 128, 3), dtype=np.uint8))
    cpu = isnet.predict_masks(model, img, input_size=128)
    gpu = isnet.predict_masks(model.to("cuda"), img.to("cuda"), input_size=128).cpu()
    assert float((cpu - gpu).abs().max()) < 0.05
