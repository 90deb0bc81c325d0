"""U^2-Net and U^2-NetP (Qin et al., 2020) in torch, loading the official weight files.

The module and parameter names match the official ``xuebinqin/U-2-Net`` state dicts
(``stage1.rebnconvin.conv_s1.weight``, ``side1``, ``outconv`` ...), so ``u2net.pth``
(176.3 MB) and ``u2netp.pth`` (4.7 MB) load with ``strict=True``. The network is written
here from the paper's description: nested residual U-blocks (RSU-L) in a six-stage
encoder/decoder, one side output per decoder stage, fused by a 1x1 conv.

Inference (:func:`predict_masks`) follows the official test script: resize to 320x320,
divide by the image maximum, ImageNet mean/std, take the fused output (already through a
sigmoid), min-max normalise each map, resize back. On CUDA it runs under bf16 autocast in
channels_last with cuDNN autotuning and optionally ``torch.compile``; on CPU in fp32.

torch is imported lazily by the public functions so that importing this module is cheap;
the classes themselves need torch and are created through :func:`build_u2net`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yokai_pipeline.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

VARIANTS = ("u2net", "u2netp")


@dataclass(frozen=True)
class U2NetPreprocess:
    """The model's own preprocessing (from the official test script)."""

    input_size: int = 320
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class U2NetSpec:
    """Widths of one U^2-Net variant: per stage (height, in, mid, out) and side-output inputs."""

    encoder: tuple[tuple[int, int, int, int], ...]
    decoder: tuple[tuple[int, int, int, int], ...]
    side_channels: tuple[int, ...]
    preprocess: U2NetPreprocess = field(default_factory=U2NetPreprocess)


# height 0 marks the dilated RSU-4F block (no pooling inside).
SPECS: dict[str, U2NetSpec] = {
    "u2net": U2NetSpec(
        encoder=(
            (7, 3, 32, 64),
            (6, 64, 32, 128),
            (5, 128, 64, 256),
            (4, 256, 128, 512),
            (0, 512, 256, 512),
            (0, 512, 256, 512),
        ),
        decoder=(
            (0, 1024, 256, 512),
            (4, 1024, 128, 256),
            (5, 512, 64, 128),
            (6, 256, 32, 64),
            (7, 128, 16, 64),
        ),
        side_channels=(64, 64, 128, 256, 512, 512),
    ),
    "u2netp": U2NetSpec(
        encoder=(
            (7, 3, 16, 64),
            (6, 64, 16, 64),
            (5, 64, 16, 64),
            (4, 64, 16, 64),
            (0, 64, 16, 64),
            (0, 64, 16, 64),
        ),
        decoder=((0, 128, 16, 64), (4, 128, 16, 64), (5, 128, 16, 64), (6, 128, 16, 64), (7, 128, 16, 64)),
        side_channels=(64, 64, 64, 64, 64, 64),
    ),
}


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The u2net backend needs PyTorch: pip install 'yokai-pipeline[ml]' (torch)"
        ) from exc
    return torch


