"""Training captions (guide step 4): one ``<image>.txt`` next to every image.

A caption is ``"<trigger>, <description>"``; the trigger is the character's trigger word
from selection.json or ``char<cluster id:03d>`` (``char000`` by default). Captions are
written atomically and are never empty: when a captioner returns nothing, a fallback
built from the character type is written. Images that already have a non-empty caption
are skipped, so an interrupted run resumes where it stopped.

Backends (:func:`get_captioner`):

* ``blip2``: BLIP-2 (:mod:`yokai_pipeline.models.blip2`) asked a type-specific question
  (:data:`PROMPTS`: humans -> hair, clothing, expression, pose; yokai -> colours, shape,
  distinctive features). RGBA layers are composited on white first. Decoding and
  compositing of the next batch run on CPU threads while the model generates; caption
  files are written on threads too. On CUDA: bf16, resize/normalise on the GPU, and (with
  ``CaptionConfig.compile``) a static KV cache whose decode step transformers compiles,
  with every batch padded to ``batch_size`` so one compiled shape serves the run.
  Measured with bench/bench_captioning.py (opt-2.7b sized, random weights, 40 tokens, one
  H100, PNG files on disk to .txt files): batch 8 / 32 / 64 / 128 -> 32 / 101 / 160 / 201
  captions/s compiled, 12 / 45 / 106 / 164 without; about 30 s of compiling per new shape.
* ``offline``: no weights. A template from the image itself and the character type:
  dominant colour names (alpha-masked HSV histogram), body shape from the silhouette,
  size, facing when the silhouette shows it, e.g.
  ``"char003, a red and white yokai with a round body, small, facing right, simple background"``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from yokai_pipeline.augmentation import (
    cluster_folders,
    cluster_id,
    list_images,
    normalise_analysis,
    read_selection,
)
from yokai_pipeline.config import CaptionConfig, TagConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import atomic_write_json, atomic_write_text, finish_writes, read_image
from yokai_pipeline.runtime import batching

SUMMARY_NAME = "caption_summary.json"

PROMPTS: dict[str, str] = {
    "human": "Question: describe this anime character's hair, clothing, facial expression and pose. Answer:",
    "yokai": "Question: describe this yokai creature's colours, body shape and distinctive features. Answer:",
    "unknown": "Question: describe this character's colours, shape and distinctive features. Answer:",
}
_TYPE_WORDS = {"human": "anime character", "yokai": "yokai", "unknown": "character"}


class Captioner(Protocol):
    """Anything that turns images (RGBA or RGB PIL images) and prompts into descriptions.

    A captioner may also offer ``prepare(images, prompts) -> batch`` and
    ``generate(batch) -> list[str]``; :func:`caption_folder` then runs ``prepare`` of the
    next batch on a CPU thread while ``generate`` runs.
    """

    def caption(self, images: list[Any], prompts: list[str]) -> list[str]: ...


def prompt_for(char_type: str) -> str:
    """The question asked for a character type (``human``, ``yokai``, else ``unknown``)."""
    return PROMPTS.get(char_type, PROMPTS["unknown"])


def composite_on_white(image: Any) -> Any:
    """RGBA PIL image -> RGB on white (captioning models were trained on opaque images)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return image.convert("RGB")


def format_caption(trigger: str, text: str, char_type: str = "unknown") -> str:
    """``"<trigger>, <text>"`` cleaned up; never empty (fallback from the type when ``text`` is)."""
    text = clean_description(trigger, text, char_type)
    return f"{trigger}, {text}" if trigger else text


def clean_description(trigger: str, text: str, char_type: str = "unknown") -> str:
    """A captioner's answer without prompt echoes or a leading trigger; the type's fallback when empty."""
    text = re.sub(r"\s+", " ", str(text or "")).strip()
    text = re.sub(r"^(answer|caption)\s*:\s*", "", text, flags=re.IGNORECASE).strip(" ,.;:")
    if trigger and text.lower().startswith(trigger.lower()):
        text = text[len(trigger) :].strip(" ,.;:")
    if not any(ch.isalnum() for ch in text):
        text = fallback_description(char_type)
    return text


