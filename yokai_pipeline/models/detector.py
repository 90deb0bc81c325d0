"""Anime person / half-body / head detectors (deepghs' YOLO exports), batched, ONNX or torch.

deepghs publishes YOLOv8-family detectors trained on anime images as ONNX files
(``deepghs/anime_person_detection``, ``deepghs/anime_halfbody_detection``,
``deepghs/anime_head_detection``, each ``<model name>/model.onnx``). Pre- and post-processing
follow imgutils' ``imgutils/generic/yolo.py`` (what ``imgutils/detect/person.py``,
``halfbody.py`` and ``head.py`` call), so boxes agree with the tools users know:

* the image is resized, not letterboxed, to the graph's ``imgsz`` metadata (640 when absent),
  with PIL's bicubic filter, scaled to [0, 1], RGB, NCHW; no mean/std (:func:`preprocess` is
  that reference; :func:`preprocess_batch` is what ``detect`` runs: the whole batch resized on
  the device in torch on CUDA, antialiased bicubic like PIL's, or with OpenCV on CPU, area
  filter when shrinking; both within a few 1/255 of PIL on drawn frames, tested);
* the output is ``[4 + classes, boxes]`` (centre x, y, width, height, then class scores) for
  NMS-based models, or ``[boxes, 6]`` (x0, y0, x1, y1, score, class) for end-to-end ones;
* boxes scoring above the confidence threshold go through greedy NMS (imgutils' ``+1``
  pixel-area convention), then are scaled back to source pixels and clipped to the image.

Boxes stay floats (imgutils rounds them to ints for display). The thresholds are imgutils'
defaults per detector kind.
"""

from __future__ import annotations

import ast
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from yokai_pipeline.errors import BadInputError
from yokai_pipeline.models.onnx_graph import (
    OnnxModel,
    Runtime,
    load_onnx_model,
    resolve_model_file,
    resolve_torch_device,
)
from yokai_pipeline.runtime import batching

Kind = Literal["person", "halfbody", "head"]


@dataclass(frozen=True)
class DetectorSpec:
    """Where a detector kind is published and the thresholds imgutils uses for it."""

    repo_id: str
    filename: str
    conf_threshold: float
    iou_threshold: float


#: imgutils/detect/person.py (detect_person: v1.1 "m", conf 0.3, iou 0.5), halfbody.py (v1.0 "s",
#: conf 0.5, iou 0.7), head.py (head_detect_v2.0_s, conf 0.4, iou 0.7).
SPECS: dict[str, DetectorSpec] = {
    "person": DetectorSpec("deepghs/anime_person_detection", "person_detect_v1.1_m/model.onnx", 0.3, 0.5),
    "halfbody": DetectorSpec(
        "deepghs/anime_halfbody_detection", "halfbody_detect_v1.0_s/model.onnx", 0.5, 0.7
    ),
    "head": DetectorSpec("deepghs/anime_head_detection", "head_detect_v2.0_s/model.onnx", 0.4, 0.7),
}
DEFAULT_IMGSZ = 640


# --------------------------------------------------------------------------- pure pre/post-processing


def input_size(meta: dict[str, str], shape: list[int | None]) -> tuple[int, int]:
    """The model's ``(width, height)``: fixed graph dims, else ``imgsz`` metadata, else 640."""
    if len(shape) == 4 and shape[2] and shape[3]:
        return int(shape[3]), int(shape[2])
    if "imgsz" in meta:
        size = json.loads(meta["imgsz"])
        # imgutils unpacks imgsz as (width, height); ultralytics writes [h, w]: equal for square models.
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return DEFAULT_IMGSZ, DEFAULT_IMGSZ


def labels_of(meta: dict[str, str], default: str) -> list[str]:
    """Class names from the ``names`` metadata (a Python dict literal, parsed safely)."""
    if "names" not in meta:
        return [default]
    names = ast.literal_eval(meta["names"])
    return [str(names[i]) for i in range(len(names))]


