"""open_clip image encoders, loaded once per process.

``load_clip`` accepts what open_clip accepts: a built-in model name with a pretrained tag
(weights resolved through the Hugging Face cache; ``HF_HOME`` / ``HF_HUB_CACHE`` /
``HF_HUB_OFFLINE`` are honoured by huggingface_hub), a built-in name with a local checkpoint
file, ``hf-hub:org/repo``, or ``local-dir:/folder`` (an ``open_clip_config.json`` plus optional
weights). ``pretrained=None`` builds the architecture with random weights (tests, benchmarks).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import ConfigError

_CACHE: dict[tuple[str, str | None, str], ClipBundle] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ResizePlan:
    """open_clip's eval resize + centre crop as plain numbers, so decode workers need no torch.

    One PIL ``resize`` with a source ``box`` produces the centre crop directly, with
    torchvision's own size and crop arithmetic, so the rows and columns the crop drops are
    never resampled. Pixels equal open_clip's except where Pillow runs its two resampling
    passes in the other order for the smaller output (a uint8 rounding at hard edges).

    Attributes:
        size: torchvision ``Resize`` size: ``(shortest_side,)`` or ``(height, width)``.
        crop: ``(height, width)`` of the centre crop, or None when there is none.
        resample: PIL resampling filter id (torchvision maps its interpolation the same way).
    """

    size: tuple[int, ...]
    crop: tuple[int, int] | None
    resample: int

    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
        """Output size and source box for an image of ``width`` x ``height``.

        Args:
            width: source width in pixels.
            height: source height in pixels.

        Returns:
            ``((out_width, out_height), (left, top, right, bottom))`` for ``PIL.Image.resize``.
        """
        if len(self.size) == 1:  # torchvision _compute_resized_output_size, shortest side
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.size[0], int(self.size[0] * long / short)
            rw, rh = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            rh, rw = self.size
        if self.crop is None:
            return (rw, rh), (0.0, 0.0, float(width), float(height))
        ch, cw = self.crop
        top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))  # torchvision center_crop
        sx, sy = width / rw, height / rh
        box = (left * sx, top * sy, min((left + cw) * sx, width), min((top + ch) * sy, height))
        return (cw, ch), box


def resize_plan(pil_transform: Any) -> ResizePlan | None:
    """Read a :class:`ResizePlan` off an open_clip eval transform, if it is one the plan can express.

    Supported: ``Resize`` (shortest side or fixed size, no ``max_size``, a filter PIL applies
    with antialiasing) optionally followed by a ``CenterCrop`` no larger than the resized image,
    and a conversion to RGB. Anything else (``ResizeKeepRatio``, ``CenterCropOrPad``, padding
    crops, custom steps) returns None and the embedder runs the transform itself.

    Args:
        pil_transform: a torchvision ``Compose`` of PIL steps (``ClipBundle.pil_transform``).

    Returns:
        The plan, or None.
    """
    from torchvision import transforms as T
    from torchvision.transforms.functional import InterpolationMode, pil_modes_mapping

    steps = list(getattr(pil_transform, "transforms", [pil_transform]))
    if not steps or type(steps[0]) is not T.Resize:
        return None
    resize, rest = steps[0], steps[1:]
    filters = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC, InterpolationMode.LANCZOS,
               InterpolationMode.BOX, InterpolationMode.HAMMING)  # fmt: skip
    if resize.max_size is not None or resize.interpolation not in filters:
        return None
    size = (resize.size,) if isinstance(resize.size, int) else tuple(int(v) for v in resize.size)
    if len(size) not in (1, 2):
        return None
    crop = None
    if rest and type(rest[0]) is T.CenterCrop:
        ch, cw = (int(v) for v in rest[0].size)  # torchvision stores (height, width)
        # torchvision pads when the crop is larger than the resized image: not expressible here
        if (len(size) == 1 and max(ch, cw) > size[0]) or (len(size) == 2 and (ch > size[0] or cw > size[1])):
            return None
        crop, rest = (ch, cw), rest[1:]
    for step in rest:  # only a conversion to RGB may follow; composited layers already are RGB
        rgb = type(step).__name__ == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB"
        if not (rgb or getattr(step, "__name__", "") == "_convert_to_rgb"):  # older open_clip
            return None
    return ResizePlan(size=size, crop=crop, resample=int(pil_modes_mapping[resize.interpolation]))


@dataclass(frozen=True)
class ClipBundle:
    """A loaded model with the pieces of its own preprocessing that the embedder needs.

    Attributes:
        model: the open_clip model in eval mode on ``device`` (only ``encode_image`` is used).
        pil_transform: open_clip's preprocessing up to (not including) tensor conversion:
            resize / crop on a PIL image, so CPU workers hand over small uint8 arrays.
        resize_plan: the same resize / crop as a torch-free :class:`ResizePlan` (what the
            decode workers run), or None when the transform has steps the plan cannot express.
        mean: per-channel normalisation mean from the model's preprocess config.
        std: per-channel normalisation std from the model's preprocess config.
        image_size: (height, width) the model expects.
        device: torch device string.
        dim: embedding dimension.
    """

    model: Any
    pil_transform: Any
    resize_plan: ResizePlan | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int]
    device: str
    dim: int


def resolve_device(device: str) -> str:
    """Map ``auto`` to the leased device (``yokai_pipeline.runtime``), else ``cuda`` when visible, else ``cpu``."""
    import torch

    from yokai_pipeline.runtime import resolve_auto

    device = resolve_auto(device, torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"embedding.device={device!r} but no CUDA device is visible; use 'cpu' or 'auto'")
    return device


def load_clip(model: str, pretrained: str | None, device: str = "auto") -> ClipBundle:
    """Load (once per process) an open_clip model and its preprocessing.

    Args:
        model: open_clip model name (``ViT-B-32``), or ``hf-hub:org/repo`` / ``local-dir:/path``.
        pretrained: pretrained tag (``laion2b_s34b_b79k``), a local checkpoint file, or None for
            random weights. Ignored by open_clip when ``model`` carries a schema.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        A :class:`ClipBundle`; the same object for the same arguments within a process.

    Raises:
        ImportError: open_clip_torch is not installed.
        ConfigError: unknown model name, or a pretrained value that is neither a tag nor a file.
    """
    device = resolve_device(device)
    key = (model, None if pretrained is None else str(pretrained), device)
    with _LOCK:
        bundle = _CACHE.get(key)
        if bundle is None:
            bundle = _build(model, pretrained, device)
            _CACHE[key] = bundle
    return bundle


def _build(model_name: str, pretrained: str | None, device: str) -> ClipBundle:
    try:
        import open_clip
        import torch
        import torchvision  # noqa: F401 - the transforms below need it; fail here with the hint
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the clip embedding backend needs open_clip_torch and torch: pip install 'yokai-pipeline[ml]'"
        ) from exc

    if pretrained is not None and Path(pretrained).is_dir():
        # A folder holding open_clip_config.json (+ weights) is open_clip's local-dir schema.
        model_name, pretrained = f"local-dir:{pretrained}", None
    has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and model_name.replace("/", "-") not in open_clip.list_models():
        raise ConfigError(
            f"embedding.model={model_name!r} is not an open_clip model; see open_clip.list_models()"
        )
    if pretrained is not None and not has_schema:
        known = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
        if pretrained not in known and not Path(pretrained).is_file():
            raise ConfigError(
                f"embedding.pretrained={pretrained!r} is neither a tag of {model_name} ({', '.join(known) or 'none'}) "
                "nor an existing checkpoint file"
            )
    # weights_only=True: a checkpoint is never unpickled as arbitrary code.
    clip_model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=None if has_schema else pretrained, device=device, weights_only=True
    )
    clip_model.eval().requires_grad_(False)

    pil_transform, mean, std = split_preprocess(preprocess)
    if mean is None or std is None:  # pragma: no cover - every open_clip eval transform normalises
        raise ConfigError(f"open_clip preprocess of {model_name} has no Normalize step")
    size = clip_model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    with torch.inference_mode():
        dim = int(clip_model.encode_image(torch.zeros(1, 3, *size, device=device)).shape[-1])
    return ClipBundle(
        model=clip_model,
        pil_transform=pil_transform,
        resize_plan=resize_plan(pil_transform),
        mean=mean,
        std=std,
        image_size=size,
        device=device,
        dim=dim,
    )


def split_preprocess(preprocess: Any) -> tuple[Any, tuple[float, ...] | None, tuple[float, ...] | None]:
    """Split an open_clip eval transform into its PIL steps and its normalisation.

    Args:
        preprocess: the ``Compose`` that ``open_clip.create_model_and_transforms`` returns.

    Returns:
        ``(pil_transform, mean, std)``: a ``Compose`` of the steps before tensor conversion,
        and the ``Normalize`` mean and std (None if there is none).
    """
    from torchvision import transforms as T

    pil_steps, mean, std = [], None, None
    for step in preprocess.transforms:
        if isinstance(step, T.ToTensor):
            continue
        if isinstance(step, T.Normalize):
            mean, std = tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
            continue
        pil_steps.append(step)
    return T.Compose(pil_steps), mean, std


def clear_cache() -> None:
    """Drop memoised models (tests, or to free GPU memory)."""
    with _LOCK:
        _CACHE.clear()
