"""SmilingWolf's WD14 v3 Danbooru taggers (wd-vit-tagger-v3, wd-swinv2-tagger-v3, wd-eva02-large-tagger-v3).

A tagger folder (a local folder, or the Hugging Face cache snapshot of a hub id; never
downloaded here) holds ``selected_tags.csv`` (``tag_id,name,category,count``; category 0 =
general, 4 = character, 9 = rating) and either the timm export (``config.json`` +
``model.safetensors``, run in torch: batched, bf16 autocast on CUDA) or the published
``model.onnx`` (run on CPU with onnxruntime).

Preprocessing is the model's own, as SmilingWolf's wd-tagger space (``app.py``:
``prepare_image``) and the timm example on the model cards (neggles/wdv3-timm ``wdv3_timm.py``)
do it: composite RGBA on white, pad to a square on white (centred), resize to the model's
input size (bicubic), then BGR channel order. The ONNX export takes NHWC float 0..255 and ends
in a sigmoid; the timm model takes NCHW normalised with the timm config's mean / std
(``resolve_model_data_config``), its logits go through a sigmoid here.

Nothing here imports torch, timm or onnxruntime at import time: decode workers unpickle
:func:`prepare_image` and must stay light.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yokai_pipeline.errors import BadInputError, ConfigError
from yokai_pipeline.fsio import read_image
from yokai_pipeline.runtime import batching

TAGS_CSV = "selected_tags.csv"
WEIGHTS = "model.safetensors"
ONNX_FILE = "model.onnx"
CATEGORIES = {0: "general", 4: "character", 9: "rating"}

#: What one 448 px image costs the tagger's bf16 forward pass on the GPU, for ``batch_size = "auto"``:
#: the largest v3 tagger (EVA02-L, 1,024 tokens) measured 46 MiB an image on an H200
#: (``bench/bench_batch_memory.py``, BENCHMARKS.md "Memory"), plus about 20%; one too low is
#: caught by the halving on out-of-memory.
BATCH_COST = batching.BatchCost("tagging", per_item_mib=56, upper=512, cpu_default=64)

_CACHE: dict[tuple[str, str, str], Wd14Bundle] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class TagSet:
    """The model's output labels in output order.

    Attributes:
        names: Danbooru tag names (underscores, as the CSV has them).
        categories: ``general``, ``character``, ``rating`` or ``other`` per tag.
    """

    names: tuple[str, ...]
    categories: tuple[str, ...]

    def indices(self, category: str) -> np.ndarray:
        """Output columns of one category."""
        return np.flatnonzero(np.asarray(self.categories) == category)


def read_selected_tags(path: str | Path) -> TagSet:
    """Read ``selected_tags.csv``.

    Raises:
        BadInputError: the file is missing, has no ``name`` / ``category`` columns, a
            category is not a number, or it lists no tags.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, f"{TAGS_CSV} not found: a WD14 tagger folder needs its tag list")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(path, f"unreadable tag list ({exc})") from exc
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise BadInputError(path, "needs a header with 'name' and 'category' columns and at least one tag")
    names, cats = [], []
    for i, row in enumerate(rows, start=2):
        try:
            cats.append(CATEGORIES.get(int(row["category"]), "other"))
        except (TypeError, ValueError):
            raise BadInputError(path, f"line {i}: category {row['category']!r} is not a number") from None
        names.append(str(row["name"]).strip())
    return TagSet(tuple(names), tuple(cats))


def resolve_folder(model: str | Path) -> Path:
    """A local tagger folder, or the cached snapshot of a hub id (``local_files_only``: no download).

    Raises:
        ConfigError: a hub id that is not in the Hugging Face cache.
    """
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with timm
        raise ImportError("WD14 hub ids need huggingface_hub: pip install huggingface_hub") from exc
    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise ConfigError(
            f"tagger {model!r} is neither a local folder nor in the Hugging Face cache "
            f"(weights are never downloaded here: `huggingface-cli download {model}` first, "
            "or pass the folder)"
        ) from exc


