"""Image embeddings of character layers, for identity clustering.

Two backends behind one interface (:class:`Embedder`, built by :func:`get_embedder`):

* ``offline``: a hand-made descriptor that needs no weights: alpha-masked colour
  histograms in CIE Lab (whole figure plus three vertical bands, so "red hair over a blue
  coat" differs from the reverse) and a few shape figures (aspect ratio, alpha coverage,
  Hu moments, width profile). Every part is invariant to horizontal flips and to scale,
  because the same character faces both ways and appears near and far.
* ``clip``: an open_clip image encoder (:mod:`yokai_pipeline.models.clip`). A persistent
  pool of decode processes decodes, composites and resizes / crops (the model's own eval
  preprocessing) straight into uint8 batches in shared memory; the parent copies each batch
  through pinned memory to the GPU, which normalises and encodes it under bf16 autocast
  while the workers prepare the next batches.

Both return float32 ``[n, d]`` rows with unit L2 norm, so a dot product is a cosine
similarity. :func:`embed_layers` embeds the character rows of one episode's layer manifest
into ``embeddings/<episode_id>.npy`` with a sidecar ``.json`` and skips work already done.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from yokai_pipeline.config import EmbeddingConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import (
    atomic_path,
    atomic_write_json,
    file_sha256,
    read_image,
    read_json,
    read_jsonl,
    stable_hash,
)
from yokai_pipeline.runtime import DeviceUploader, batching, name_of, pixel_batches
from yokai_pipeline.runtime import decode_pool as _decode_pool

# Re-exported: callers and tests stop the decode pool through this module.
from yokai_pipeline.runtime import shutdown_decode_pools as shutdown_decode_pools
from yokai_pipeline.workspace import Workspace

ImageLike = Any  # PIL.Image.Image | str | os.PathLike
Errors = list[tuple[int, str]]

#: Background that RGBA layers are composited on before CLIP sees them: mid grey carries no
#: colour of its own and is the CLIP training mean's neighbour, so it biases embeddings least.
NEUTRAL_GREY = (128, 128, 128)
SIDECAR_VERSION = 1


# --------------------------------------------------------------------------- per image


def open_image(item: ImageLike) -> Any:
    """Return a loaded PIL image for a path (8-bit RGB or RGBA) or a PIL image (as is).

    Raises:
        BadInputError: the file is missing or not a decodable image.
    """
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    # fsio.read_image scales 16-bit files to 8 bits (Pillow's convert would clip them to white)
    # and turns bombs and corrupt files into BadInputError naming the file.
    return read_image(item)


def to_rgba_array(image: Any) -> np.ndarray:
    """PIL image (any mode) -> ``HxWx4`` uint8; images without alpha count as fully opaque."""
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    return np.asarray(image, dtype=np.uint8)


def composite_on_background(image: Any, color: tuple[int, int, int] = NEUTRAL_GREY) -> Any:
    """Alpha-composite an image over a flat colour; returns an RGB PIL image (``image`` if already RGB)."""
    from PIL import Image

    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    # A masked paste onto an opaque base gives the same pixels as Image.alpha_composite, in one
    # pass and without the RGBA base and the final conversion.
    base = Image.new("RGB", rgba.size, color)
    base.paste(rgba, (0, 0), rgba)
    return base


# Offline descriptor layout; the weights balance the blocks' contribution to cosine similarity.
_LAB_BINS = (6, 12, 12)
_BAND_BINS = (3, 6, 6)
_N_BANDS = 3
_PROFILE_BINS = 8
_W_COLOUR, _W_BANDS, _W_SHAPE = 1.0, 1.0, 0.2
_WORK_SIDE = 128
_DARK_L = 40  # OpenCV 8-bit Lab lightness below which a pixel is outline / line art
OFFLINE_DIM = int(np.prod(_LAB_BINS)) + _N_BANDS * int(np.prod(_BAND_BINS)) + 2 + _PROFILE_BINS


def describe_layer(rgba: np.ndarray, gain: np.ndarray | None = None) -> np.ndarray:
    """Offline descriptor of one RGBA character layer (unit L2 norm, float32).

    Colour is what tells flat-shaded characters apart; it is measured on the fill colours
    only: outlines and their anti-aliased fringe are left out because their share grows as
    a character gets smaller, which would make the same character look different by scale.

    Args:
        rgba: ``HxWx4`` uint8 array; pixels with alpha < 128 are background.
        gain: per-channel RGB multipliers applied before the colours are read (the layer's
            scene balance, :func:`scene_gains`); None leaves the colours as drawn.

    Returns:
        A vector of length :data:`OFFLINE_DIM`.

    Raises:
        ValueError: the layer has no opaque pixels.
    """
    import cv2

    alpha = rgba[..., 3]
    ys, xs = np.nonzero(alpha >= 128)
    if ys.size == 0:
        raise ValueError("layer has no opaque pixels")
    # Crop to the figure and bring it to one working size: scale invariance and a bounded cost.
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = rgba[y0:y1, x0:x1]
    h, w = crop.shape[:2]
    f = _WORK_SIDE / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    if gain is not None:
        rgb = np.clip(crop[..., :3].astype(np.float32) * np.asarray(gain, np.float32), 0, 255)
        crop = np.dstack([rgb.astype(np.uint8), crop[..., 3]])
    mask = (crop[..., 3] >= 128).astype(np.uint8)
    lab = cv2.cvtColor(np.ascontiguousarray(crop[..., :3]), cv2.COLOR_RGB2LAB)
    kernel = np.ones((3, 3), np.uint8)
    line = cv2.dilate((lab[..., 0] < _DARK_L).astype(np.uint8), kernel)
    fill = cv2.erode(mask, kernel) & (1 - line)
    if fill.sum() < 0.05 * mask.sum():  # a dark or tiny figure: use every opaque pixel
        fill = mask

    def hist(region: np.ndarray, region_mask: np.ndarray, bins: tuple[int, int, int]) -> np.ndarray:
        if region.size == 0:
            return np.zeros(int(np.prod(bins)), dtype=np.float32)
        counts = cv2.calcHist([region], [0, 1, 2], region_mask, list(bins), [0, 256, 0, 256, 0, 256])
        # Soft binning: a fill colour sitting on a bin edge must not flip bins with compression noise.
        counts = cv2.GaussianBlur(counts.reshape(bins[0], -1), (3, 3), 0.7).ravel()
        total = counts.sum()
        # Hellinger (sqrt of frequencies): cosine on it is robust to a few dominant colours.
        return np.sqrt(counts / total) if total > 0 else counts

    colour = hist(lab, fill, _LAB_BINS)
    ch = crop.shape[0]
    edges = np.linspace(0, ch, _N_BANDS + 1).round().astype(int)
    bands = [hist(lab[a:b], fill[a:b], _BAND_BINS) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    bands_vec = np.concatenate(bands) / math.sqrt(_N_BANDS)

    # Shape: weak on its own (poses change it) but separates same-palette characters.
    aspect = math.log(h / w)  # from the full-resolution box: resizing rounds small crops
    coverage = float(mask.mean())
    profile = mask.mean(axis=1)  # figure width per row: flip-invariant silhouette summary
    idx = np.linspace(0, mask.shape[0], _PROFILE_BINS + 1).round().astype(int)
    profile = np.array(
        [profile[a:b].mean() if b > a else 0.0 for a, b in zip(idx[:-1], idx[1:], strict=True)]
    )
    shape = np.concatenate([[aspect, coverage], profile])
    shape = shape / (np.linalg.norm(shape) + 1e-12)

    vec = np.concatenate([_W_COLOUR * colour, _W_BANDS * bands_vec, _W_SHAPE * shape]).astype(np.float32)
    return vec / (np.linalg.norm(vec) + 1e-12)


# --------------------------------------------------------------------------- scene balance

#: Per-channel percentile of a frame's pixels taken as its brightest white (von Kries).
_WHITE_PERCENTILE = 99.0


def white_point(rgb: np.ndarray) -> np.ndarray:
    """An RGB image's per-channel white point: the 99th percentile of its pixels, float32 (3,)."""
    return np.percentile(rgb.reshape(-1, 3), _WHITE_PERCENTILE, axis=0).astype(np.float32)


