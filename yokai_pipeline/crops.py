"""3-stage crops: full body, upper body and head of every character instance.

Anime dataset builders (Anime2SD, deepghs' waifuc/cyberharem) train each character on three
framings of the same instance: the whole figure, the upper body and the head. Here:

- **Layering** records, for each instance layer, the boxes of its upper-body and head crops
  (:func:`crop_boxes`; manifest fields ``crop_kind: "full_body"`` and ``crops:
  {"upper_body": box, "head": box}``, frame pixels, ends exclusive). With the yolo detection
  backend and ``detection.head_model`` the head box is the head detector's (deepghs'
  anime_head_detection); otherwise it comes from the instance mask's geometry:

  * *head*: the figure's rows from its top down to its neck. The neck is the narrowest row
    of the mask's width profile within :data:`NECK_WINDOW` of the figure's height whose width
    dips below both the head above and the shoulders below by at least ``crop_neck_dip`` of the
    figure's widest row. Without such a dip (long hair hides the neck, a round yokai has
    none) the head is the top ``crop_head_frac`` of the box, an anime head-to-body ratio
    (0.3 by default: chibi figures are 1:3, adults 1:6-1:7, and the default errs large,
    since a head crop with shoulders is a usable portrait and a cut face is not);
  * *upper body*: the rows from the top down to ``crop_upper_frac`` of the figure's height (and
    at least 1.6 head heights, so a big head keeps its shoulders);
  * each crop's width is the mask's extent in those rows, plus ``crop_margin``.

  The crops follow their instance: clustering sees one row per instance (the full layer),
  so a character never splits into three clusters by framing.

- **The dataset stage** (:func:`crop_cluster`, after augmentation) cuts the crops out of the
  selected clusters' layers in the shares of ``CropConfig`` over the character's instances
  (e.g. half full body, 30 % upper body, 20 % head), so the kohya folders hold the mix users
  train on; the offline tagger gives each crop its framing tag (``full_body``,
  ``upper_body``, ``portrait``). A crop is packaged as a derived image of its instance (like
  an augmented copy): the guide's rows by image count still count instances.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from yokai_pipeline import fsio
from yokai_pipeline.config import CropConfig, LayeringConfig
from yokai_pipeline.errors import BadInputError

Box = tuple[int, int, int, int]
KINDS = ("full_body", "upper_body", "head")
CROPS_MANIFEST = "crops_manifest.jsonl"
#: Rows of the figure's height searched for a neck (a head is 1/8 to 1/2 of the figure).
NECK_WINDOW = (0.12, 0.5)


# --------------------------------------------------------------------------- geometry (layering)


def head_rows(inside: np.ndarray, cfg: LayeringConfig) -> tuple[int, str]:
    """Height of the head from the figure's top (rows of ``inside``), and how it was found.

    Args:
        inside: bool mask of one instance, cropped to its tight box.
        cfg: ``crop_head_frac`` (fallback ratio) and ``crop_neck_dip``.

    Returns:
        (rows, "neck" | "ratio").
    """
    h = inside.shape[0]
    width = inside.sum(axis=1).astype(np.float32)
    k = max(1, h // 40) * 2 + 1  # smooth over outline steps
    width = np.convolve(np.pad(width, k // 2, mode="edge"), np.ones(k) / k, mode="valid")
    lo, hi = int(NECK_WINDOW[0] * h), int(NECK_WINDOW[1] * h)
    if hi - lo >= 3 and width.max() > 0:
        # dip of each row below the widest row above it (the head) and below it (the shoulders)
        above = np.maximum.accumulate(width)
        below = np.maximum.accumulate(width[::-1])[::-1]
        dip = np.minimum(above, below) - width
        r = lo + int(np.argmax(dip[lo:hi]))
        if dip[r] >= cfg.crop_neck_dip * width.max():
            # the narrowest row is under the jaw; the chin ends where the shoulders widen
            wider = np.flatnonzero(width[r:] >= width[r] + 0.5 * dip[r])
            return r + (int(wider[0]) if wider.size else 0), "neck"
    return max(1, int(round(cfg.crop_head_frac * h))), "ratio"


def _extent(inside: np.ndarray, rows: int) -> tuple[int, int]:
    cols = np.flatnonzero(inside[:rows].any(axis=0))
    return (int(cols[0]), int(cols[-1]) + 1) if cols.size else (0, inside.shape[1])


def _grow(box: Box, margin: float, width: int, height: int) -> list[int]:
    x0, y0, x1, y1 = box
    mx, my = round((x1 - x0) * margin), round((y1 - y0) * margin)
    return [max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)]


def crop_boxes(
    inside: np.ndarray,
    origin: tuple[int, int],
    frame_size: tuple[int, int],
    cfg: LayeringConfig,
    head_box: Box | None = None,
) -> dict[str, Any]:
    """Upper-body and head crop boxes of one instance, in frame pixels.

    Args:
        inside: bool mask of the instance cropped to its tight box.
        origin: the tight box's top-left (x0, y0) in the frame.
        frame_size: (width, height) of the frame.
        cfg: crop geometry (``crop_*`` fields) and ``crop_margin``.
        head_box: a head detector's box for this instance (frame pixels), if any.

    Returns:
        ``{"upper_body": box, "head": box, "source": "head_detector" | "neck" | "ratio"}``.
    """
    h, w = inside.shape
    ox, oy = origin
    fw, fh = frame_size
    if head_box is not None:
        hx0, hy0, hx1, hy1 = (int(round(v)) for v in head_box)
        head = (hx0, hy0, hx1, hy1)
        rows, source = max(1, min(h, hy1 - oy)), "head_detector"
    else:
        rows, source = head_rows(inside, cfg)
        x0, x1 = _extent(inside, rows)
        head = (ox + x0, oy, ox + x1, oy + rows)
    upper_rows = min(h, max(int(round(cfg.crop_upper_frac * h)), int(round(1.6 * rows))))
    x0, x1 = _extent(inside, upper_rows)
    upper = (ox + x0, oy, ox + x1, oy + upper_rows)
    return {
        "upper_body": _grow(upper, cfg.crop_margin, fw, fh),
        "head": _grow(head, cfg.crop_margin, fw, fh),
        "source": source,
    }


# --------------------------------------------------------------------------- dataset stage


def crop_stem(layer_id: str, kind: str) -> str:
    """File stem of an instance's crop: the layer id for the full body, ``<layer id>_<kind>`` else."""
    return layer_id if kind == "full_body" else f"{layer_id}_{kind}"