@dataclass
class Wd14Bundle:
    """A loaded tagger with its own preprocessing numbers.

    Attributes:
        tags: the output labels.
        size: ``(height, width)`` input size.
        resample: PIL filter of the resize (bicubic for every v3 model).
        mean: normalisation mean (timm runtime; RGB order).
        std: normalisation std (timm runtime; RGB order).
        runtime: ``torch`` or ``onnx``.
        device: torch device string (``cpu`` for onnx).
        model: the timm module in eval mode (torch runtime).
        session: the onnxruntime session (onnx runtime).
    """

    tags: TagSet
    size: tuple[int, int]
    resample: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    runtime: str
    device: str
    model: Any = None
    session: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_wd14(model: str | Path, device: str = "auto", runtime: str = "torch") -> Wd14Bundle:
    """Load a tagger once per process (memoised, thread-safe).

    Args:
        model: hub id (``SmilingWolf/wd-eva02-large-tagger-v3``) or local folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (torch runtime).
        runtime: ``torch`` (timm weights) or ``onnx`` (``model.onnx`` on CPU onnxruntime).

    Raises:
        BadInputError: ``selected_tags.csv`` or the weights are missing or do not match.
        ConfigError: a hub id not in the cache, or an unknown runtime.
    """
    key = (str(model), device, runtime)
    with _LOCK:
        if key not in _CACHE:
            folder = resolve_folder(model)
            tags = read_selected_tags(folder / TAGS_CSV)
            if runtime == "torch":
                _CACHE[key] = _load_timm(folder, tags, device)
            elif runtime == "onnx":
                _CACHE[key] = _load_onnx(folder, tags)
            else:
                raise ConfigError(f"unknown WD14 runtime {runtime!r} (torch or onnx)")
        return _CACHE[key]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_timm(folder: Path, tags: TagSet, device: str) -> Wd14Bundle:
    try:
        import timm
        import torch
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError("the WD14 torch runtime needs timm and safetensors: pip install timm") from exc
    cfg_path, weights = folder / "config.json", folder / WEIGHTS
    for p in (cfg_path, weights):
        if not p.is_file():
            raise BadInputError(
                p, "not found: the timm export of a WD14 tagger needs config.json and model.safetensors"
            )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        arch, pcfg, args = cfg["architecture"], dict(cfg.get("pretrained_cfg", {})), cfg.get("model_args", {})
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(cfg_path, f"not a timm model config ({exc})") from exc
    n_out = int(cfg.get("num_classes", pcfg.get("num_classes", len(tags.names))))
    if n_out != len(tags.names):
        raise BadInputError(
            folder / TAGS_CSV, f"lists {len(tags.names)} tags but the model outputs {n_out} ({cfg_path.name})"
        )
    pcfg.pop("num_classes", None)
    net = timm.create_model(arch, pretrained=False, num_classes=n_out, pretrained_cfg_overlay=pcfg, **args)
    try:
        net.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise BadInputError(weights, f"weights do not fit {arch} ({str(exc)[:300]})") from exc
    data = timm.data.resolve_model_data_config(net)
    dev = _resolve_device(device)
    net = net.to(dev).eval()
    with contextlib.suppress(Exception):  # channels_last helps convolutional taggers; ViTs ignore it
        net = net.to(memory_format=torch.channels_last)
    return Wd14Bundle(
        tags=tags,
        size=tuple(int(v) for v in data["input_size"][1:]),  # type: ignore[arg-type]
        resample=_pil_filter(data.get("interpolation", "bicubic")),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        runtime="torch",
        device=dev,
        model=net,
    )


def _load_onnx(folder: Path, tags: TagSet) -> Wd14Bundle:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("the WD14 onnx runtime needs onnxruntime: pip install onnxruntime") from exc
    path = folder / ONNX_FILE
    if not path.is_file():
        raise BadInputError(path, "not found: the ONNX runtime needs the published model.onnx")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BadInputError(path, f"not a loadable ONNX model ({exc})") from exc
    shape_in, shape_out = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    n_out = shape_out[-1]
    if isinstance(n_out, int) and n_out != len(tags.names):
        raise BadInputError(
            folder / TAGS_CSV, f"lists {len(tags.names)} tags but {ONNX_FILE} outputs {n_out}"
        )
    h, w = shape_in[1], shape_in[2]  # NHWC, as SmilingWolf exports them
    return Wd14Bundle(
        tags=tags,
        size=(int(h), int(w)),
        resample=_pil_filter("bicubic"),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        runtime="onnx",
        device="cpu",
        session=session,
    )