def frame_white(path: Path) -> np.ndarray | None:
    """A frame file's :func:`white_point`; None if it cannot be read.

    Read at half size: a percentile over ~60k pixels is as stable as over all of them.
    """
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_2)
    if image is None or image.size == 0:
        return None
    return white_point(np.ascontiguousarray(image[..., ::-1]))


#: Shots whose white points differ by less than this (largest per-channel log ratio) share a lighting.
_LIGHTING_TOL = 0.15


def scene_gains(whites: dict[Any, list[np.ndarray]], threshold: float) -> dict[Any, np.ndarray | None]:
    """The colour balance of each shot from its frames' white points, pooled by lighting.

    A shot's white is the median of its frames' whites. Shots are then grouped by lighting:
    single linkage on the largest per-channel log ratio of their whites, joined below
    :data:`_LIGHTING_TOL` (a night sequence is one group and the day shots beside it another:
    the measured gap is > 0.7, while one lighting's shots spread < 0.2 with their content). A
    group's white is the median of its shots', and its gain brings that white to 255 per channel:
    one gain for every shot of a lighting, so a character keeps its colours from shot to shot.
    The gain is used only where some channel's is at least ``threshold``: lighting graded away
    from neutral (night, dusk, a dark room). Near-neutral lighting keeps its colours as drawn
    (the sample series' day shots measure gains 1.0-1.23; night shots 1.3-2.7).

    Args:
        whites: shot key -> the white points of its frames (:func:`frame_white`).
        threshold: the smallest largest-channel gain that is applied.

    Returns:
        shot key -> float32 RGB gains, or None where the shot is left as drawn.
    """
    from scipy.sparse.csgraph import connected_components

    keys = [k for k, v in whites.items() if v]
    out: dict[Any, np.ndarray | None] = {k: None for k in whites}
    if not keys:
        return out
    logs = np.log(np.maximum(np.stack([np.median(np.stack(whites[k]), axis=0) for k in keys]), 1.0))
    near = np.abs(logs[:, None, :] - logs[None, :, :]).max(axis=2) < _LIGHTING_TOL
    _, groups = connected_components(near, directed=False)  # single linkage: the near graph's parts
    for g in np.unique(groups):
        members = np.nonzero(groups == g)[0]
        gain = 255.0 / np.exp(np.median(logs[members], axis=0))
        value = gain.astype(np.float32) if float(gain.max()) >= threshold else None
        for m in members:
            out[keys[m]] = value
    return out