def plan_crops(layer_ids: list[str], available: Mapping[str, set[str]], cfg: CropConfig) -> dict[str, int]:
    """How many crops of each kind a character gets, in the configured shares.

    The total is the largest one every kind's share can fill from the instances that have
    that crop (each instance gives at most one crop of a kind; kinds none has are skipped).

    Args:
        layer_ids: the character's instances.
        available: layer id -> kinds it has a crop of.
        cfg: kinds and shares.

    Returns:
        kind -> count (kinds not in ``cfg.kinds`` absent).
    """
    shares = cfg.shares()
    have = {k: sum(k in available.get(i, set()) for i in layer_ids) for k in shares}
    # a kind no instance has (layers older than crops, all too small) leaves the others their counts
    total = min((have[k] / s for k, s in shares.items() if have[k]), default=0.0)
    return {k: min(have[k], int(round(s * total))) for k, s in shares.items()}


def pick_crops(
    layer_ids: list[str], available: Mapping[str, set[str]], cfg: CropConfig
) -> list[tuple[str, str]]:
    """(layer id, kind) of every crop to make: per kind, the instances ranked by a seeded hash.

    Seeded per (layer, kind), so adding an instance to a character keeps the others' picks.
    """
    out = []
    for kind, n in plan_crops(layer_ids, available, cfg).items():
        ids = [i for i in layer_ids if kind in available.get(i, set())]
        ids.sort(key=lambda i, kind=kind: fsio.stable_hash([cfg.seed, i, kind]))
        out += [(i, kind) for i in sorted(ids[:n])]
    return out