def preprocess(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 3xHxW in [0, 1] at ``size`` = (width, height), PIL bicubic (upstream)."""
    from PIL import Image

    _check_frame(image)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    return (resized.transpose(2, 0, 1) / 255.0).astype(np.float32)


def _resize_cv2(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # INTER_AREA is OpenCV's antialiased shrink (PIL's bicubic widens its kernel when shrinking;
    # OpenCV's INTER_CUBIC does not and aliases line art); bicubic when enlarging, like PIL.
    import cv2

    shrink = size[0] < image.shape[1] and size[1] < image.shape[0]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _check_frame(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")


def preprocess_batch(images: list[np.ndarray], size: tuple[int, int], device: str = "cpu") -> Any:
    """RGB uint8 frames -> float32 ``[N, 3, H, W]`` in [0, 1] at ``size`` = (width, height).

    On ``cuda`` the frames go to the device as uint8 (a quarter of the float bytes) and are
    resized there (torch bicubic with antialiasing, which follows PIL's filter), returning a
    device tensor; elsewhere OpenCV resizes each frame (releases the GIL, ~5x faster than PIL)
    and a numpy array comes back.
    """
    for im in images:
        _check_frame(im)
    if not str(device).startswith("cuda"):
        return np.stack([_resize_cv2(im, size) for im in images]).transpose(0, 3, 1, 2) / np.float32(255)
    return torch_resize(images, size, device)


def torch_resize(images: list[np.ndarray], size: tuple[int, int], device: str) -> Any:
    """The frames resized in torch on ``device`` (same-shape frames in one call), ``[N, 3, H, W]`` in [0, 1]."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    out = torch.empty((len(images), 3, size[1], size[0]), dtype=torch.float32, device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    for idx in groups.values():
        x = torch.from_numpy(np.stack([images[i] for i in idx])).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", align_corners=False, antialias=True)
        out[torch.as_tensor(idx, device=device)] = x.clamp_(0, 255).div_(255)
    return out


def xywh_to_xyxy(x: np.ndarray) -> np.ndarray:
    """Centre/size boxes to corner boxes (imgutils ``_yolo_xywh2xyxy``)."""
    y = np.array(x, dtype=np.float32, copy=True)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy NMS, highest score first, boxes with IoU above the threshold dropped (imgutils ``_yolo_nms``)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort(kind="stable")[::-1]
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return keep


def fast_nms(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """:func:`nms` in torchvision's C++/CUDA kernel: the same kept boxes, in the same order.

    imgutils measures boxes in whole pixels (``x2 - x1 + 1``); torchvision does not, so the
    boxes get one pixel more on their far sides: both areas and overlaps then come out as
    imgutils computes them. Takes numpy arrays or tensors (on any device); returns indices
    of the same kind.
    """
    import torch
    from torchvision.ops import nms as tv_nms

    host = isinstance(boxes, np.ndarray)
    b = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)) if host else boxes.float()
    sc = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)) if host else scores.float()
    keep = tv_nms(b + b.new_tensor([0.0, 0.0, 1.0, 1.0]), sc, float(iou_threshold))
    return keep.numpy() if host else keep


def _postprocess_device(
    output: Any,
    n_classes: int,
    conf: float,
    iou: float,
    source_size: tuple[int, int],
    model_size: tuple[int, int],
) -> np.ndarray:
    """:func:`postprocess` on the device: thresholds and NMS there, only the kept boxes come back."""
    import torch

    if output.ndim == 2 and output.shape[-1] == 6 and output.shape[0] != 4 + n_classes:
        return postprocess(output.cpu().numpy(), n_classes, conf, iou, source_size, model_size)
    if output.ndim != 2 or output.shape[0] != 4 + n_classes:
        raise ValueError(
            f"detector output of shape {tuple(output.shape)} is neither [4+{n_classes}, N] nor [N, 6]"
        )
    cls_scores = output[4:]
    scores, cls = cls_scores.max(dim=0)
    pick = scores > conf
    xywh = output[:4, pick].T
    if not xywh.shape[0]:
        return np.zeros((0, 6), dtype=np.float32)
    boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], dim=1)
    keep = fast_nms(boxes, scores[pick], iou)
    sx, sy = source_size[0] / model_size[0], source_size[1] / model_size[1]
    b = boxes[keep] * boxes.new_tensor([sx, sy, sx, sy])
    hi = boxes.new_tensor([source_size[0], source_size[1], source_size[0], source_size[1]])
    b = torch.minimum(b.clamp(min=0), hi)
    rows = torch.cat([b, scores[pick][keep, None], cls[pick][keep, None].float()], dim=1)
    return rows.cpu().numpy().astype(np.float32)