def compose_caption(trigger: str, tags: Sequence[str] = (), sentence: str | None = None) -> str:
    """``"<trigger>, <tag>, <tag>, ..., <sentence>"``: tags as kohya users write them, each once.

    Args:
        trigger: the character's trigger word (always first: kohya's ``keep_tokens = 1`` keeps it).
        tags: Danbooru tags (underscores), most important first.
        sentence: an optional captioner sentence put after the tags.
    """
    from yokai_pipeline.tagging import format_tag

    parts, seen = ([trigger], {trigger.lower()}) if trigger else ([], set())
    for tag in tags:
        text = format_tag(tag)
        if text and text.lower() not in seen:
            parts.append(text)
            seen.add(text.lower())
    if sentence:
        parts.append(sentence)
    return ", ".join(parts)


def folder_tags(
    images: Sequence[Path], cfg: TagConfig
) -> tuple[dict[Path, list[str]], list[str], list[dict[str, str]]]:
    """Per-image caption tags of one character folder with its core tags pruned.

    Returns:
        ``(tags per image, core tags, failed)``: images without a current tag sidecar are
        listed in ``failed`` (the tag stage has to run first).
    """
    from yokai_pipeline.tagging import caption_tags, core_tags, read_tags, sidecar_path

    # Any tagger's sidecar will do: the tag stage (run first, same settings in the flow) keeps them current.
    docs = {p: read_tags(p) for p in images}
    lists = {p: caption_tags(d) for p, d in docs.items() if d is not None}
    core = core_tags(list(lists.values()), cfg.core_tag_ratio, cfg.never_prune) if cfg.prune_core_tags else []
    drop = set(core)
    failed = [
        {
            "name": p.name,
            "problem": f"no tags in {sidecar_path(p).name}: run the tag stage (yokai tag) first",
        }
        for p, d in docs.items()
        if d is None
    ]
    return {p: [t for t in tags if t not in drop] for p, tags in lists.items()}, core, failed


def fallback_description(char_type: str) -> str:
    """The description used when a captioner produced nothing."""
    return f"a {_TYPE_WORDS.get(char_type, 'character')}, simple background"


# --- offline captioner ---------------------------------------------------------------------

# OpenCV hue (0..180) upper bounds of named hues; red wraps around.
_HUES = ((8, "red"), (20, "orange"), (33, "yellow"), (78, "green"), (100, "cyan"), (130, "blue"),
         (150, "purple"), (170, "pink"), (181, "red"))  # fmt: skip


def colour_names(rgba: np.ndarray, *, top: int = 2, min_share: float = 0.12) -> list[str]:
    """Dominant colour names of the opaque pixels of an RGBA image, most common first.

    A histogram over named colours (hue bins plus black/white/grey/brown/skin), which is
    what a caption needs; black only counts when it dominates (outlines are not the design).

    Args:
        rgba: H x W x 4 uint8 (an RGB array counts as fully opaque).
        top: At most this many names.
        min_share: A colour needs this fraction of the opaque pixels.

    Returns:
        Colour names, e.g. ``["red", "white"]``.
    """
    import cv2

    rgb = np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3] if rgba.shape[-1] == 4 else np.full(rgba.shape[:2], 255, np.uint8)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[alpha > 127]
    if len(hsv) == 0:
        return []
    h, s, v = hsv[:, 0].astype(int), hsv[:, 1].astype(int), hsv[:, 2].astype(int)
    names = np.empty(len(hsv), dtype=object)
    hue_names = np.array([n for _, n in _HUES], dtype=object)
    names[:] = hue_names[np.searchsorted([b for b, _ in _HUES], h, side="right")]
    names[(h < 25) & (v < 160) & (s >= 60)] = "brown"
    names[(h >= 3) & (h < 18) & (s >= 40) & (s < 110) & (v >= 190)] = "skin"
    grey = s < 40
    names[grey] = "grey"
    names[grey & (v >= 200)] = "white"
    names[v < 50] = "black"
    labels, counts = np.unique(names.astype(str), return_counts=True)
    share = dict(zip(labels.tolist(), (counts / counts.sum()).tolist(), strict=True))
    share.pop("skin", None)  # skin is not what tells characters apart
    if share.get("black", 0) < 0.6:
        share.pop("black", None)  # line art: outlines are a third of the pixels, not the design
    ranked = sorted(share.items(), key=lambda kv: (-kv[1], kv[0]))
    return [n for n, f in ranked if f >= min_share][:top]