def layer_rows(manifests_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Layer id -> its character row, from the episodes' layer manifests."""
    rows = [r for p in sorted(Path(manifests_dir).glob("*.jsonl")) for r in fsio.read_jsonl(p)]
    return {str(r["layer_id"]): r for r in rows if r.get("kind") == "character" and "layer_id" in r}


def _cut(src: Path, row: Mapping[str, Any], box: list[int]) -> np.ndarray:
    """The crop ``box`` (frame pixels) out of the layer PNG ``src`` that covers ``row["box"]``."""
    import cv2

    img = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BadInputError(src, "unreadable layer image")
    lx, ly = int(row["box"][0]), int(row["box"][1])
    x0, y0 = max(0, box[0] - lx), max(0, box[1] - ly)
    x1, y1 = min(img.shape[1], box[2] - lx), min(img.shape[0], box[3] - ly)
    return img[y0:y1, x0:x1]


def crop_cluster(
    src_dir: str | Path, out_dir: str | Path, rows: Mapping[str, Mapping[str, Any]], cfg: CropConfig
) -> dict[str, Any]:
    """Add one character's upper-body and head crops to its augmented folder ``out_dir``.

    The full bodies are the folder's originals already (augmentation placed them). Each crop
    is cut out of its layer in ``src_dir`` and listed in ``crops_manifest.jsonl`` with its
    ``source`` (the original's file name), so packaging treats it like an augmented copy of
    its instance: the guide's image-count rows and the augmentation multiplier still count
    instances, and a held-out validation original takes its crops out of training with it.
    Crops of an earlier plan that this one lacks are removed (with their captions); a crop
    whose pixels are unchanged is not rewritten.

    Returns:
        ``{"counts": {kind: n}, "failed": [{"name", "problem"}]}`` (full_body = instances).
    """
    import cv2

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise BadInputError(src_dir, "cluster folder does not exist")
    images = {p.stem: p for p in sorted(src_dir.glob("*.png")) if not p.name.startswith(fsio.TMP_PREFIX)}
    available = {i: {"full_body", *_usable(rows.get(i, {}), cfg)} for i in images}
    manifest_path = out_dir / CROPS_MANIFEST
    previous = {m["path"] for m in fsio.read_jsonl(manifest_path)} if manifest_path.is_file() else set()
    manifest, failed = [], []
    counts = dict.fromkeys(cfg.kinds, 0)
    for layer_id, kind in pick_crops(sorted(images), available, cfg):
        if kind == "full_body":
            counts[kind] += 1
            continue
        dest = out_dir / f"{crop_stem(layer_id, kind)}.png"
        try:
            data = fsio.encode_png(_cut(images[layer_id], rows[layer_id], rows[layer_id]["crops"][kind]))
            if not dest.is_file() or dest.read_bytes() != data:
                dest.with_suffix(".txt").unlink(missing_ok=True)  # its caption described other pixels
                fsio.atomic_write_bytes(dest, data)
        except (BadInputError, OSError, cv2.error) as exc:
            failed.append({"name": images[layer_id].name, "problem": str(exc)})
            continue
        counts[kind] += 1
        manifest.append(
            {"path": dest.name, "source": images[layer_id].name, "layer_id": layer_id, "crop_kind": kind}
        )
    for stale in previous - {m["path"] for m in manifest}:
        (out_dir / stale).unlink(missing_ok=True)
        (out_dir / stale).with_suffix(".txt").unlink(missing_ok=True)
    fsio.write_jsonl(manifest_path, manifest)
    return {"counts": counts, "failed": failed}


def _usable(row: Mapping[str, Any], cfg: CropConfig) -> list[str]:
    """Crop kinds of a layer row large enough to train on (shorter side >= ``cfg.min_side``)."""
    out = []
    for kind, box in (row.get("crops") or {}).items():
        if kind in KINDS and isinstance(box, list) and min(box[2] - box[0], box[3] - box[1]) >= cfg.min_side:
            out.append(kind)
    return out