def postprocess(
    output: np.ndarray,
    n_classes: int,
    conf_threshold: float,
    iou_threshold: float,
    source_size: tuple[int, int],
    model_size: tuple[int, int],
) -> np.ndarray:
    """One image's raw output -> float32 ``[N, 6]``: x0, y0, x1, y1 (source pixels), score, class.

    Args:
        output: ``[4 + n_classes, boxes]`` (NMS-based YOLO) or ``[boxes, 6]`` (end to end).
        source_size, model_size: ``(width, height)`` of the source image and of the model input.
    """
    if output.ndim == 2 and output.shape[-1] == 6 and output.shape[0] != 4 + n_classes:
        rows = output[output[:, 4] > conf_threshold]
        boxes, scores, cls = rows[:, :4], rows[:, 4], rows[:, 5]
    elif output.ndim == 2 and output.shape[0] == 4 + n_classes:
        cand = output[:, output[4:].max(axis=0) > conf_threshold].T
        boxes, cls_scores = xywh_to_xyxy(cand[:, :4]), cand[:, 4:]
        scores, cls = cls_scores.max(axis=1), cls_scores.argmax(axis=1)
    else:
        raise ValueError(f"detector output of shape {output.shape} is neither [4+{n_classes}, N] nor [N, 6]")
    if not len(boxes):
        return np.zeros((0, 6), dtype=np.float32)
    keep = fast_nms(boxes, scores, iou_threshold)
    sx, sy = source_size[0] / model_size[0], source_size[1] / model_size[1]
    b = boxes[keep] * np.array([sx, sy, sx, sy], dtype=np.float32)
    b = np.clip(b, 0, [source_size[0], source_size[1], source_size[0], source_size[1]])
    return np.column_stack([b, scores[keep], cls[keep]]).astype(np.float32)


# --------------------------------------------------------------------------- model