def _pil_filter(name: str) -> int:
    from PIL import Image

    return int({"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(name, Image.BICUBIC))


def prepare_image(item: Any, size: tuple[int, int], resample: int) -> np.ndarray:
    """One image as the tagger sees it: on white, padded square (centred), resized; RGB uint8.

    Args:
        item: a path or a PIL image.
        size: ``(height, width)`` of the model input.
        resample: PIL filter id.

    Returns:
        ``H x W x 3`` uint8 RGB (the BGR swap happens on the batch).

    Raises:
        BadInputError: the file cannot be read.
    """
    from PIL import Image

    image = item if isinstance(item, Image.Image) else read_image(item)
    rgba = image.convert("RGBA")
    side = max(rgba.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2), rgba)
    if canvas.size != (size[1], size[0]):
        canvas = canvas.resize((size[1], size[0]), resample)
    return np.asarray(canvas, dtype=np.uint8)


class Wd14Tagger:
    """Batched tag probabilities from image files: decode pool -> device -> sigmoid.

    Args:
        model: hub id or local folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (torch runtime).
        batch_size: images per forward pass; 0 or ``"auto"``: chosen from the device's free memory
            (:data:`BATCH_COST`). On CUDA a pass that runs out of memory is retried in halves.
        num_workers: decode processes (0: decode in the calling thread).
        runtime: ``torch`` or ``onnx``.
        bundle: an already loaded :class:`Wd14Bundle` (tests, benchmarks).
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "auto",
        *,
        batch_size: int | str = 64,
        num_workers: int = 4,
        runtime: str = "torch",
        bundle: Wd14Bundle | None = None,
    ):
        from yokai_pipeline.runtime import DeviceUploader, decode_pool

        if num_workers:
            decode_pool(num_workers)  # spawning overlaps the model load below
        self.bundle = bundle or load_wd14(model, device, runtime)
        self.batch_size = batching.resolve_batch_size(BATCH_COST, self.bundle.device, batch_size)
        self.model, self.num_workers = str(model), num_workers
        self._budget = batching.Budget("tagging", self.bundle.device, self.batch_size)
        self._uploader = DeviceUploader(self.bundle.device)

    @property
    def tags(self) -> TagSet:
        return self.bundle.tags

    def predict(self, items: Sequence[Any], errors: list[tuple[int, str]] | None = None) -> np.ndarray:
        """Tag probabilities ``[n, tags]`` float32 in order.

        Args:
            items: paths or PIL images.
            errors: None: the first unreadable image raises :class:`BadInputError`. A list:
                an unreadable image gets a zero row and ``(index, "name: problem")`` is appended.
        """
        from yokai_pipeline.runtime import pixel_batches

        b = self.bundle
        items = list(items)
        out = np.zeros((len(items), len(b.tags.names)), dtype=np.float32)
        if not items:
            return out
        prep = functools.partial(prepare_image, size=b.size, resample=b.resample)
        with (
            b.lock,
            contextlib.closing(
                pixel_batches(items, self.batch_size, b.size, prep, self.num_workers)
            ) as batches,
        ):
            if b.runtime == "onnx":
                for start, pixels, bad in batches:
                    _take_errors(bad, errors)
                    out[start : start + len(pixels)] = self._run_onnx(pixels)
            else:
                self._run_torch(batches, out, errors)
        for i, _ in errors or []:
            out[i] = 0.0
        return out

    def _run_onnx(self, pixels: np.ndarray) -> np.ndarray:
        s = self.bundle.session
        bgr = np.ascontiguousarray(pixels[..., ::-1], dtype=np.float32)  # NHWC BGR 0..255 (app.py)
        return s.run([s.get_outputs()[0].name], {s.get_inputs()[0].name: bgr})[0]

    def _run_torch(self, batches: Any, out: np.ndarray, errors: list[tuple[int, str]] | None) -> None:
        import torch

        b = self.bundle
        on_cuda = b.device.startswith("cuda")
        # (x / 255 - mean) / std in BGR order, as one subtract and one divide on 0..255 values.
        mean = torch.tensor(b.mean[::-1], device=b.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(b.std[::-1], device=b.device).view(1, 3, 1, 1) * 255
        self._uploader.start((self.batch_size, *b.size, 3))
        chunks = []
        with torch.inference_mode(), torch.cuda.device(b.device) if on_cuda else contextlib.nullcontext():
            for start, pixels, bad in batches:
                _take_errors(bad, errors)
                u8 = self._uploader.upload(pixels)
                # uint8 over the bus; BGR (the channel swap of the model card) and float on the device.
                x = u8.permute(0, 3, 1, 2)[:, [2, 1, 0]].float().sub_(mean).div_(std)
                probs = batching.run_in_parts(self._forward, x, self._budget, torch.cat)
                chunks.append((start, probs))  # stays on the device: no stall
            for start, probs in chunks:
                out[start : start + len(probs)] = probs.cpu().numpy()

    def _forward(self, x: Any) -> Any:
        """Sigmoid probabilities of a normalised NCHW batch (bf16 autocast on CUDA)."""
        import torch

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bundle.device.startswith("cuda")):
            logits = self.bundle.model(x)
        return torch.sigmoid(logits.float())


def _take_errors(bad: list[tuple[int, str]], errors: list[tuple[int, str]] | None) -> None:
    if not bad:
        return
    if errors is None:
        path, _, problem = bad[0][1].partition(": ")
        raise BadInputError(path, problem)
    errors.extend(bad)
