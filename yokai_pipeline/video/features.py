"""Frame analysis in torch, on batches of NV12 frames where they were decoded (the GPU).

The same definitions as the CPU path (``yokai_pipeline.frames.yuv420_analysis_images``,
``colour_histogram``, ``sharpness``), computed for a whole batch at once:

- the small grey image is the luma plane resized to at most 320 px wide; the histogram image
  is that grey resized to ``hist_width`` plus the two chroma planes resized to half of it,
  converted with OpenCV's BT.601 integer I420 -> BGR arithmetic and OpenCV's 8-bit HSV tables,
  so given the same small planes the histograms are bit-identical to OpenCV's;
- sharpness is the population variance of the 3x3 Laplacian (OpenCV's ``ksize=1`` kernel,
  reflect-101 border) of the small grey image.

Documented difference: the resizes are float bilinear (half-pixel centres, no antialias, as
OpenCV's INTER_LINEAR) rounded to 8 bits, where OpenCV uses 11-bit fixed-point weights, so a
pixel of a small image can differ by one level. tests/unit/test_video.py bounds the effect on
the histograms, the sharpness and the frames kept.
"""

from __future__ import annotations

from typing import Any

# OpenCV's fixed-point BT.601 (limited range) YUV -> RGB coefficients (imgproc color_yuv.simd.hpp)
_SHIFT = 20
_CY, _CUB, _CUG, _CVG, _CVR = 1220542, 2116026, -409993, -852492, 1673527
_HSV_SHIFT = 12


def _resize(x: Any, size: tuple[int, int]) -> Any:
    """Bilinear resize of ``[B, H, W]`` float images to ``size`` = (height, width), rounded to 8 bits."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == size:
        return x
    out = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False, antialias=False)
    return out[:, 0].round_().clamp_(0, 255)


def i420_to_bgr(y: Any, u: Any, v: Any) -> Any:
    """``[B, 3, H, W]`` int BGR of 8-bit planes (``u``, ``v`` at half size), as OpenCV's COLOR_YUV2BGR_I420."""
    import torch

    y = y.to(torch.int64)
    u = u.to(torch.int64).repeat_interleave(2, -1).repeat_interleave(2, -2) - 128
    v = v.to(torch.int64).repeat_interleave(2, -1).repeat_interleave(2, -2) - 128
    yy = (y - 16).clamp_(min=0) * _CY
    half = 1 << (_SHIFT - 1)
    b = (yy + _CUB * u + half) >> _SHIFT
    g = (yy + _CVG * v + _CUG * u + half) >> _SHIFT
    r = (yy + _CVR * v + half) >> _SHIFT
    return torch.stack([b, g, r], 1).clamp_(0, 255)


def _div_tables(device: Any) -> tuple[Any, Any]:
    """OpenCV's 8-bit RGB2HSV division tables (saturation and hue for the 180 range)."""
    import torch

    i = torch.arange(256, dtype=torch.float64, device=device)
    sdiv = torch.where(i > 0, torch.round((255 << _HSV_SHIFT) / i.clamp(min=1)), 0).to(torch.int64)
    hdiv = torch.where(i > 0, torch.round((180 << _HSV_SHIFT) / (6.0 * i.clamp(min=1))), 0).to(torch.int64)
    return sdiv, hdiv