class Detector:
    """A loaded detector: ``detect(images) -> [float32 [N, 6] per image]`` (see :func:`postprocess`)."""

    def __init__(
        self,
        model: OnnxModel,
        kind: str,
        conf_threshold: float | None = None,
        iou_threshold: float | None = None,
    ):
        spec = SPECS[kind]
        self.model = model
        self.kind = kind
        self.size = input_size(model.metadata, model.input_shape)
        self.labels = labels_of(model.metadata, kind)
        self.conf_threshold = spec.conf_threshold if conf_threshold is None else conf_threshold
        self.iou_threshold = spec.iou_threshold if iou_threshold is None else iou_threshold

    @property
    def runtime(self) -> str:
        return self.model.runtime

    @property
    def resize_device(self) -> str:
        """Where :func:`preprocess_batch` resizes: the model's CUDA device, else the host (OpenCV)."""
        dev = self.model.device
        return dev if self.runtime == "torch" and dev.startswith("cuda") else "cpu"

    def raw(self, images: list[np.ndarray]) -> np.ndarray:
        """The graph's first output for a batch of images (:func:`preprocess_batch`)."""
        return self.model.run(preprocess_batch(images, self.size, self.resize_device))[0]

    def detect(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Boxes per RGB uint8 image: float32 ``[N, 6]`` = x0, y0, x1, y1, score, class id.

        The frames are resized and run ``model.batch_size`` at a time (so a long list never
        holds every resized frame at once). On CUDA the thresholds and NMS run on the device
        too; elsewhere NMS runs per image on the host (torchvision's kernel, imgutils' rule).
        """
        out: list[np.ndarray] = []
        step = max(1, self.model.batch_size)
        on_device = self.resize_device != "cpu"
        post = _postprocess_device if on_device else postprocess
        for s in range(0, len(images), step):
            part = images[s : s + step]
            if on_device:  # random or busy frames give thousands of candidates: keep them off the host
                raw = self.model.run_first_on_device(preprocess_batch(part, self.size, self.resize_device))
            else:
                raw = self.raw(part)
            for o, im in zip(raw, part, strict=True):
                size = (im.shape[1], im.shape[0])
                out.append(
                    post(o, len(self.labels), self.conf_threshold, self.iou_threshold, size, self.size)
                )
        return out


#: What one 640 px frame costs a YOLO detector's bf16 forward pass on the GPU, for ``batch_size =
#: "auto"``: a YOLOv8m graph through onnx2torch measured 33 MiB a frame on an H200
#: (``bench/bench_batch_memory.py``, BENCHMARKS.md "Memory"), plus about 20%; one too low is
#: caught by the halving on out-of-memory (:class:`OnnxModel`).
BATCH_COST = batching.BatchCost("detection", per_item_mib=40, upper=256, cpu_default=16)


def resolve_batch_size(batch_size: int | str, device: str = "auto") -> int:
    """Frames per detector pass: an integer as given, 0 / ``"auto"`` chosen from ``device``'s free memory."""
    return batching.resolve_batch_size(BATCH_COST, resolve_torch_device(device), batch_size)


_detectors: dict[tuple, Detector] = {}
_detectors_lock = threading.Lock()


def load_detector(
    source: str | Path,
    kind: Kind = "person",
    device: str = "auto",
    batch_size: int | str = 16,
    *,
    runtime: Runtime = "auto",
    conf_threshold: float | None = None,
    iou_threshold: float | None = None,
) -> Detector:
    """Load a person / half-body / head detector, memoised per process.

    Args:
        source: a local ``.onnx`` file; or a hub repo (``deepghs/anime_person_detection``,
            then the kind's default model) or ``owner/repo/<model>/model.onnx``, looked up in
            the local Hugging Face cache only.
        kind: ``person``, ``halfbody`` or ``head`` (sets the default file and thresholds).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass (1 when the graph's batch is fixed at 1); 0 or
            ``"auto"``: chosen from the device's free memory (:data:`BATCH_COST`).
        runtime: ``auto`` (torch on CUDA, onnxruntime on CPU), ``onnxruntime`` or ``torch``.
        conf_threshold, iou_threshold: override imgutils' defaults for ``kind``.

    Raises:
        BadInputError: the file is missing, not in the cache, or not a valid ONNX detector.
    """
    if kind not in SPECS:
        raise ValueError(f"unknown detector kind {kind!r}; expected one of {sorted(SPECS)}")
    path = resolve_model_file(source, SPECS[kind].filename)
    batch_size = resolve_batch_size(batch_size, device)
    key = (str(path), kind, device, batch_size, runtime, conf_threshold, iou_threshold)
    with _detectors_lock:
        if key not in _detectors:
            model = load_onnx_model(path, device, runtime, batch_size)
            _check_detector_graph(model)
            _detectors[key] = Detector(model, kind, conf_threshold, iou_threshold)
        return _detectors[key]


def _check_detector_graph(model: OnnxModel) -> None:
    shape = model.input_shape
    if len(shape) != 4 or shape[1] not in (3, None):
        raise BadInputError(
            model.path, f"not a YOLO detector: its input has shape {shape}, expected [N, 3, H, W]"
        )


def detector_info(det: Detector) -> dict[str, Any]:
    """What a manifest records about the detector that produced its boxes."""
    return {
        "kind": det.kind,
        "file": str(det.model.path),
        "input_size": list(det.size),
        "conf_threshold": det.conf_threshold,
        "iou_threshold": det.iou_threshold,
        "labels": det.labels,
    }