def silhouette_cues(rgba: np.ndarray) -> dict[str, Any]:
    """Shape, size and facing read off the alpha mask.

    Returns:
        ``{"shape": "round body" | "tall figure" | ..., "size": "small" | "medium" | "large",
        "facing": "left" | "right" | None}``. Facing comes from where the top of the
        silhouette (the head) sits relative to the whole: a side-facing figure leans its head
        forward; a front view gives None.
    """
    if rgba.shape[-1] != 4:
        return {"shape": None, "size": None, "facing": None}
    mask = rgba[..., 3] > 127
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return {"shape": None, "size": None, "facing": None}
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bh, bw = y1 - y0, x1 - x0
    aspect = bh / bw
    fill = len(ys) / float(bh * bw)
    if aspect >= 1.6:
        shape = "tall slender figure"
    elif aspect <= 0.7:
        shape = "wide body"
    elif fill >= 0.9:
        shape = "blocky body"
    elif fill >= 0.62 and 0.75 <= aspect <= 1.35:
        shape = "round body"
    else:
        shape = "compact body"
    size = "small" if bh < 96 else ("large" if bh > 256 else "medium")
    top = ys < y0 + 0.35 * bh
    lean = (xs[top].mean() - xs.mean()) / bw
    facing = "right" if lean > 0.02 else ("left" if lean < -0.02 else None)
    return {"shape": shape, "size": size, "facing": facing}


def describe_offline(image: Any, char_type: str = "unknown") -> str:
    """Template description of one image (no trigger): colours, type, shape, size, facing."""
    arr = np.asarray(image.convert("RGBA") if hasattr(image, "convert") else image)
    colours = colour_names(arr)
    cues = silhouette_cues(arr)
    word = _TYPE_WORDS.get(char_type, "character")
    lead = f"a {' and '.join(colours)} {word}" if colours else f"a {word}"
    parts = [f"{lead} with a {cues['shape']}" if cues["shape"] and "body" in cues["shape"] else lead]
    if cues["shape"] and "body" not in cues["shape"]:
        parts.append(cues["shape"])
    if cues["size"] and cues["size"] != "medium":
        parts.append(cues["size"])
    if cues["facing"]:
        parts.append(f"facing {cues['facing']}")
    parts.append("simple background")
    return ", ".join(parts)


class OfflineCaptioner:
    """Captioner without weights: :func:`describe_offline` per image.

    The character type is read from the prompt (:data:`PROMPTS`), so it fits the same
    interface as the model captioners.
    """

    name = "offline"

    def caption(self, images: list[Any], prompts: list[str]) -> list[str]:
        by_prompt = {v: k for k, v in PROMPTS.items()}
        return [
            describe_offline(im, by_prompt.get(p, "unknown")) for im, p in zip(images, prompts, strict=True)
        ]


# --- BLIP-2 captioner ----------------------------------------------------------------------