def colour_histograms(bgr: Any) -> Any:
    """``[B, 160]`` normalised HSV histograms (18 hue x 8 saturation, then 16 value) of int BGR images."""
    import torch

    b, g, r = bgr[:, 0], bgr[:, 1], bgr[:, 2]
    v = torch.maximum(torch.maximum(b, g), r)
    diff = v - torch.minimum(torch.minimum(b, g), r)
    sdiv, hdiv = _div_tables(bgr.device)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * sdiv[v] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + half) >> _HSV_SHIFT
    h = torch.where(h < 0, h + 180, h)
    n = bgr.shape[0]
    rows = torch.arange(n, device=bgr.device)[:, None]
    # calcHist's uniform bins: hue [0, 180) in 18, saturation and value [0, 256) in 8 and 16
    hs_bin = (h // 10).clamp_(max=17) * 8 + (s // 32)
    hs_ok = (h < 180).reshape(n, -1)
    hs = torch.zeros(n * 144, dtype=torch.float64, device=bgr.device)
    idx = (rows * 144 + hs_bin.reshape(n, -1))[hs_ok]
    hs.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    vh = torch.zeros(n * 16, dtype=torch.float64, device=bgr.device)
    vidx = (rows * 16 + (v // 16).reshape(n, -1)).reshape(-1)
    vh.index_add_(0, vidx, torch.ones_like(vidx, dtype=torch.float64))
    hist = torch.cat([hs.view(n, 144), vh.view(n, 16)], 1)
    return (hist / hist.sum(1, keepdim=True).clamp(min=1.0)).to(torch.float32)


def laplacian_variance(grey: Any) -> Any:
    """``[B]`` variance of the 3x3 Laplacian of ``[B, H, W]`` grey images (OpenCV ksize=1, reflect-101)."""
    import torch
    import torch.nn.functional as F

    k = torch.tensor(
        [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64, device=grey.device
    )
    x = F.pad(grey.to(torch.float64)[:, None], (1, 1, 1, 1), mode="reflect")
    lap = F.conv2d(x, k[None, None])[:, 0]
    return lap.flatten(1).var(1, unbiased=False)


def nv12_features(
    nv12: Any, width: int, height: int, hist_width: int, sharp_width: int
) -> tuple[Any, Any, Any]:
    """Histograms, sharpness and small grey images of a batch of NV12 frames.

    Args:
        nv12: ``[B, height * 3 // 2, width]`` uint8 (luma rows, then interleaved U/V rows).
        width: frame width.
        height: frame height (even).
        hist_width: width of the histogram image (``FramesConfig.analysis_width``).
        sharp_width: width of the grey image sharpness and the perceptual hash use.

    Returns:
        ``hist`` ``[B, 160]`` float32, ``sharpness`` ``[B]`` float64, ``grey`` ``[B, h, w]`` uint8,
        all on ``nv12``'s device.
    """
    import torch

    from yokai_pipeline.frames import _scaled_size

    n = nv12.shape[0]
    y = nv12[:, :height].to(torch.float32)
    uv = nv12[:, height : height + height // 2].reshape(n, height // 2, width // 2, 2).to(torch.float32)
    sw, sh = _scaled_size(width, height, sharp_width)
    grey = _resize(y, (sh, sw))
    hw, hh = _scaled_size(width, height, hist_width)
    small_y = _resize(grey, (hh, hw))
    small_u = _resize(uv[..., 0].contiguous(), (hh // 2, hw // 2))
    small_v = _resize(uv[..., 1].contiguous(), (hh // 2, hw // 2))
    hist = colour_histograms(i420_to_bgr(small_y, small_u, small_v))
    return hist, laplacian_variance(grey), grey.to(torch.uint8)


def nv12_to_rgb(nv12: Any, width: int, height: int) -> Any:
    """``[H, W, 3]`` uint8 RGB of one NV12 frame: BT.601 limited range, chroma repeated per 2x2 block.

    What FFmpeg's swscale (PyAV's ``to_ndarray("rgb24")``) gives for an untagged 8-bit stream,
    within two levels (it also repeats chroma and truncates); tests/unit/test_video.py bounds it.
    """
    import torch

    y = nv12[:height].to(torch.float32)
    uv = nv12[height : height + height // 2].reshape(height // 2, width // 2, 2).to(torch.float32)
    uv = uv.repeat_interleave(2, 0).repeat_interleave(2, 1)
    c = (y - 16.0) * 1.164383
    u, v = uv[..., 0] - 128.0, uv[..., 1] - 128.0
    rgb = torch.stack([c + 1.596027 * v, c - 0.391762 * u - 0.812968 * v, c + 2.017232 * u], -1)
    return rgb.floor_().clamp_(0, 255).to(torch.uint8)
