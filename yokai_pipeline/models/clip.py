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
class ClipBundle:
    """A loaded model with the pieces of its own preprocessing that the embedder needs.

    Attributes:
        model: the open_clip model in eval mode on ``device`` (only ``encode_image`` is used).
        pil_transform: open_clip's preprocessing up to (not including) tensor conversion:
            resize / crop on a PIL image, so CPU workers hand over small uint8 arrays.
        mean: per-channel normalisation mean from the model's preprocess config.
        std: per-channel normalisation std from the model's preprocess config.
        image_size: (height, width) the model expects.
        device: torch device string.
        dim: embedding dimension.
    """

    model: Any
    pil_transform: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int]
    device: str
    dim: int


def resolve_device(device: str) -> str:
    """Map ``auto`` to ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
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
        from torchvision import transforms as T
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

    pil_steps, mean, std = [], None, None
    for step in preprocess.transforms:
        if isinstance(step, T.ToTensor):
            continue
        if isinstance(step, T.Normalize):
            mean, std = tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
            continue
        pil_steps.append(step)
    if mean is None:  # pragma: no cover - every open_clip eval transform normalises
        raise ConfigError(f"open_clip preprocess of {model_name} has no Normalize step")
    size = clip_model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    with torch.inference_mode():
        dim = int(clip_model.encode_image(torch.zeros(1, 3, *size, device=device)).shape[-1])
    return ClipBundle(
        model=clip_model,
        pil_transform=T.Compose(pil_steps),
        mean=mean,
        std=std,
        image_size=size,
        device=device,
        dim=dim,
    )


def clear_cache() -> None:
    """Drop memoised models (tests, or to free GPU memory)."""
    with _LOCK:
        _CACHE.clear()