class Blip2Captioner:
    """BLIP-2 behind the captioner interface; the model loads on first use (memoised).

    Args:
        model: Hub id or local folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        max_new_tokens: Caption length limit.
        min_new_tokens: Forces at least this many tokens (benchmarks).
        compile: On CUDA, static KV cache + compiled decode step; every batch is then padded
            to ``batch_size`` images so one compiled shape serves the whole run.
        batch_size: The batch shape to pad to when compiling.
        device_preprocess: Resize/normalise on the GPU (default: on CUDA). The CPU threads then
            only decode and composite, which keeps them from starving the generation loop of
            the GIL.
        bundle: An already built :class:`~yokai_pipeline.models.blip2.Blip2Bundle` (tests, benchmarks).
    """

    name = "blip2"

    def __init__(
        self,
        model: str = "Salesforce/blip2-opt-6.7b",
        device: str = "auto",
        *,
        max_new_tokens: int = 40,
        min_new_tokens: int = 0,
        compile: bool = False,
        batch_size: int = 8,
        device_preprocess: bool | None = None,
        bundle: Any = None,
    ):
        self.model, self.device = model, device
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.compile, self.batch_size = compile, batch_size
        self._device_preprocess = device_preprocess
        self._bundle = bundle
        self._lock = threading.Lock()
        self._budget: Any = None  # batching.Budget once the device is known: halved on out-of-memory

    @property
    def bundle(self) -> Any:
        with self._lock:
            if self._bundle is None:
                from yokai_pipeline.models.blip2 import load_blip2

                self._bundle = load_blip2(self.model, self.device)
            return self._bundle

    @property
    def static(self) -> bool:
        """Whether the compiled static-cache path is in use (CUDA only)."""
        return self.compile and self.bundle.device.type == "cuda"

    @property
    def device_preprocess(self) -> bool:
        """Whether resizing/normalising runs on the model's GPU."""
        dp = self._device_preprocess
        return self.bundle.device.type == "cuda" if dp is None else bool(dp)

    def prepare(self, images: list[Any], prompts: list[str]) -> dict[str, Any]:
        """CPU side (prefetch thread): composite on white; resize/normalise/tokenise unless on the GPU."""
        from yokai_pipeline.models.blip2 import preprocess

        n = len(images)
        rgb = [composite_on_white(im) for im in images]
        prompts = list(prompts)
        if self.static and 0 < n < self.batch_size:
            # A short last batch would be a new shape, i.e. a recompile: pad with repeats, drop their output.
            rgb += [rgb[-1]] * (self.batch_size - n)
            prompts += [prompts[-1]] * (self.batch_size - n)
        if self.device_preprocess:
            return {"images": rgb, "prompts": prompts, "n": n}
        return {"inputs": preprocess(self.bundle, rgb, prompts), "n": n}

    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Model side: (GPU preprocessing, then) batched greedy generation of the answers."""
        from yokai_pipeline.models.blip2 import generate_captions, preprocess

        bundle = self.bundle
        with bundle.lock:
            inputs = batch.get("inputs")
            if inputs is None:
                inputs = preprocess(bundle, batch["images"], batch["prompts"], on_device=True)
            rows = _Rows(inputs)
            if self._budget is None:
                self._budget = batching.Budget("captioning", str(bundle.device), max(1, len(rows)))

            def run(part: dict[str, Any]) -> list[str]:
                return generate_captions(
                    bundle,
                    part,
                    max_new_tokens=self.max_new_tokens,
                    min_new_tokens=self.min_new_tokens,
                    static_cache=self.static,
                )

            # A batch too big for the GPU is generated in halves (the smaller size is kept for
            # the run; a compiled static cache compiles once more for the new shape).
            texts = batching.run_in_parts(
                run, rows, self._budget, lambda parts: [t for p in parts for t in p]
            )
        return texts[: batch["n"]]

    def caption(self, images: list[Any], prompts: list[str]) -> list[str]:
        return self.generate(self.prepare(images, prompts))


class _Rows:
    """Processor outputs (tensors with one row per image) sliced along the batch, for ``run_in_parts``."""

    def __init__(self, inputs: dict[str, Any]):
        self.inputs = inputs

    def __len__(self) -> int:
        return int(self.inputs["pixel_values"].shape[0])

    def __getitem__(self, rows: slice) -> dict[str, Any]:
        return {k: v[rows] for k, v in self.inputs.items()}


def get_captioner(cfg: CaptionConfig) -> Captioner:
    """The captioner named by ``cfg.backend`` (BLIP-2 weights load lazily on first use)."""
    if cfg.backend == "offline":
        return OfflineCaptioner()
    if cfg.backend == "blip2":
        return Blip2Captioner(
            cfg.model,
            cfg.device,
            max_new_tokens=cfg.max_new_tokens,
            compile=cfg.compile,
            batch_size=cfg.batch_size,
        )
    raise ValueError(f"unknown caption backend {cfg.backend!r}")


# --- stage runners ------------------------------------------------------------------------


def caption_path(image: str | Path) -> Path:
    """``x.png`` -> ``x.txt`` (kohya's caption_extension ".txt")."""
    return Path(image).with_suffix(".txt")


def has_caption(image: str | Path) -> bool:
    """True when the image already has a non-empty caption file."""
    txt = caption_path(image)
    try:
        return txt.is_file() and bool(txt.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False


def load_image(path: str | Path) -> Any:
    """Decode an image fully as 8-bit RGB or RGBA (alpha kept).

    Raises:
        BadInputError: the file is broken or a decompression bomb (named, so the rest of the
            folder is still captioned).
    """
    return read_image(path)


def _decode_batch(
    paths: Sequence[Path], pool: ThreadPoolExecutor
) -> tuple[list[Path], list[Any], list[dict[str, str]]]:
    def one(p: Path) -> tuple[Path, Any, str | None]:
        try:
            return p, load_image(p), None
        except BadInputError as exc:
            return p, None, exc.problem

    ok_paths, images, failed = [], [], []
    for p, im, problem in pool.map(one, paths):
        if problem is None:
            ok_paths.append(p)
            images.append(im)
        else:
            failed.append({"name": p.name, "problem": problem})
    return ok_paths, images, failed


def caption_folder(
    folder: str | Path,
    cfg: CaptionConfig,
    *,
    trigger: str = "char000",
    char_type: str = "unknown",
    captioner: Captioner | None = None,
    progress: Callable[[int, int], None] | None = None,
    num_workers: int = 4,
    tags: TagConfig | None = None,
) -> dict[str, Any]:
    """Caption every image directly in ``folder`` that has no caption yet.

    Args:
        folder: Folder of images (a cluster folder).
        cfg: Caption settings (backend, model, device, batch size, length).
        trigger: Trigger word put first in every caption.
        char_type: ``human``, ``yokai`` or ``unknown``: picks the question.
        captioner: Use this instead of building one from ``cfg``.
        progress: ``progress(done, total)`` callback over the images to caption.
        num_workers: Image-decoding threads.
        tags: With ``tags.caption`` ``tags`` or ``both``: the tags of each image's sidecar (core
            tags pruned) follow the trigger; ``tags`` alone needs no captioner.

    Returns:
        ``{"folder", "trigger", "type", "images", "captioned", "skipped", "failed": [{name, problem}],
        "fallback", "core_tags", "seconds", "images_per_s", "timing"}``; ``timing`` splits the seconds
        into waiting for decoded input, the model (preprocessing on the GPU included) and the last writes.
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(folder, "folder does not exist")
    images = list_images(folder)
    todo = [p for p in images if not has_caption(p)]
    result: dict[str, Any] = {
        "folder": str(folder),
        "trigger": trigger,
        "type": char_type,
        "images": len(images),
        "captioned": 0,
        "skipped": len(images) - len(todo),
        "failed": [],
        "fallback": 0,
        "core_tags": [],
    }
    per_image: dict[Path, list[str]] | None = None
    if tags is not None and tags.uses_tags:
        per_image, result["core_tags"], missing = folder_tags(images, tags)
        pending = {p.name for p in todo}  # an image captioned earlier needs no tags
        result["failed"].extend(m for m in missing if m["name"] in pending)
        todo = [p for p in todo if p in per_image]
        if tags.caption == "tags":
            _write_tag_captions(todo, per_image, trigger, result, progress)
            todo = []
    if todo:
        _caption_with_model(
            todo,
            captioner or get_captioner(cfg),
            cfg,
            trigger,
            char_type,
            per_image,
            result,
            progress,
            num_workers,
        )
    secs = time.perf_counter() - t0
    result["seconds"] = round(secs, 3)
    result["images_per_s"] = round(result["captioned"] / secs, 2) if secs > 0 else 0.0
    return result


def _caption_with_model(
    todo: list[Path],
    captioner: Captioner,
    cfg: CaptionConfig,
    trigger: str,
    char_type: str,
    per_image: Mapping[Path, Sequence[str]] | None,
    result: dict[str, Any],
    progress: Callable[[int, int], None] | None,
    num_workers: int,
) -> None:
    """The captioner over ``todo``: decode + prepare the next batch on threads while it generates.

    Captions (with ``per_image`` tags before the sentence, when given) are written on threads;
    counts, failures and timing go into ``result``.
    """
    prompt = prompt_for(char_type)
    bs = cfg.batch_size
    batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
    can_prepare = hasattr(captioner, "prepare") and hasattr(captioner, "generate")

    def load(
        batch_paths: list[Path],
    ) -> tuple[list[Path], list[Any], list[dict[str, str]], Any, str | None]:
        paths, ims, failed = _decode_batch(batch_paths, decode_pool)
        prepared, error = None, None
        if can_prepare and ims:
            try:
                prepared = captioner.prepare(ims, [prompt] * len(ims))  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - reported per image, the run goes on
                error = f"{type(exc).__name__}: {exc}"
        return paths, ims, failed, prepared, error

    done = 0
    wait_s = model_s = 0.0  # where the time goes: waiting for decoded input vs the model
    writes: list[tuple[Path, Any]] = []
    with (
        ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="decode") as decode_pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as prefetch,
        # Atomic writes fsync; on their own threads they overlap the next batch's generation.
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="write") as writer,
    ):
        future = prefetch.submit(load, batches[0])
        for i in range(len(batches)):
            tw = time.perf_counter()
            paths, ims, failed, prepared, error = future.result()
            wait_s += time.perf_counter() - tw
            if i + 1 < len(batches):
                future = prefetch.submit(load, batches[i + 1])  # overlaps the generation below
            result["failed"].extend(failed)
            texts: list[str] | None = None
            if paths and error is None:
                tm = time.perf_counter()
                try:
                    if prepared is not None:
                        texts = captioner.generate(prepared)  # type: ignore[attr-defined]
                    else:
                        texts = captioner.caption(ims, [prompt] * len(ims))
                except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the folder
                    error = f"{type(exc).__name__}: {exc}"
                model_s += time.perf_counter() - tm
            if error is not None:
                result["failed"].extend(
                    {"name": p.name, "problem": f"captioner failed: {error}"} for p in paths
                )
            elif texts is not None:
                for p, text in zip(paths, texts, strict=True):
                    if not any(ch.isalnum() for ch in str(text or "")):
                        result["fallback"] += 1
                    if per_image is None:
                        cap = format_caption(trigger, text, char_type) + "\n"
                    else:
                        sentence = clean_description(trigger, text, char_type)
                        cap = compose_caption(trigger, per_image[p], sentence) + "\n"
                    writes.append((p, writer.submit(atomic_write_text, caption_path(p), cap)))
            done += len(batches[i])
            if progress is not None:
                progress(done, len(todo))
        tw = time.perf_counter()
        written, failed = finish_writes(writes, "caption")
        result["captioned"] += written
        result["failed"] += failed
        result["timing"] = {
            "wait_input_s": round(wait_s, 3),
            "model_s": round(model_s, 3),
            "write_tail_s": round(time.perf_counter() - tw, 3),
        }


def _write_tag_captions(
    todo: Sequence[Path],
    per_image: Mapping[Path, Sequence[str]],
    trigger: str,
    result: dict[str, Any],
    progress: Callable[[int, int], None] | None,
) -> None:
    """Tags-only captions: no model, one atomic write per image."""
    for k, p in enumerate(todo, 1):
        try:
            atomic_write_text(caption_path(p), compose_caption(trigger, per_image[p]) + "\n")
            result["captioned"] += 1
        except OSError as exc:
            result["failed"].append({"name": p.name, "problem": f"cannot write caption: {exc}"})
        if progress is not None and (k % 64 == 0 or k == len(todo)):
            progress(k, len(todo))


def character_info(
    folder_name: str,
    *,
    analysis: Mapping[int, Mapping[str, Any]] | None = None,
    selection: Mapping[int, Mapping[str, Any]] | None = None,
) -> tuple[str, str]:
    """(trigger, type) of a cluster folder: selection first, then the analysis, then defaults."""
    cid = cluster_id(folder_name)
    sel = (selection or {}).get(cid, {}) if cid is not None else {}
    ana = (analysis or {}).get(cid, {}) if cid is not None else {}
    trigger = str(sel.get("trigger") or sel.get("name") or f"char{cid or 0:03d}")
    char_type = str(sel.get("type") or ana.get("type") or "unknown")
    return trigger, char_type if char_type in PROMPTS else "unknown"


def caption_clusters(
    clusters_dir: str | Path,
    cfg: CaptionConfig,
    *,
    analysis: Mapping[Any, Any] | str | Path | None = None,
    selection: Mapping[str, Any] | str | Path | None = None,
    captioner: Captioner | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    tags: TagConfig | None = None,
) -> dict[str, Any]:
    """Caption every cluster folder under ``clusters_dir`` (or ``clusters_dir`` itself when it holds images).

    Args:
        clusters_dir: Folder of ``cluster_NNN`` folders (e.g. ``augmented_clusters``).
        cfg: Caption settings.
        analysis: cluster_analysis.json (path or dict): the type of each cluster.
        selection: selection.json (path or dict): trigger word and type; when given, only
            its clusters are captioned.
        captioner: Use this instead of building one from ``cfg`` (one model for all folders).
        progress: ``progress(folder name, done, total)`` callback.
        tags: caption composition from the tag sidecars (see :func:`caption_folder`).

    Returns:
        Totals and per-folder results; also written to ``caption_summary.json`` in ``clusters_dir``.
    """
    t0 = time.perf_counter()
    captioner = captioner or get_captioner(cfg)
    results = []
    for job in caption_jobs(clusters_dir, analysis=analysis, selection=selection):
        name = Path(job["folder"]).name
        cb = (lambda d, t, _n=name: progress(_n, d, t)) if progress else None
        results.append(
            caption_folder(
                job["folder"],
                cfg,
                trigger=job["trigger"],
                char_type=job["type"],
                captioner=captioner,
                progress=cb,
                tags=tags,
            )
        )
    return summarize_captions(
        results,
        clusters_dir,
        cfg,
        backend=getattr(captioner, "name", type(captioner).__name__),
        seconds=time.perf_counter() - t0,
    )


def caption_jobs(
    clusters_dir: str | Path,
    *,
    analysis: Mapping[Any, Any] | str | Path | None = None,
    selection: Mapping[str, Any] | str | Path | None = None,
) -> list[dict[str, str]]:
    """One JSON-ready record per folder to caption: ``[{"folder", "trigger", "type"}]``.

    ``clusters_dir`` itself is the only folder when it holds images and no cluster folders.
    With a selection, only its clusters are listed.
    """
    clusters_dir = Path(clusters_dir)
    info = normalise_analysis(analysis)
    sel = read_selection(selection) if selection is not None else None
    folders = cluster_folders(clusters_dir)
    if not folders and list_images(clusters_dir):
        folders = [clusters_dir]
    if sel is not None:
        folders = [f for f in folders if cluster_id(f.name) in sel]
    jobs = []
    for folder in folders:
        trigger, char_type = character_info(folder.name, analysis=info, selection=sel)
        jobs.append({"folder": str(folder), "trigger": trigger, "type": char_type})
    return jobs


def summarize_captions(
    results: list[dict[str, Any]],
    clusters_dir: str | Path,
    cfg: CaptionConfig,
    *,
    backend: str | None = None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """Totals over :func:`caption_folder` results; written to ``clusters_dir/caption_summary.json``."""
    captioned = sum(r["captioned"] for r in results)
    summary = {
        "backend": backend or cfg.backend,
        "folders": len(results),
        "images": sum(r["images"] for r in results),
        "captioned": captioned,
        "skipped": sum(r["skipped"] for r in results),
        "fallback": sum(r["fallback"] for r in results),
        "failed": [dict(f, folder=Path(r["folder"]).name) for r in results for f in r["failed"]],
        "seconds": round(seconds, 3),
        "images_per_s": round(captioned / seconds, 2) if seconds > 0 else 0.0,
        "results": results,
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(Path(clusters_dir) / SUMMARY_NAME, summary)
    return summary