def _define_modules() -> dict[str, type]:
    """Define the nn.Module classes on first use (keeps torch out of module import)."""
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    def up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        # Upsample to the reference's size (not a fixed x2) so odd sizes still line up.
        return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

    class REBNCONV(nn.Module):
        """3x3 conv (optionally dilated) -> batch norm -> ReLU."""

        def __init__(self, in_ch: int, out_ch: int, dilation: int = 1):
            super().__init__()
            self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
            self.bn_s1 = nn.BatchNorm2d(out_ch)
            self.relu_s1 = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu_s1(self.bn_s1(self.conv_s1(x)))

        def fuse_(self) -> None:
            """Fold the eval-mode batch norm into the conv (inference only: saves a kernel per layer)."""
            if isinstance(self.bn_s1, nn.BatchNorm2d):
                self.conv_s1 = torch.nn.utils.fusion.fuse_conv_bn_eval(self.conv_s1, self.bn_s1)
                self.bn_s1 = nn.Identity()

    class RSU(nn.Module):
        """Residual U-block of height L (RSU-7 ... RSU-4): a small U-Net added to its input conv.

        The encoder has L-1 convs with 2x max-pooling between them and a dilated conv at the
        bottom; the decoder concatenates skip features and upsamples back.
        """

        def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int):
            super().__init__()
            self.height = height
            self.rebnconvin = REBNCONV(in_ch, out_ch)
            self.rebnconv1 = REBNCONV(out_ch, mid_ch)
            for i in range(2, height):
                setattr(self, f"rebnconv{i}", REBNCONV(mid_ch, mid_ch))
            setattr(self, f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dilation=2))
            for i in range(height - 1, 1, -1):
                setattr(self, f"rebnconv{i}d", REBNCONV(mid_ch * 2, mid_ch))
            self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch)
            self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hxin = self.rebnconvin(x)
            skips = [self.rebnconv1(hxin)]
            for i in range(2, self.height):
                skips.append(getattr(self, f"rebnconv{i}")(self.pool(skips[-1])))
            hx = getattr(self, f"rebnconv{self.height}")(skips[-1])
            for i in range(self.height - 1, 0, -1):
                hx = getattr(self, f"rebnconv{i}d")(torch.cat((hx, skips[i - 1]), 1))
                if i > 1:
                    hx = up_to(hx, skips[i - 2])
            return hx + hxin

    class RSU4F(nn.Module):
        """RSU-4F: the RSU-4 shape with dilations 1/2/4/8 instead of pooling (low-resolution stages)."""

        def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
            super().__init__()
            self.rebnconvin = REBNCONV(in_ch, out_ch)
            self.rebnconv1 = REBNCONV(out_ch, mid_ch)
            self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dilation=2)
            self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dilation=4)
            self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dilation=8)
            self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dilation=4)
            self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dilation=2)
            self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hxin = self.rebnconvin(x)
            hx1 = self.rebnconv1(hxin)
            hx2 = self.rebnconv2(hx1)
            hx3 = self.rebnconv3(hx2)
            hx4 = self.rebnconv4(hx3)
            hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
            hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
            hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
            return hx1d + hxin

    def block(height: int, in_ch: int, mid_ch: int, out_ch: int) -> nn.Module:
        return RSU4F(in_ch, mid_ch, out_ch) if height == 0 else RSU(height, in_ch, mid_ch, out_ch)

    class U2Net(nn.Module):
        """Six encoder stages, five decoder stages, six side outputs fused by ``outconv``.

        ``forward`` returns the seven sigmoid maps ``(fused, side1, ..., side6)`` like the
        official model, or only the fused map when ``fused_only`` is set (inference).
        """

        def __init__(self, spec: U2NetSpec, variant: str = "custom"):
            super().__init__()
            self.spec = spec
            self.variant = variant
            self.preprocess = spec.preprocess
            self.fused_only = False
            for i, cfg in enumerate(spec.encoder, 1):
                setattr(self, f"stage{i}", block(*cfg))
            for i, cfg in zip(range(5, 0, -1), spec.decoder, strict=True):
                setattr(self, f"stage{i}d", block(*cfg))
            for i, ch in enumerate(spec.side_channels, 1):
                setattr(self, f"side{i}", nn.Conv2d(ch, 1, 3, padding=1))
            self.outconv = nn.Conv2d(6, 1, 1)
            self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
            enc = []
            hx = x
            for i in range(1, 7):
                hx = getattr(self, f"stage{i}")(hx)
                enc.append(hx)
                if i < 6:
                    hx = self.pool(hx)
            dec = [enc[5]]  # hx6, hx5d, hx4d, hx3d, hx2d, hx1d
            for i in range(5, 0, -1):
                hx = getattr(self, f"stage{i}d")(torch.cat((up_to(dec[-1], enc[i - 1]), enc[i - 1]), 1))
                dec.append(hx)
            sides = [getattr(self, f"side{i}")(dec[6 - i]) for i in range(1, 7)]
            sides = [sides[0]] + [up_to(s, sides[0]) for s in sides[1:]]
            fused = self.outconv(torch.cat(sides, 1))
            if self.fused_only:
                return torch.sigmoid(fused)
            return tuple(torch.sigmoid(d) for d in (fused, *sides))

        def fuse_bn_(self) -> U2Net:
            """Fold every batch norm into its conv for inference; the state dict then no longer matches."""
            self.eval()
            for m in self.modules():
                if isinstance(m, REBNCONV):
                    m.fuse_()
            self.bn_fused = True
            return self

    return {"REBNCONV": REBNCONV, "RSU": RSU, "RSU4F": RSU4F, "U2Net": U2Net}


_modules: dict[str, type] | None = None
_modules_lock = threading.Lock()


def _classes() -> dict[str, type]:
    global _modules
    with _modules_lock:
        if _modules is None:
            _modules = _define_modules()
        return _modules