def layer_gains(
    workspace: Workspace, rows: list[dict[str, Any]], threshold: float
) -> list[np.ndarray | None]:
    """Scene-balance gains for each layer row (:func:`scene_gains`), shots keyed by episode and shot id.

    Rows without a readable frame or a shot id get None (colours as drawn).
    """
    whites: dict[Any, list[np.ndarray]] = {}
    seen: dict[str, np.ndarray | None] = {}
    for r in rows:
        frame, shot = r.get("frame_path"), r.get("shot_id")
        if frame is None or shot is None:
            continue
        if frame not in seen:
            seen[frame] = frame_white(workspace.abs(frame))
            if seen[frame] is not None:
                whites.setdefault((r.get("episode_id"), shot), []).append(seen[frame])
    gains = scene_gains(whites, threshold)
    return [gains.get((r.get("episode_id"), r.get("shot_id"))) for r in rows]


# --------------------------------------------------------------------------- backends


class Embedder(Protocol):
    """Turns images into unit-norm float32 rows."""

    backend: str
    model: str | None
    dim: int

    def embed(self, images: Iterable[ImageLike], errors: Errors | None = None) -> np.ndarray:
        """Embed images (PIL images or paths) in order.

        Args:
            images: PIL images or image paths.
            errors: if None, the first unreadable image raises :class:`BadInputError`.
                If a list, an unreadable image gets a zero row and ``(index, message)`` is
                appended, so one bad file never loses the rest of the batch.

        Returns:
            float32 array ``[n, dim]``; each row has unit L2 norm (zero for failed images).
        """
        ...


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class OfflineEmbedder:
    """Weight-free colour + shape descriptor (see :func:`describe_layer`)."""

    backend = "offline"
    model = None
    dim = OFFLINE_DIM

    def __init__(self, num_workers: int = 2):
        self.num_workers = num_workers

    def embed(
        self,
        images: Iterable[ImageLike],
        errors: Errors | None = None,
        gains: list[np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """See :meth:`Embedder.embed`; ``gains``: per-image scene balance (:func:`describe_layer`)."""
        items = list(images)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        if not items:
            return out

        def work(i: int) -> tuple[int, np.ndarray | None, str | None]:
            item = items[i]
            try:
                gain = None if gains is None else gains[i]
                return i, describe_layer(to_rgba_array(open_image(item)), gain), None
            except (BadInputError, ValueError) as exc:
                if errors is None:
                    if isinstance(exc, BadInputError):
                        raise
                    raise BadInputError(name_of(item, i), str(exc)) from exc
                return i, None, f"{name_of(item, i)}: {exc}"

        # OpenCV and PNG decoding release the GIL, so threads overlap them.
        workers = max(1, min(self.num_workers, len(items)))
        with ThreadPoolExecutor(workers) if workers > 1 else _Inline() as pool:
            for i, vec, err in pool.map(work, range(len(items))):
                if vec is not None:
                    out[i] = vec
                elif errors is not None:
                    errors.append((i, err or "failed"))
        return out


class _Inline:
    """A stand-in executor that maps in the calling thread."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[[int], Any], it: Iterable[int]) -> Iterable[Any]:
        return map(fn, it)


# --------------------------------------------------------------------------- clip input side


def _preprocess(item: ImageLike, plan: Any, transform: Any, size: tuple[int, int]) -> np.ndarray:
    """Decode one image, composite it on grey and resize / crop it as open_clip does.

    Args:
        item: a path or a PIL image.
        plan: the model's :class:`~yokai_pipeline.models.clip.ResizePlan`, or None to run
            ``transform`` instead.
        transform: open_clip's PIL steps (used when ``plan`` is None).
        size: ``(height, width)`` the model expects.

    Returns:
        ``HxWx3`` uint8 array.

    Raises:
        BadInputError: unreadable file. OSError, ValueError: the image cannot be resampled.
    """
    image = composite_on_background(open_image(item))
    if plan is not None:
        out_size, box = plan.geometry(*image.size)
        image = image.resize(out_size, plan.resample, box=box)
    else:
        image = transform(image)
    arr = np.asarray(image, dtype=np.uint8)
    if arr.shape != (*size, 3):
        raise ValueError(f"preprocessed to {arr.shape}, expected {(*size, 3)}")
    return arr


#: One image through the CLIP image tower in bf16, activations freed layer by layer: ViT-L/14 at
#: 224 px (257 tokens x 1024, MLP 4096, 16 heads) peaks near 10 MiB; 24 MiB leaves room for bigger towers.
CLIP_BATCH_COST = batching.BatchCost("embedding", 24, upper=512, cpu_default=64)


class ClipEmbedder:
    """open_clip image encoder fed by a persistent pool of decode processes.

    The pool (``cfg.num_workers`` processes; none for 0, then decoding runs inline) is shared
    by every embedder of the process with the same worker count, so a long-lived worker that
    embeds episode after episode pays the process start-up once. It is started while the
    model loads and stopped at exit or by :func:`shutdown_decode_pools`. The workers are
    spawned, so (as with any spawn pool) a script that embeds with workers must keep its
    top-level code under ``if __name__ == "__main__":``.
    """

    backend = "clip"

    def __init__(self, cfg: EmbeddingConfig):
        from yokai_pipeline.models.clip import load_clip

        self.cfg = cfg
        if cfg.num_workers:
            _decode_pool(cfg.num_workers)  # spawning overlaps the model load below
        self.bundle = load_clip(cfg.model, cfg.pretrained, cfg.device)
        size = batching.resolve_batch_size(CLIP_BATCH_COST, self.bundle.device, cfg.batch_size)
        self.cfg = cfg.model_copy(update={"batch_size": size})
        self._budget = batching.Budget("embedding", self.bundle.device, size)
        self.model = cfg.model
        self.dim = self.bundle.dim
        self._lock = threading.Lock()
        self._uploader = DeviceUploader(self.bundle.device)

    def pixel_batches(
        self, items: Sequence[ImageLike]
    ) -> Iterator[tuple[int, np.ndarray, list[tuple[int, str]]]]:
        """The input side alone: preprocessed uint8 batches, in order.

        Close the generator (``contextlib.closing``) or exhaust it: it holds the decode pool
        until then.

        Args:
            items: paths or PIL images.

        Yields:
            ``(start, pixels, errors)``: ``pixels`` is ``[n, H, W, 3]`` uint8 for
            ``items[start:start + n]``, valid only until the next batch is requested; failed
            images are zero rows, listed in ``errors`` as ``(index, "name: problem")``.
        """
        b = self.bundle
        # Without a plan the workers run open_clip's PIL transform (they then import torchvision).
        transform = None if b.resize_plan is not None else b.pil_transform
        prep = functools.partial(_preprocess, plan=b.resize_plan, transform=transform, size=b.image_size)
        yield from pixel_batches(items, self.cfg.batch_size, b.image_size, prep, self.cfg.num_workers)

    def embed(self, images: Iterable[ImageLike], errors: Errors | None = None) -> np.ndarray:
        import torch

        items = list(images)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        b = self.bundle
        on_cuda = b.device.startswith("cuda")
        with self._lock, torch.inference_mode(), contextlib.ExitStack() as stack:
            if on_cuda:
                stack.enter_context(torch.cuda.device(b.device))
            batches = stack.enter_context(contextlib.closing(self.pixel_batches(items)))
            mean = torch.tensor(b.mean, device=b.device).view(1, 3, 1, 1)
            std = torch.tensor(b.std, device=b.device).view(1, 3, 1, 1)
            self._uploader.start((self.cfg.batch_size, *b.image_size, 3))
            chunks, failed = [], []
            for _, pixels, bad in batches:
                if bad:
                    if errors is None:
                        path, _, problem = bad[0][1].partition(": ")
                        raise BadInputError(path, problem)
                    failed.extend(bad)
                n = len(pixels)
                u8 = self._uploader.upload(pixels)
                # uint8 over the bus (4x less than float); layout and normalisation on the device.
                x = torch.empty((n, 3, *b.image_size), device=b.device).copy_(u8.permute(0, 3, 1, 2))
                x.div_(255).sub_(mean).div_(std)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                    feats = batching.run_in_parts(b.model.encode_image, x, self._budget, torch.cat)
                # Kept on the device: a .cpu() per batch would stall the pipeline.
                chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1))
            out = torch.cat(chunks).cpu().numpy().astype(np.float32, copy=False)
        for i, e in failed:
            out[i] = 0.0
            errors.append((i, e))  # type: ignore[union-attr]
        return out


class CCIPEmbedder:
    """deepghs' CCIP character-identity features (:mod:`yokai_pipeline.models.ccip`).

    Rows are CCIP's raw features, not unit-normalised: its metric model, which clustering
    uses for distances (see :func:`yokai_pipeline.clustering.identity_metric`), takes them
    as the feature model gives them.
    """

    backend = "ccip"

    def __init__(self, cfg: EmbeddingConfig):
        from yokai_pipeline.models.ccip import load_ccip

        # onnxruntime's memory is not torch's to measure: "auto" is the CPU default there
        self.cfg = cfg = cfg.model_copy(
            update={"batch_size": batching.resolve_batch_size(CLIP_BATCH_COST, "cpu", cfg.batch_size)}
        )
        self.ccip = load_ccip(cfg.ccip_model, cfg.device, cfg.batch_size, threshold=cfg.ccip_threshold)
        self.model = cfg.ccip_model
        self.dim = self.ccip.dim

    def embed(self, images: Iterable[ImageLike], errors: Errors | None = None) -> np.ndarray:
        items = list(images)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        for start in range(0, len(items), self.cfg.batch_size):
            part = items[start : start + self.cfg.batch_size]
            opened, where = [], []
            for k, item in enumerate(part, start):
                try:
                    opened.append(open_image(item))
                    where.append(k)
                except BadInputError as exc:
                    if errors is None:
                        raise
                    errors.append((k, f"{name_of(item, k)}: {exc.problem}"))
            if opened:
                out[where] = self.ccip.features(opened)
        return out

    def record(self) -> dict[str, Any]:
        """What clustering needs to rebuild the metric: the model source and the threshold."""
        return {"source": self.cfg.ccip_model, "name": self.ccip.name, "threshold": self.ccip.threshold}


def get_embedder(cfg: EmbeddingConfig) -> Embedder:
    """Build the embedder that ``cfg.backend`` names (clip and ccip models are memoised per process)."""
    if cfg.backend == "offline":
        return OfflineEmbedder(num_workers=cfg.num_workers)
    if cfg.backend == "clip":
        return ClipEmbedder(cfg)
    if cfg.backend == "ccip":
        return CCIPEmbedder(cfg)
    raise ValueError(f"unknown embedding backend {cfg.backend!r}")  # pragma: no cover - pydantic rejects it


def embed_images(images: Iterable[ImageLike], cfg: EmbeddingConfig) -> np.ndarray:
    """Embed images with the backend ``cfg`` selects; see :meth:`Embedder.embed`."""
    return get_embedder(cfg).embed(images)


# --------------------------------------------------------------------------- stage


def sidecar_path(workspace: Workspace, episode_id: str) -> Path:
    """The ``.json`` written next to an episode's ``.npy`` embeddings."""
    return workspace.embeddings_path(episode_id).with_suffix(".json")


def embedding_signature(cfg: EmbeddingConfig) -> dict[str, Any]:
    """The settings that change embedding values (device, batch size and workers do not)."""
    sig: dict[str, Any] = {"backend": cfg.backend, "version": SIDECAR_VERSION}
    if cfg.backend == "clip":
        sig.update(model=cfg.model, pretrained=cfg.pretrained)
    elif cfg.backend == "ccip":
        sig.update(model=cfg.ccip_model, threshold=cfg.ccip_threshold)
    else:
        sig.update(model=None, descriptor_dim=OFFLINE_DIM, scene_balance=cfg.scene_balance)
    return sig


def character_rows(workspace: Workspace, episode_id: str) -> list[dict[str, Any]]:
    """The character rows of an episode's layer manifest, in manifest order.

    Raises:
        BadInputError: the manifest is missing or unreadable.
    """
    manifest = workspace.layers_manifest(episode_id)
    if not manifest.is_file():
        raise BadInputError(manifest, "layer manifest not found; run layering for this episode first")
    return [r for r in read_jsonl(manifest) if r.get("kind", "character") == "character"]


def _layer_hashes(workspace: Workspace, rows: list[dict[str, Any]]) -> list[str | None]:
    """Content hash of each row's layer image (None for a file that is missing)."""
    out: list[str | None] = []
    for r in rows:
        try:
            out.append(file_sha256(workspace.abs(r["path"])))
        except OSError:
            out.append(None)
    return out


def embed_layers(workspace: Workspace, episode_id: str, cfg: EmbeddingConfig) -> dict[str, Any]:
    """Embed one episode's character layers into ``embeddings/<episode_id>.npy``.

    Row ``i`` of the array is the ``i``-th character row of the layer manifest. A sidecar
    ``embeddings/<episode_id>.json`` records the layer ids, backend, model, dimension and a
    hash of the config, the layer ids and the layer images' bytes; when it matches, the episode
    is skipped.
    Layers that cannot be read get a zero row and are listed under ``failed``.

    Args:
        workspace: the run workspace.
        episode_id: the episode (file stem through ``safe_name``).
        cfg: embedding settings.

    Returns:
        Stats: ``n``, ``dim``, ``seconds``, ``images_per_s``, ``cached``, ``failed``.
    """
    rows = character_rows(workspace, episode_id)
    layer_ids = [r["layer_id"] for r in rows]
    npy, side = workspace.embeddings_path(episode_id), sidecar_path(workspace, episode_id)
    sig = embedding_signature(cfg)
    # The layers' bytes too: a video replaced under the same name is cut into layers with the same ids.
    config_hash = stable_hash(
        {"signature": sig, "layer_ids": layer_ids, "layers": _layer_hashes(workspace, rows)}
    )
    if side.is_file() and npy.is_file():
        try:
            meta = read_json(side)
        except ValueError:
            meta = {}
        if meta.get("config_hash") == config_hash:
            return {
                "episode_id": episode_id,
                "n": len(layer_ids),
                "dim": meta.get("dim"),
                "seconds": 0.0,
                "images_per_s": 0.0,
                "cached": True,
                "failed": meta.get("failed", []),
            }

    embedder = get_embedder(cfg)
    errors: Errors = []
    t0 = time.perf_counter()
    paths = [workspace.abs(r["path"]) for r in rows]
    if isinstance(embedder, OfflineEmbedder) and cfg.scene_balance:
        gains = layer_gains(workspace, rows, cfg.scene_balance)
        vectors = embedder.embed(paths, errors=errors, gains=gains)
    else:
        vectors = embedder.embed(paths, errors=errors)
    seconds = time.perf_counter() - t0
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, vectors.astype(np.float32, copy=False))
    failed = [{"layer_id": layer_ids[i], "error": e} for i, e in sorted(errors)]
    # Sidecar last: its hash is what marks the .npy as complete.
    atomic_write_json(
        side,
        {
            "version": SIDECAR_VERSION,
            "episode_id": episode_id,
            "layer_ids": layer_ids,
            "backend": embedder.backend,
            "model": embedder.model,
            "pretrained": cfg.pretrained if cfg.backend == "clip" else None,
            "dim": int(vectors.shape[1]),
            "config_hash": config_hash,
            "failed": failed,
            **({"ccip": embedder.record()} if isinstance(embedder, CCIPEmbedder) else {}),
        },
    )
    return {
        "episode_id": episode_id,
        "n": len(layer_ids),
        "dim": int(vectors.shape[1]),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(layer_ids) / seconds, 1) if seconds > 0 and layer_ids else 0.0,
        "cached": False,
        "failed": failed,
    }


def load_embeddings(workspace: Workspace, episode_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an episode's embeddings and sidecar, checking they agree.

    Raises:
        BadInputError: either file is missing or they disagree in row count.
    """
    npy, side = workspace.embeddings_path(episode_id), sidecar_path(workspace, episode_id)
    if not npy.is_file() or not side.is_file():
        raise BadInputError(npy, "embeddings not found; run the embedding stage for this episode first")
    try:
        vectors = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInputError(npy, f"unreadable embeddings ({exc})") from exc
    meta = read_json(side)
    if vectors.ndim != 2 or vectors.shape[0] != len(meta.get("layer_ids", [])):
        raise BadInputError(
            npy, f"has shape {vectors.shape} but its sidecar lists {len(meta.get('layer_ids', []))} layers"
        )
    return vectors.astype(np.float32, copy=False), meta
