"""CCIP (deepghs' anime Contrastive Character Image Pretraining): character identity features.

Published as ONNX in ``deepghs/ccip_onnx`` under ``<model name>/``: ``model_feat.onnx``
(image -> 768-d feature), ``model_metrics.onnx`` (N features -> N x N differences, its own
learned metric) and ``metrics.json`` (``threshold``: two images show the same character when
their difference is at most this). Everything here follows imgutils'
``imgutils/metrics/ccip.py``:

* the image is converted to RGB (a transparent layer is put on white, as imgutils'
  ``load_image(mode="RGB")`` does), resized to 384 x 384 with PIL's bilinear filter, scaled to
  [0, 1] and normalised with the CLIP mean / std, NCHW;
* differences come from the metric model, never from a cosine of the features;
* ``ccip_default_threshold`` is ``metrics.json``'s ``threshold``.

Both models run on onnxruntime on CPU, or converted to torch (onnx2torch) under bf16
autocast on CUDA (see :mod:`yokai_pipeline.models.onnx_graph`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from yokai_pipeline.errors import BadInputError
from yokai_pipeline.models.onnx_graph import OnnxModel, Runtime, load_onnx_model, resolve_model_file

REPO_ID = "deepghs/ccip_onnx"
DEFAULT_MODEL = "ccip-caformer-24-randaug-pruned"
FEATURE_FILE, METRIC_FILE, METRICS_JSON = "model_feat.onnx", "model_metrics.onnx", "metrics.json"
SIZE = 384
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
#: Most features the metric model sees at once (its output is N x N).
METRIC_BLOCK = 512


def preprocess(image: Any, size: int = SIZE) -> np.ndarray:
    """A PIL image (any mode) or RGB uint8 array -> float32 ``[3, size, size]`` as imgutils does."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB").resize((size, size), resample=Image.BILINEAR)
    data = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean, std = np.asarray(MEAN, dtype=np.float32), np.asarray(STD, dtype=np.float32)
    return ((data - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


class CCIP:
    """CCIP feature + metric models and the same-character threshold."""

    def __init__(self, feature: OnnxModel, metric: OnnxModel, threshold: float, name: str):
        self.feature = feature
        self.metric = metric
        self.threshold = float(threshold)
        self.name = name
        shape = feature.input_shape
        self.size = int(shape[2]) if len(shape) == 4 and shape[2] else SIZE

    @property
    def dim(self) -> int:
        shape = self.metric.input_shape
        return int(shape[1]) if len(shape) == 2 and shape[1] else 768

    def features(self, images: list[Any]) -> np.ndarray:
        """float32 ``[n, dim]`` features of PIL images / RGB arrays (not normalised: the metric needs them raw)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.feature.run(np.stack([preprocess(im, self.size) for im in images]))[0]

    def differences(self, a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        """CCIP differences between rows of ``a`` and rows of ``b`` (``a`` itself when None).

        The metric model scores a set of features jointly (N x N); a large request is cut
        into blocks of at most :data:`METRIC_BLOCK` features, each pair of blocks run together.
        """
        b = a if b is None else b
        out = np.empty((len(a), len(b)), dtype=np.float32)
        half = max(1, METRIC_BLOCK // 2)
        for i in range(0, len(a), half):
            for j in range(0, len(b), half):
                pa, pb = a[i : i + half], b[j : j + half]
                d = self.metric.run_whole(np.concatenate([pa, pb]))[0]
                out[i : i + len(pa), j : j + len(pb)] = d[: len(pa), len(pa) :]
        return out


def _model_files(source: str | Path) -> tuple[Path, Path, Path]:
    """The three files of a CCIP model from a local folder or a hub reference (cache only)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        files = tuple(folder / f for f in (FEATURE_FILE, METRIC_FILE, METRICS_JSON))
        for f in files:
            if not f.is_file():
                raise BadInputError(
                    f,
                    "CCIP model file not found (a CCIP folder holds "
                    f"{FEATURE_FILE}, {METRIC_FILE} and {METRICS_JSON})",
                )
        return files  # type: ignore[return-value]
    parts = str(source).strip("/").split("/")
    if len(parts) < 2 or folder.suffix:
        raise BadInputError(source, "CCIP model folder not found")
    prefix = "/".join(parts[:2]) + "/" + ("/".join(parts[2:]) or DEFAULT_MODEL)
    return tuple(resolve_model_file(f"{prefix}/{f}") for f in (FEATURE_FILE, METRIC_FILE, METRICS_JSON))  # type: ignore[return-value]


def read_threshold(path: Path) -> float:
    """``threshold`` from a CCIP ``metrics.json``."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))["threshold"]
        return float(value)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(path, f"not a CCIP metrics.json with a numeric 'threshold' ({exc})") from exc


_cache: dict[tuple, CCIP] = {}
_cache_lock = threading.Lock()


def load_ccip(
    source: str | Path = REPO_ID,
    device: str = "auto",
    batch_size: int = 32,
    *,
    runtime: Runtime = "auto",
    threshold: float | None = None,
) -> CCIP:
    """Load CCIP (feature model, metric model, threshold), memoised per process.

    Args:
        source: a folder with ``model_feat.onnx``, ``model_metrics.onnx`` and ``metrics.json``;
            or ``deepghs/ccip_onnx`` (the default model) or ``deepghs/ccip_onnx/<model>``,
            looked up in the local Hugging Face cache only.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass of the feature model.
        runtime: ``auto`` (torch on CUDA, onnxruntime on CPU), ``onnxruntime`` or ``torch``.
        threshold: override ``metrics.json``'s same-character threshold.

    Raises:
        BadInputError: a file is missing, not in the cache, or not the expected model.
    """
    feat_path, metric_path, metrics_path = _model_files(source)
    key = (str(feat_path), str(metric_path), device, batch_size, runtime, threshold)
    with _cache_lock:
        if key not in _cache:
            thr = read_threshold(metrics_path) if threshold is None else threshold
            feature = load_onnx_model(feat_path, device, runtime, batch_size)
            metric = load_onnx_model(metric_path, device, runtime, METRIC_BLOCK)
            if len(feature.input_shape) != 4:
                raise BadInputError(feat_path, f"not a CCIP feature model: input shape {feature.input_shape}")
            if len(metric.input_shape) != 2:
                raise BadInputError(metric_path, f"not a CCIP metric model: input shape {metric.input_shape}")
            _cache[key] = CCIP(feature, metric, thr, name=feat_path.parent.name)
        return _cache[key]