def build_u2net(variant: str = "u2net") -> torch.nn.Module:
    """A randomly initialised U^2-Net (``"u2net"``) or U^2-NetP (``"u2netp"``)."""
    if variant not in SPECS:
        raise ValueError(f"unknown U2Net variant {variant!r}; expected one of {VARIANTS}")
    return _classes()["U2Net"](SPECS[variant], variant)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def read_state_dict(
    path: str | Path,
    label: str = "U2Net",
    select: Callable[[dict, Path], dict] | None = None,
    hint: str = "",
) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pth``/``.pt`` file (``weights_only=True``).

    A ``module.`` prefix (DataParallel checkpoints) is stripped.

    Args:
        path: the weight file.
        label: the model's name in error messages.
        select: picks the model's weights out of a larger checkpoint (IS-Net's Lightning file).
        hint: appended to the "cannot read" error (how to convert an unreadable checkpoint).

    Raises:
        BadInputError: the file is missing or not a readable state dict.
    """
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, f"{label} weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise BadInputError(path, f"cannot read {label} weights ({type(exc).__name__}: {exc}){hint}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if select is not None and isinstance(state, dict):
        state = select(state, path)
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise BadInputError(path, "is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``load_state_dict(strict=True)`` whose error names the file and the first mismatching keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        parts = []
        for name, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong_shape),
        ):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:3])})")
        variant = getattr(model, "variant", "U2Net")
        raise BadInputError(path, f"not a {variant} state dict: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device in (None, "auto"):
        return "cuda" if _torch().cuda.is_available() else "cpu"
    return str(device)


def load_u2net(
    path: str | Path,
    variant: str = "u2net",
    device: str | None = "auto",
    dtype: Any = None,
    *,
    fuse_bn: bool = True,
    compile: bool = False,
) -> torch.nn.Module:
    """Load official U^2-Net / U^2-NetP weights for inference, memoised per process.

    Args:
        path: ``.pth`` state dict (read with ``weights_only=True``) or ``.safetensors``.
        variant: ``"u2net"`` (full, 44.0 M parameters) or ``"u2netp"`` (1.13 M).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: parameter dtype (default float32; autocast handles bf16 on CUDA).
        fuse_bn: fold batch norms into the convs (same outputs, fewer kernels).
        compile: wrap the model in ``torch.compile`` (CUDA; first batches are slow).

    Returns:
        The model in eval mode with ``fused_only`` set (forward returns the fused map).

    Raises:
        BadInputError: the file is missing, unreadable, or not a state dict of ``variant``.
    """
    path = Path(path).resolve()
    device = resolve_device(device)
    key = (str(path), file_stamp(path), variant, device, str(dtype), fuse_bn, compile)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        model = build_u2net(variant)
        load_state_dict_strict(model, read_state_dict(path), path)
        model.eval()
        if fuse_bn:
            model.fuse_bn_()
        model.fused_only = True
        if dtype is not None:
            model.to(dtype=dtype)
        model = prepare_for_inference(model, device, compile)
        _cache[key] = model
        return model


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of a weight file, so a replaced file is loaded again; None when unreadable."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def prepare_for_inference(model: torch.nn.Module, device: str, compile: bool) -> torch.nn.Module:
    """Move an eval-mode model to ``device``; on CUDA channels_last + cuDNN autotuning; optional compile."""
    torch = _torch()
    model.to(device)
    if device.startswith("cuda"):
        # Fixed input sizes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    if compile:
        compiled = torch.compile(model, dynamic=False)
        compiled.preprocess = model.preprocess
        model = compiled
    return model


def save_u2net_safetensors(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the model's (unfused) state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    from yokai_pipeline.fsio import atomic_path

    if getattr(model, "bn_fused", False):
        raise ValueError(
            "cannot save a model whose batch norms were fused; save the model before load_u2net fuses it"
        )
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "arch": getattr(model, "variant", "u2net")})
    return Path(path)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


_norm_cache: dict[tuple, tuple[Any, Any]] = {}


def _norm_tensors(pre: U2NetPreprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std as [1, 3, 1, 1] tensors on ``device``, made once per device.

    Building them per call would copy from pageable host memory, which on CUDA waits for
    the stream: the host could then not queue the next batch while the GPU runs this one.
    """
    key = (str(device), pre.mean, pre.std)
    got = _norm_cache.get(key)
    if got is None:
        torch = _torch()
        got = (
            torch.tensor(pre.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(pre.std, device=device).view(1, 3, 1, 1),
        )
        _norm_cache[key] = got
    return got


def predict_masks(
    model: torch.nn.Module, batch: torch.Tensor, *, resize_back: bool = True, input_size: int | None = None
) -> torch.Tensor:
    """Saliency masks for a batch of uint8 images, like the official test script.

    Args:
        model: from :func:`load_u2net` or :func:`build_u2net` (eval mode).
        batch: uint8 (or float 0-255) tensor, NHWC ``[N, H, W, 3]`` or NCHW ``[N, 3, H, W]``, any device.
        resize_back: resize the masks to the input's H x W (else keep the model's input size).
        input_size: override the model's square input size (320); a multiple of 32.

    Returns:
        float32 ``[N, H, W]`` masks in [0, 1] on the model's device.
    """
    torch = _torch()
    F = torch.nn.functional
    if batch.ndim != 4:
        raise ValueError(f"expected a 4-d image batch, got shape {tuple(batch.shape)}")
    if batch.shape[1] != 3 and batch.shape[-1] == 3:
        batch = batch.permute(0, 3, 1, 2)
    if batch.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(batch.shape)}")
    pre: U2NetPreprocess = model.preprocess
    device = _model_device(model)
    cuda = device.type == "cuda"
    h, w = batch.shape[-2:]
    with torch.inference_mode():
        x = batch.to(device, non_blocking=True).float()
        side = input_size or pre.input_size
        size = (side, side)
        if (h, w) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        # Official normalisation: divide by the image maximum, then ImageNet mean/std.
        x = x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        mean, std = _norm_tensors(pre, device)
        x = (x - mean) / std
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
        else:
            x = x.to(next(model.parameters()).dtype)
            out = model(x)
        d = (out[0] if isinstance(out, tuple) else out).float()[:, 0]
        lo = d.amin(dim=(1, 2), keepdim=True)
        hi = d.amax(dim=(1, 2), keepdim=True)
        d = (d - lo) / (hi - lo).clamp_min(1e-6)
        if resize_back and (h, w) != size:
            d = F.interpolate(d[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return d.clamp_(0, 1)
