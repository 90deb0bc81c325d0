"""IS-Net (Qin et al., 2022, "DIS") as trained for anime by skytnt/anime-segmentation ("isnetis").

The published checkpoint (``skytnt/anime-seg`` ``isnetis.ckpt``, the model rembg calls
``isnet-anime``) is a PyTorch Lightning checkpoint of ``AnimeSegmentation``: the segmentation
network under ``net.`` and, for training only, a ground-truth encoder under ``gt_encoder.``.
Module names here match upstream's ``model/isnet.py`` ``ISNetDIS`` (``conv_in``, ``stage1`` ..
``stage6``, ``stage5d`` .. ``stage1d``, ``side1`` .. ``side6``; RSU blocks with
``rebnconvin``, ``rebnconv1`` .., ``rebnconv1d``), so the ``net.`` weights load with
``strict=True``. The RSU blocks are U^2-Net's (:mod:`yokai_pipeline.models.u2net`, same
upstream names), reused rather than redefined.

Inference follows upstream ``inference.py``: RGB / 255 (no mean / std), the longer side
resized to 1024 and the image centred on a black 1024 x 1024 square, ``sigmoid(side1)``, the
padding cropped away and the mask resized back. On CUDA under bf16 autocast.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yokai_pipeline.errors import BadInputError
from yokai_pipeline.models import u2net

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: (height, in, mid, out) of each RSU stage; height 0 = RSU-4F (upstream ISNetDIS.__init__).
ENCODER = (
    (7, 64, 32, 64),
    (6, 64, 32, 128),
    (5, 128, 64, 256),
    (4, 256, 128, 512),
    (0, 512, 256, 512),
    (0, 512, 256, 512),
)
DECODER = ((0, 1024, 256, 512), (4, 1024, 128, 256), (5, 512, 64, 128), (6, 256, 32, 64), (7, 128, 16, 64))
SIDES = (64, 64, 128, 256, 512, 512)
#: Output channels of ``conv_in`` in the published model; a smaller value marks a narrower test model.
WIDTH = 64


def _scaled(widths: tuple, width: int) -> tuple:
    """Channel counts of a model ``width / WIDTH`` as wide (heights unchanged)."""
    return tuple(
        (w[0], *(c * width // WIDTH for c in w[1:])) if isinstance(w, tuple) else w * width // WIDTH
        for w in widths
    )


@dataclass(frozen=True)
class ISNetPreprocess:
    """Upstream inference settings: square input side; pixels / 255 only."""

    input_size: int = 1024


def _define() -> type:
    torch = u2net._torch()
    nn = torch.nn
    F = torch.nn.functional
    classes = u2net._classes()
    RSU, RSU4F = classes["RSU"], classes["RSU4F"]

    def block(height: int, in_ch: int, mid: int, out: int) -> nn.Module:
        return RSU4F(in_ch, mid, out) if height == 0 else RSU(height, in_ch, mid, out)

    def up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

    class ISNetDIS(nn.Module):
        """Stride-2 input conv, six RSU encoder stages, five decoder stages, six side outputs.

        ``forward`` returns the six side logits at input size (upstream returns them with the
        decoder features); inference uses ``sigmoid(side1)``. Upstream computes ``pool_in``
        and then feeds ``stage1`` the un-pooled ``conv_in`` output: kept as is, the weights
        were trained that way.
        """

        def __init__(self, in_ch: int = 3, out_ch: int = 1, width: int = WIDTH):
            super().__init__()
            self.preprocess = ISNetPreprocess()
            self.variant = "isnet"
            self.width = width
            self.conv_in = nn.Conv2d(in_ch, width, 3, stride=2, padding=1)
            self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
            for i, cfg in enumerate(_scaled(ENCODER, width), 1):
                setattr(self, f"stage{i}", block(*cfg))
            for i, cfg in zip(range(5, 0, -1), _scaled(DECODER, width), strict=True):
                setattr(self, f"stage{i}d", block(*cfg))
            for i, ch in enumerate(_scaled(SIDES, width), 1):
                setattr(self, f"side{i}", nn.Conv2d(ch, out_ch, 3, padding=1))

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            hx = self.conv_in(x)
            enc = []
            for i in range(1, 7):
                hx = getattr(self, f"stage{i}")(hx)
                enc.append(hx)
                if i < 6:
                    hx = self.pool(hx)
            dec = [enc[5]]  # hx6, hx5d, hx4d, hx3d, hx2d, hx1d
            for i in range(5, 0, -1):
                dec.append(
                    getattr(self, f"stage{i}d")(torch.cat((up_to(dec[-1], enc[i - 1]), enc[i - 1]), 1))
                )
            return [up_to(getattr(self, f"side{i}")(dec[6 - i]), x) for i in range(1, 7)]

    return ISNetDIS


_cls: type | None = None
_cls_lock = threading.Lock()


def build_isnet(width: int = WIDTH) -> torch.nn.Module:
    """A randomly initialised ISNetDIS: 44.0 M parameters (176 MB fp32, ``isnetis.ckpt``'s ``net.``).

    ``width`` < 64 builds the same architecture with proportionally fewer channels (tests).
    """
    global _cls
    if width < 4 or width % 4 or width > WIDTH:
        raise ValueError(f"IS-Net width must be a multiple of 4 up to {WIDTH}, got {width}")
    with _cls_lock:
        if _cls is None:
            _cls = _define()
    return _cls(width=width)


def checkpoint_state(state: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The segmentation net's weights from an upstream checkpoint or a bare state dict.

    ``isnetis.ckpt`` keeps them under ``net.`` beside the training-only ``gt_encoder.``;
    ``export.py --to only_net_state_dict`` writes them bare.
    """
    if any(k.startswith("net.") for k in state):
        return {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    if any(k.startswith("gt_encoder.") for k in state):
        raise BadInputError(path, "holds only the IS-Net ground-truth encoder, not the segmentation net")
    return state


def read_isnet_state(path: str | Path) -> dict[str, Any]:
    """Read IS-Net weights (``.ckpt`` / ``.pth`` with ``weights_only=True``, or ``.safetensors``)."""
    return u2net.read_state_dict(
        path,
        "IS-Net",
        select=checkpoint_state,
        hint="; a Lightning checkpoint that weights_only refuses can be converted once with "
        "anime-segmentation's export.py --to only_net_state_dict",
    )


_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def load_isnet(path: str | Path, device: str | None = "auto", *, compile: bool = False) -> torch.nn.Module:
    """Load the anime IS-Net for inference, memoised per process.

    Raises:
        BadInputError: the file is missing, unreadable, or not an ISNetDIS state dict.
    """
    path = Path(path).resolve()
    device = u2net.resolve_device(device)
    key = (str(path), u2net.file_stamp(path), device, compile)
    with _cache_lock:
        if key not in _cache:
            state = read_isnet_state(path)
            conv_in = state.get("conv_in.weight")
            # The published net is 64 wide; a narrower (test) net says so by its first conv.
            width = (
                int(conv_in.shape[0]) if conv_in is not None and conv_in.shape[0] in (4, 8, 16, 32) else WIDTH
            )
            model = build_isnet(width)
            u2net.load_state_dict_strict(model, state, path)
            _cache[key] = u2net.prepare_for_inference(model.eval(), device, compile)
        return _cache[key]


def letterbox_geometry(h: int, w: int, side: int) -> tuple[int, int, int, int]:
    """Upstream's fit: ``(new_h, new_w, pad_top, pad_left)`` of an h x w image centred in side x side."""
    nh, nw = (side, int(side * w / h)) if h > w else (int(side * h / w), side)
    return nh, nw, (side - nh) // 2, (side - nw) // 2


def predict_masks(
    model: torch.nn.Module, batch: torch.Tensor, *, input_size: int | None = None
) -> torch.Tensor:
    """Masks for a batch of same-size uint8 images, as upstream ``inference.get_mask``.

    Args:
        model: from :func:`load_isnet` or :func:`build_isnet` (eval mode).
        batch: uint8 (or float 0-255) NHWC ``[N, H, W, 3]`` or NCHW tensor, any device.
        input_size: override the square input side (1024).

    Returns:
        float32 ``[N, H, W]`` masks in [0, 1] on the model's device.
    """
    torch = u2net._torch()
    F = torch.nn.functional
    if batch.ndim != 4:
        raise ValueError(f"expected a 4-d image batch, got shape {tuple(batch.shape)}")
    if batch.shape[1] != 3 and batch.shape[-1] == 3:
        batch = batch.permute(0, 3, 1, 2)
    side = input_size or model.preprocess.input_size
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    h, w = batch.shape[-2:]
    nh, nw, top, left = letterbox_geometry(h, w, side)
    with torch.inference_mode():
        x = batch.to(device, non_blocking=True).float().div_(255.0)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        canvas = x.new_zeros((x.shape[0], 3, side, side))
        canvas[:, :, top : top + nh, left : left + nw] = x
        if cuda:
            canvas = canvas.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(canvas)[0]
        mask = torch.sigmoid(logits.float())[:, :, top : top + nh, left : left + nw]
        mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return mask.clamp_(0, 1)
