"""Detection: find each character instance in a kept frame before layering cuts it out.

Two backends (``DetectionConfig.backend``):

- ``offline`` (default, no weights): a per-shot background plate and line art. The shot's
  stack (its candidate frames, written by frame extraction) is aligned to the frame by phase
  correlation (camera pans), and its robust median is the *plate*: what the background looks
  like where the characters are not. Characters are what the line art encloses *and* moves
  against the plate; outlined props are enclosed too but never move, so they are rejected.
  A second, masked median leaves the moving regions out of the plate, so it shows the
  background behind slow characters wherever any frame of the shot saw it (that also fills
  the character holes of the background layer). Touching characters are split by a watershed
  on the distance transform; an instance stays when other frames of the shot confirm that it
  moved (they show the background where it was). docs/detection.md says where each cue fails.
- ``yolo``: the anime person / half-body / head detectors (``models.detector``), boxes per
  frame; the layering segmenter's mask is cut inside each box.

The result of one frame is a :class:`Detection`: an instance label map (0 = background,
k = instance k), the boxes, and the plate with where it saw the background.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from yokai_pipeline.config import DetectionConfig
from yokai_pipeline.errors import BadInputError, ConfigError

#: Shot stacks kept decoded per process: the kept frames of a shot arrive one after another.
_STACK_CACHE = 4


@dataclass
class Detection:
    """Instances of one frame.

    Attributes:
        labels: int32 HxW, 0 = background, k >= 1 = instance k (left to right).
        boxes: float32 (N, 6): x0, y0, x1, y1 (x1/y1 exclusive), score, class id; row k-1 is instance k.
        plate: RGB uint8 HxW background plate aligned to the frame, or None (no stack / yolo).
        plate_seen: bool HxW, where the plate saw the background (None with ``plate`` None).
        source_boxes: yolo: float32 (N, 6), the detector's box that made instance k (row k-1).
        heads: yolo with a head detector: float32 (N, 4), instance k's head box (NaN: none found).
        motion_share: offline with a stack: float32 (N,), the share of instance k's pixels whose
            motion other frames of the shot confirm (the background seen where it was; cue 7).
    """

    labels: np.ndarray
    boxes: np.ndarray
    plate: np.ndarray | None = None
    plate_seen: np.ndarray | None = None
    source_boxes: np.ndarray | None = None
    heads: np.ndarray | None = None
    motion_share: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Pure per-image cues
# ---------------------------------------------------------------------------------------------


def _max_channel(rgb: np.ndarray) -> np.ndarray:
    r, g, b = cv2.split(rgb)  # ~20x faster than rgb.max(axis=2)
    return cv2.max(cv2.max(r, g), b)


def line_art(rgb: np.ndarray, dark_value: int, contrast: float) -> np.ndarray:
    """Outline pixels: darker than ``dark_value`` and than ``contrast`` x the paint around them.

    The relative test keeps a night background (dark everywhere, but evenly) from reading as
    line art: a line is dark *against its surroundings*.
    """
    v = _max_channel(rgb)
    around = cv2.dilate(v, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    thr = np.minimum(float(dark_value), around.astype(np.float32) * contrast)
    line = (v.astype(np.float32) < thr).astype(np.uint8)
    # compression opens small gaps in the outlines
    return cv2.morphologyEx(line, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))) > 0


def enclosed_regions(line: np.ndarray, big_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Line art plus the small cells it encloses: where a drawn figure can be.

    A cell is a 4-connected region of non-line pixels; cells of ``big_frac`` of the frame or
    more are open background (sky, floor, walls). Unlike a flood fill from the frame border,
    this keeps a figure cut by the frame edge.

    Returns:
        (candidate mask, cell labels of the candidate cells; 0 elsewhere).
    """
    h, w = line.shape
    n, cells, stats, _ = cv2.connectedComponentsWithStats((~line).view(np.uint8), connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < big_frac * h * w
    small[0] = False  # label 0 is the line art itself
    cand = line | small[cells]
    return cand, np.where(small[cells], cells, 0)


def align_offset(
    ref_grey: np.ndarray, grey: np.ndarray, ignore: np.ndarray | None = None, peaks: int = 8
) -> tuple[float, float]:
    """Translation (dx, dy) that moves ``grey`` onto ``ref_grey``: the camera pan between them.

    Phase correlation gives a few candidate shifts (its highest peaks); the one under which
    most background pixels (outside ``ignore``, e.g. the figures of both frames) agree wins.
    The highest peak alone follows a large character walking across a plain background.
    Above 720p the correlation runs at half size (4x cheaper), its shifts refined to 1 px.
    """
    h, w = ref_grey.shape
    f = 2 if min(h, w) >= 720 else 1  # full size up to 720p: two pans a few px apart stay two peaks
    a, b = (
        cv2.resize(x.astype(np.float32), (w // f, h // f), interpolation=cv2.INTER_AREA)
        for x in (ref_grey, grey)
    )
    win = cv2.createHanningWindow(a.shape[::-1], cv2.CV_32F)
    fa, fb = np.fft.rfft2(a * win), np.fft.rfft2(b * win)
    cross = fa * np.conj(fb)
    r = np.fft.irfft2(cross / np.maximum(np.abs(cross), 1e-9), s=a.shape)
    r = r.astype(np.float32)
    local_max = (r == cv2.dilate(r, np.ones((3, 3), np.uint8))) & (r > 0)
    ys, xs = np.nonzero(local_max)
    order = np.argsort(-r[ys, xs])[:peaks]
    hh, ww = a.shape
    best, best_score = (0.0, 0.0), -1.0
    keep = None if ignore is None else ~ignore
    for y, x in zip(ys[order], xs[order], strict=True):
        dy0 = (y if y <= hh // 2 else y - hh) * f
        dx0 = (x if x <= ww // 2 else x - ww) * f
        for dx in range(dx0 - f + 1, dx0 + f):  # refine the half-size step to 1 px
            for dy in range(dy0 - f + 1, dy0 + f):
                moved, valid = shift(grey, dx, dy)
                ok = valid if keep is None else valid & keep
                n = int(ok.sum())
                if n < 0.2 * h * w:
                    continue
                score = float((cv2.absdiff(moved, ref_grey)[ok] < 8).mean())
                if score > best_score:
                    best, best_score = (float(dx), float(dy)), score
    return best


def shift(img: np.ndarray, dx: float, dy: float) -> tuple[np.ndarray, np.ndarray]:
    """``img`` moved by (dx, dy) and the mask of pixels that came from inside it."""
    h, w = img.shape[:2]
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    valid = cv2.warpAffine(np.full((h, w), 255, np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) == 255
    return out, valid


def masked_median(frames: np.ndarray, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel median colour over the frames where ``use`` is set.

    The median is taken over packed RGB values, so it is always a colour one of the frames
    shows there (on flat cel paint: the paint seen most often, not a blend of paints).

    Args:
        frames: uint8 (N, H, W, 3).
        use: bool (N, H, W).

    Returns:
        (plate uint8 HxWx3, number of frames used per pixel int HxW).
    """
    n, h, w = use.shape
    packed = np.empty((n, h, w), np.uint32)
    for j in range(n):  # RGB -> RGBA viewed as one uint32 per pixel (alpha 0)
        packed[j] = cv2.cvtColor(frames[j], cv2.COLOR_RGB2RGBA, dstCn=4).view(np.uint32)[..., 0] & 0x00FFFFFF
    packed[~use] = 0xFFFFFFFF  # sorted to the end
    packed.sort(axis=0)
    count = use.sum(axis=0, dtype=np.int32)
    pick = np.take_along_axis(packed, (np.maximum(count - 1, 0) // 2)[None], axis=0)[0]
    pick[count == 0] = 0
    plate = np.ascontiguousarray(pick.view(np.uint8).reshape(h, w, 4)[..., :3])
    return plate, count


def differs(a: np.ndarray, b: np.ndarray, tol: int) -> np.ndarray:
    """Pixels where two RGB images differ by more than ``tol`` in some channel (1-px seams dropped)."""
    d = _max_channel(cv2.absdiff(a, b)) > tol
    return cv2.morphologyEx(d.view(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0


def moving_blobs(cand: np.ndarray, moving: np.ndarray, cfg: DetectionConfig, strict: bool) -> np.ndarray:
    """The 8-connected blobs of ``cand`` with enough moving pixels in them (static props drop out).

    ``strict`` asks for ``motion_frac`` of the blob too (a figure of this frame); without it a
    third of ``min_moving_px`` will do (what to leave out of the plate: better too much).
    """
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cand.view(np.uint8), connectivity=8)
    hits = np.bincount(lab[moving], minlength=n)
    if strict:
        keep = hits >= np.maximum(cfg.min_moving_px, cfg.motion_frac * stats[:, cv2.CC_STAT_AREA])
    else:
        keep = hits >= max(1, cfg.min_moving_px // 3)
    keep[0] = False
    return keep[lab]


def drop_stray_lines(fg: np.ndarray, line: np.ndarray, reach: int) -> np.ndarray:
    """``fg`` without the thin line art that no painted part of it is near (cue 8, docs/detection.md).

    A figure's outlines border its own fill; a prop's outline left on a figure after the prop's
    cells were taken off (cue 5b keeps every outline) borders only what was taken off. Thin line
    pixels of ``fg`` (what an opening of the line art as wide as two outlines removes: thick dark
    paint stays) farther than ``reach`` px from ``fg``'s non-line pixels are dropped.
    """
    thin = line & ~(cv2.morphologyEx(line.view(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)) > 0)
    stray = fg & thin
    if not stray.any():
        return fg
    paint = (fg & ~line).view(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    near = cv2.dilate(paint, k) > 0
    return fg & ~(stray & ~near)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with the holes of each blob filled (what is not reachable from the border)."""
    inv = np.pad(~mask, 1, constant_values=True).view(np.uint8).copy()
    cv2.floodFill(inv, None, (0, 0), 2, flags=4)
    return (inv != 2)[1:-1, 1:-1]


def split_instances(mask: np.ndarray, min_area: float, depth: float) -> np.ndarray:
    """Label map of ``mask``'s instances, touching figures split by a distance-transform watershed.

    A blob splits where it has two or more cores (parts deeper than ``depth`` x its deepest
    point) of at least a tenth of ``min_area`` each: two bodies joined by a narrow overlap.

    Returns:
        int32 labels, 0 = background, 1.. = instances ordered left to right.
    """
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    out = np.zeros(mask.shape, np.int32)
    boxes: list[tuple[int, int, np.ndarray]] = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < min_area:
            continue
        sub = lab[y : y + h, x : x + w] == k
        for part in _watershed_parts(sub, min_area, depth):
            ys, xs = np.nonzero(part)
            boxes.append((x + int(xs.min()), y + int(ys.min()), np.stack([ys + y, xs + x])))
    boxes.sort(key=lambda b: (b[0], b[1]))
    for i, (_, _, pts) in enumerate(boxes, start=1):
        out[pts[0], pts[1]] = i
    return out


def _watershed_parts(sub: np.ndarray, min_area: float, depth: float, neck: float = 0.5) -> list[np.ndarray]:
    """One blob's parts: its watershed basins, those joined by a thick saddle merged back.

    A real join of two figures is thin next to the figures (the distance to the outline at
    the saddle between their cores is small); one figure's head sits on its shoulders with
    a saddle nearly as thick as the head, so head and body stay one instance.
    """
    pad = np.pad(sub, 1).view(np.uint8)
    dist = cv2.distanceTransform(pad, cv2.DIST_L2, 5)
    if dist.max() <= 0:
        return [sub]
    n, mk, st, _ = cv2.connectedComponentsWithStats(
        (dist > depth * dist.max()).view(np.uint8), connectivity=8
    )
    big = [k for k in range(1, n) if st[k, cv2.CC_STAT_AREA] >= 0.1 * min_area]
    if len(big) < 2:
        return [sub]
    markers = np.zeros(pad.shape, np.int32)
    for i, k in enumerate(big, start=1):
        markers[mk == k] = i
    outside = len(big) + 1
    markers[pad == 0] = outside  # the outside is a basin of its own
    img = cv2.cvtColor(np.clip(255 - dist * (255 / dist.max()), 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    cv2.watershed(img, markers)
    depth_of = {i: float(dist[markers == i].max(initial=0)) for i in range(1, outside)}
    # the saddle between each pair of basins: the thickest ridge pixel (-1) next to both
    saddle: dict[tuple[int, int], float] = {}
    ys, xs = np.nonzero((markers == -1) & (pad > 0))
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        near = {int(v) for v in markers[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].ravel()}
        near = sorted(v for v in near if 0 < v < outside)
        for a in range(len(near)):
            for b in range(a + 1, len(near)):
                key = (near[a], near[b])
                saddle[key] = max(saddle.get(key, 0.0), float(dist[y, x]))
    group = list(range(outside))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for (a, b), thick in saddle.items():
        if thick > neck * min(depth_of[a], depth_of[b]):
            group[root(a)] = root(b)
    basins = (markers == -1) | (markers == outside)
    parts_by_root: dict[int, np.ndarray] = {}
    for i in range(1, outside):
        r = root(i)
        parts_by_root[r] = parts_by_root.get(r, np.zeros(pad.shape, bool)) | (markers == i)
    parts = [p[1:-1, 1:-1] for p in parts_by_root.values() if p.sum() >= min_area / 2]
    if len(parts) < 2:
        return [sub]
    # the watershed lines go to the part they touch, so the parts cover the blob
    ridge = sub & ~np.any(parts, axis=0) & basins[1:-1, 1:-1]
    for p in parts:
        g = cv2.dilate(p.view(np.uint8), np.ones((3, 3), np.uint8)) > 0
        p |= ridge & g
        ridge &= ~g
    return parts


def boxes_of(labels: np.ndarray) -> np.ndarray:
    """(N, 6) boxes of instances 1..N of a label map (score 1, class 0)."""
    n = int(labels.max())
    out = np.zeros((n, 6), np.float32)
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if xs.size:
            out[k - 1] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 1.0, 0)
    return out


# ---------------------------------------------------------------------------------------------
# Offline detector: plate + line art + motion
# ---------------------------------------------------------------------------------------------


def background_grey(rgb: np.ndarray, figures: np.ndarray) -> np.ndarray:
    """Grey image with ``figures`` painted over from around them (the figures' edges out of the FFT)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    known = (~figures).astype(np.float32)
    k = (max(15, rgb.shape[1] // 16) | 1,) * 2
    fill = cv2.boxFilter(grey * known, -1, k) / np.maximum(cv2.boxFilter(known, -1, k), 1e-3)
    return np.where(figures, fill, grey)


def _aligned_stack(
    frame: np.ndarray, stack: list[np.ndarray], cand: np.ndarray, cfg: DetectionConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stack moved onto ``frame`` (camera motion removed), frame first.

    Returns:
        (frames (N+1, H, W, 3), valid pixels (N+1, H, W), enclosed regions of each (N+1, H, W)).
    """
    n = len(stack) + 1
    frames = np.empty((n, *frame.shape), np.uint8)
    valid = np.empty((n, *frame.shape[:2]), bool)
    figs = np.empty((n, *frame.shape[:2]), bool)
    frames[0], valid[0], figs[0] = frame, True, cand
    ref = background_grey(frame, cand)
    for j, im in enumerate(stack, start=1):
        fj = enclosed_regions(line_art(im, cfg.dark_value, cfg.line_contrast), cfg.big_cell_frac)[0]
        dx, dy = align_offset(ref, background_grey(im, fj), cand | fj)
        frames[j], valid[j] = shift(im, dx, dy)
        figs[j] = shift(fj.view(np.uint8), dx, dy)[0] > 0
    return frames, valid, figs


def detect_offline(frame: np.ndarray, stack: np.ndarray | None, cfg: DetectionConfig) -> Detection:
    """Character instances of one frame from line art and motion against the shot's plate.

    Args:
        frame: RGB uint8 HxWx3.
        stack: the other frames of the shot, RGB uint8 (N, h, w, 3) (resized to the frame if
            their size differs); None or fewer than 2 frames: no motion cue, every enclosed
            figure counts (the line-art cue alone).
        cfg: detection thresholds.

    Returns:
        The frame's :class:`Detection`.
    """
    h, w = frame.shape[:2]
    min_area = cfg.min_area_frac * h * w
    line = line_art(frame, cfg.dark_value, cfg.line_contrast)
    cand, cells = enclosed_regions(line, cfg.big_cell_frac)
    if stack is None or len(stack) < 2:
        labels = split_instances(fill_holes(cand), min_area, cfg.split_depth)
        return Detection(labels, boxes_of(labels))
    same = [
        im if im.shape == frame.shape else cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA)
        for im in stack
    ]
    frames, valid, figs = _aligned_stack(frame, same, cand, cfg)
    plate0, _ = masked_median(frames, valid)
    # Round 1: in every frame of the shot, the enclosed blobs that move against the plate.
    moving = np.empty(valid.shape, bool)
    blob = np.empty(valid.shape, bool)
    grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    for j in range(len(frames)):
        dj = differs(frames[j], plate0, cfg.diff_tol) & valid[j]
        if cfg.mask_cell_frac > 0:
            # only the cells that changed: a prop the figure touches stays in the plate
            lj = line if j == 0 else line_art(frames[j], cfg.dark_value, cfg.line_contrast)
            cj, cells_j = (cand, cells) if j == 0 else enclosed_regions(lj, cfg.big_cell_frac)
            mj = _figure_cells(cells_j, lj, dj, moving_blobs(cj, dj, cfg, strict=False), cfg.mask_cell_frac)
        else:
            mj = moving_blobs(figs[j], dj, cfg, strict=False)
        blob[j] = mj
        moving[j] = cv2.dilate(mj.view(np.uint8), grow) > 0
    changed = blob[0]  # what changed in this frame itself: kept below even where the plate agrees
    # Round 2: the plate without the moving figures: the background behind them where seen.
    # Seen in too few frames is not seen: a figure that moves little is missed in some frames.
    plate, seen = masked_median(frames, valid & ~moving)
    covered = valid.sum(axis=0, dtype=np.int32)
    saw = (seen >= 2) & (seen >= cfg.seen_frac * covered)
    evidence = (differs(frame, plate, cfg.diff_tol) & saw) | (~saw & (covered >= 2)) | changed
    blobs = moving_blobs(cand, evidence, cfg, strict=True)
    # what each other frame shows changed against this one: cue 7's revealed and own changes
    away = _changed_from_first(frames, valid, cfg) if cfg.revealed_frames else None
    revealed = None if away is None else _revealed(away, blob)
    if cfg.static_match_frac > 0:
        hidden = None if revealed is None else (moving, revealed)
        static, still, stable = static_cells(cells, line, frames, valid, cfg, hidden)
        # a static cell the plate saw on its own in some frames (the figure elsewhere) is a
        # prop; one it never saw is part of a figure that holds still (its body, the arm waving)
        # unless the rest of the blob moved off it as a whole (_walks_off_props)
        n, pooled = len(static), static.copy()
        static &= np.bincount(cells[seen >= 2], minlength=n) >= cfg.static_seen_frac * np.bincount(
            cells.ravel(), minlength=n
        )
        off = _detachable(blobs, cells, static, stable, min_area, cfg)
        walk = _walks_off_props(blobs & ~off, cells, pooled, still, frames, min_area, cfg)
        if walk.any():
            walk = _whole_after(walk, blobs, cells, line, evidence & ~off, min_area, cfg)
        evidence = evidence & ~(off | walk)
    fg = _figure_cells(cells, line, evidence, blobs, cfg.cell_fg_frac)
    if cfg.stray_line_reach > 0:
        fg = drop_stray_lines(fg, line, max(2, round(cfg.stray_line_reach * h)))
    labels = split_instances(fill_holes(fg), min_area, cfg.split_depth)
    if cfg.static_match_frac > 0 and cfg.still_instance_frac < 1:
        labels = _drop_still_instances(labels, still[cells] | (line & stable), cfg.still_instance_frac)
    share = None
    if revealed is not None:
        labels, share = _confirmed_instances(labels, revealed | _own_changes(labels, away, blob), cfg)
    return Detection(labels, boxes_of(labels), plate, saw, motion_share=share)


def _changed_from_first(frames: np.ndarray, valid: np.ndarray, cfg: DetectionConfig) -> np.ndarray:
    """Per other frame j: where it shows something else than frame 0 (:func:`differs`, within ``valid``).

    Returns:
        bool (N, H, W); row 0 unused (False).
    """
    out = np.zeros(valid.shape, bool)
    for j in range(1, len(frames)):
        out[j] = differs(frames[j], frames[0], cfg.diff_tol) & valid[j]
    return out


def _revealed(away: np.ndarray, blob: np.ndarray) -> np.ndarray:
    """Per other frame j: the pixels of frame 0 whose content frame j shows gone (cue 7).

    Frame j shows something else there, and no moving figure (``blob``, its enclosed blobs
    that moved): the background where frame 0's content was. (Frame j's figure paint and
    the background showing through a pocket it encloses look alike at night, so a pixel
    inside a figure of frame j never counts here; :func:`_own_changes` covers a figure that
    changed in place.)

    Args:
        away: :func:`_changed_from_first` of the shot.
        blob: bool (N, H, W), each frame's moving blobs.

    Returns:
        bool (N, H, W); row 0 unused (False).
    """
    out = np.zeros(away.shape, bool)
    one = np.ones((3, 3), np.uint8)
    for j in range(1, len(away)):
        front = cv2.dilate(blob[j].view(np.uint8), one) > 0  # not the wider plate mask
        out[j] = away[j] & ~front
    return out


def revealing_frames(labels: np.ndarray, revealed: np.ndarray, min_px: float, frac: float) -> np.ndarray:
    """Per label of ``labels``: how many frames reveal the background in its place (cue 7).

    Frame j reveals label k where ``revealed[j]`` covers ``min_px`` pixels and ``frac`` of the
    label's area. Counted per frame, not per pixel: an arm waving through new places reveals
    different pixels in each frame, and one badly aligned frame confirms nothing alone.

    Args:
        labels: int HxW label map (instances or cells).
        revealed: bool (N, H, W), frame 0's row unused.
        min_px: fewest revealed pixels for a frame to count.
        frac: ... and this share of the label's area.

    Returns:
        int (labels.max() + 1,): frames per label (index 0, the background, included).
    """
    n = int(labels.max()) + 1
    need = np.maximum(min_px, frac * np.bincount(labels.ravel(), minlength=n))
    out = np.zeros(n, np.int32)
    for rj in revealed[1:]:
        out += np.bincount(labels[rj], minlength=n) >= need
    return out


def _own_changes(labels: np.ndarray, away: np.ndarray, blob: np.ndarray) -> np.ndarray:
    """Per other frame j: the pixels of frame 0's instances that changed inside their own figure.

    Frame j's moving blob that covers most of an instance and lies mostly on it is that figure,
    at about the same place (a character holding still): where it differs from frame 0 inside
    the instance, the figure itself changed (an arm swung off the body it hung over). A figure
    passing in front of a prop is mostly elsewhere, or covers little of it: no own change.

    Args:
        labels: frame 0's instances.
        away: :func:`_changed_from_first` of the shot.
        blob: bool (N, H, W), each frame's moving blobs.

    Returns:
        bool (N, H, W); row 0 unused (False).
    """
    out = np.zeros(away.shape, bool)
    n = int(labels.max()) + 1
    if n < 2:
        return out
    area = np.bincount(labels.ravel(), minlength=n)
    idx = np.flatnonzero(labels)  # only the instances' pixels matter
    lab = labels.ravel()[idx].astype(np.int64)
    for j in range(1, len(away)):
        m, comp, stats, _ = cv2.connectedComponentsWithStats(blob[j].view(np.uint8), connectivity=8)
        if m < 2:
            continue
        pair = lab * m + comp.ravel()[idx]
        overlap = np.bincount(pair, minlength=n * m).reshape(n, m)
        own = (overlap * 2 >= stats[None, :, cv2.CC_STAT_AREA]) & (overlap * 2 >= area[:, None])
        own[:, 0] = False
        hit = own.ravel()[pair]
        if hit.any():
            out[j].ravel()[idx[hit]] = away[j].ravel()[idx[hit]]
    return out


def _confirmed_instances(
    labels: np.ndarray, revealed: np.ndarray, cfg: DetectionConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the instances whose motion ``revealed_frames`` other frames confirm (renumbered), and their shares.

    A character that moves or animates leaves the background behind it in the frames where it
    (or its arm, its mouth) is elsewhere; a prop shows itself wherever nothing covers it and,
    where something covers it, that is a moving figure of that frame: no frame reveals it.

    Returns:
        (labels, share of each kept instance's pixels that some frame reveals, float32 (N,)).
    """
    n = int(labels.max())
    frames = revealing_frames(labels, revealed, cfg.min_moving_px, cfg.revealed_frac)
    keep = frames >= cfg.revealed_frames
    keep[0] = False
    total = np.bincount(labels.ravel(), minlength=n + 1)
    hit = np.bincount(labels[revealed[1:].any(axis=0)], minlength=n + 1)
    return _keep_labels(labels, keep), (hit[keep] / np.maximum(total[keep], 1)).astype(np.float32)


def _keep_labels(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``labels`` with only the labels where ``keep`` (index 0 False), renumbered 1.. in order."""
    lut = np.zeros(len(keep), np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels]


def _drop_still_instances(labels: np.ndarray, still: np.ndarray, frac: float) -> np.ndarray:
    """``labels`` without the instances of which ``frac`` or more of the pixels are ``still`` (renumbered).

    The watershed can cut a prop off the figure it touches; the prop's part is then an instance
    of its own drawn exactly so in other frames of the shot (still regions, stable outlines):
    it did not move, it is no character. A figure holding still keeps its animated part (its
    regions and outlines moved).
    """
    n = int(labels.max())
    if n == 0:
        return labels
    total = np.bincount(labels.ravel(), minlength=n + 1)
    hit = np.bincount(labels[still], minlength=n + 1)
    keep = ~(hit >= frac * np.maximum(total, 1))
    keep[0] = False
    return _keep_labels(labels, keep)


def static_cells(
    cells: np.ndarray,
    line: np.ndarray,
    frames: np.ndarray,
    valid: np.ndarray,
    cfg: DetectionConfig,
    hidden: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell of frame 0: is it drawn the same, at the same place, in other frames of the shot?

    A pixel is *stable* when at least two aligned frames, and ``seen_frac`` of those that
    show it, have frame 0's colour there (raw difference: a line that moved by its own width
    must count as moved). An outlined prop's cells and outlines are stable wherever nothing
    covers them in most frames; a moving figure's flat paint can overlap itself (its interior
    is stable too) but its outline moves. So a cell is static when ``static_match_frac`` of its
    pixels and half of the outline pixels bordering it are stable (half: a prop a figure stands
    in front of is bordered by the figure's outline too).

    A static cell is also *still* when, in ``static_same_frames`` single frames, its paint
    (``static_match_frac``) and its whole outline (``static_ring_frac``) are unchanged at once:
    a prop looks exactly so wherever nothing covers it; a figure that walks along one of its
    own lines keeps that line in place (the pooled test above passes), but in no single frame
    do all of its outlines stay.

    Returns:
        (static per cell label (index 0, the line art, is False), still per cell label,
        stable pixels HxW).
    """
    n = int(cells.max()) + 1
    matches = np.zeros(cells.shape, np.int16)
    shown = np.zeros(cells.shape, np.int16)
    total = np.bincount(cells.ravel(), minlength=n)
    rings = _RingCounter(cells, line, n)
    paint, outline = [], []
    quiet = None if hidden is None else _quiet_cells(cells, rings, hidden[1], cfg)
    if quiet is not None:
        near_quiet = cv2.dilate(quiet.view(np.uint8), np.ones((5, 5), np.uint8)) > 0  # their outlines
    excused = np.zeros(cells.shape, np.int16)
    band = np.ones((5, 5), np.uint8)
    for j in range(1, len(frames)):
        mj = (_max_channel(cv2.absdiff(frames[j], frames[0])) <= cfg.diff_tol) & valid[j]
        matches += mj
        shown += valid[j]
        same_j = np.bincount(cells[mj], minlength=n)
        if quiet is not None and hidden is not None:
            # a figure in front covers an area; a figure that shifted a pixel or two against
            # its own old place leaves thin bands along its outlines: those are no cover
            hid = cv2.morphologyEx((hidden[0][j] & valid[j] & ~mj).view(np.uint8), cv2.MORPH_OPEN, band) > 0
            hid &= near_quiet
            excused += hid
            mj = mj | hid
        if cfg.static_same_frames:
            ok = np.bincount(cells[mj], minlength=n) >= cfg.static_match_frac * np.maximum(total, 1)
            paint.append(ok & (same_j * 2 >= total))
            outline.append(mj)
    stable = (matches >= 2) & (matches >= cfg.seen_frac * shown)
    known = total
    if quiet is not None:
        # unchanged wherever shown and not hidden, in one frame at least (a prop covered in most);
        # not the outlines: a figure that moves a little hides its own outline's old place
        stable |= quiet & (matches >= 1) & (matches + excused >= shown)
        # hidden in every other frame: no evidence either way (at most half of the cell)
        unknown = np.bincount(cells[quiet & (matches == 0) & (excused >= shown)], minlength=n)
        known = np.maximum(total - unknown, (total + 1) // 2)
    hit = np.bincount(cells[stable], minlength=n)
    static = (hit >= cfg.static_match_frac * np.maximum(known, 1)) & (
        rings.count(stable) * 2 >= rings.count(None)
    )
    static[0] = False
    # the outline a cell shares with a changing cell (a figure in front of the prop) moves
    # with that figure: only the rest of the outline must stay
    changing = (cells > 0) & ~static[cells]
    keep = cv2.dilate(changing.view(np.uint8), np.ones((9, 9), np.uint8)) == 0
    own = rings.count(keep)
    same = np.zeros(n, np.int32)
    for p, mj in zip(paint, outline, strict=True):
        same += p & (rings.count(mj & keep) >= cfg.static_ring_frac * own)
    still = static & (same >= max(1, cfg.static_same_frames)) & (own * 4 >= rings.count(None))
    return static, still, stable


def _quiet_cells(
    cells: np.ndarray, rings: _RingCounter, revealed: np.ndarray, cfg: DetectionConfig
) -> np.ndarray:
    """Pixels of the cells whose place no ``revealed_frames`` other frames reveal (cue 7).

    The outline bordering a cell counts with it: a figure that moves a little reveals the
    background along its outline only. Where a quiet cell differs in another frame, a moving
    figure in front hides it (:func:`static_cells`).
    """
    n = rings.n
    need = np.maximum(4, cfg.revealed_frac * (np.bincount(cells.ravel(), minlength=n) + rings.count(None)))
    frames = np.zeros(n, np.int32)
    for rj in revealed[1:]:
        frames += (np.bincount(cells[rj], minlength=n) + rings.count(rj)) >= need
    quiet = frames < cfg.revealed_frames
    quiet[0] = False
    return quiet[cells]


def _detachable(
    blobs: np.ndarray,
    cells: np.ndarray,
    static: np.ndarray,
    stable: np.ndarray,
    min_area: float,
    cfg: DetectionConfig,
) -> np.ndarray:
    """Pixels of static cells to take out of the moving blobs (props a figure touches).

    A blob whose moving part is a figure of its own (``min_area`` and ``detach_frac`` of the
    blob) loses its static cells: props it stands in front of or touches. A blob that barely
    changes anywhere (fewer than ``min_moving_px`` non-static pixels) is a prop the plate
    never saw behind: it goes whole. A blob whose changing part is small next to it (a
    character standing still, only the mouth or eyes animated) stays whole: its still body
    is static by this cue too.
    """
    n, lab = cv2.connectedComponents(blobs.view(np.uint8), connectivity=8)
    st = static[cells] & blobs
    area = np.bincount(lab.ravel(), minlength=n)
    moving = area - np.bincount(lab[st], minlength=n)
    changing = np.bincount(lab[blobs & ~st & ~stable], minlength=n)
    detach = moving >= np.maximum(min_area, cfg.detach_frac * area)
    detach[0] = False
    whole = (changing < cfg.min_moving_px)[lab] & blobs
    return (st & detach[lab]) | whole


def _walks_off_props(
    blobs: np.ndarray,
    cells: np.ndarray,
    static: np.ndarray,
    still: np.ndarray,
    frames: np.ndarray,
    min_area: float,
    cfg: DetectionConfig,
) -> np.ndarray:
    """Still cells to take out of blobs whose changing part is a small figure that moves whole.

    :func:`_detachable` keeps a blob whole when its changing part is small next to it (a
    figure holding still, a hand waving). A small figure walking past a large prop looks the
    same by area; what tells them apart is that the figure's changing part is found again,
    shifted, in other frames of the shot (it moved as a whole), while an animated hand or
    mouth changes shape (the part compared: the blob's cells that are not static). Then the
    blob's still cells (drawn exactly so, outline included, in
    single frames: :func:`static_cells`) are a prop.
    """
    out = np.zeros(blobs.shape, bool)
    if not cfg.static_same_frames:
        return out
    n, lab, stats, _ = cv2.connectedComponentsWithStats(blobs.view(np.uint8), connectivity=8)
    st = still[cells] & blobs
    for k in range(1, n):
        x, y, w, h, _ = (int(v) for v in stats[k])
        blob = lab[y : y + h, x : x + w] == k
        # the changing cells, without the outlines (a prop's lines are not still cells)
        sub = cells[y : y + h, x : x + w]
        part = _largest_part(blob & (sub > 0) & ~static[sub])
        if not st[y : y + h, x : x + w][blob].any() or part.sum() < min_area:
            continue
        if _moved_whole(frames, part, (x, y), cfg.diff_tol):
            out[y : y + h, x : x + w] |= blob & st[y : y + h, x : x + w]
    return out


def _whole_after(
    walk: np.ndarray,
    blobs: np.ndarray,
    cells: np.ndarray,
    line: np.ndarray,
    evidence: np.ndarray,
    min_area: float,
    cfg: DetectionConfig,
) -> np.ndarray:
    """``walk`` without the blobs it would cut into more instances than they make whole.

    A prop is cut off the side of a figure, never out of its middle: still cells whose removal
    leaves a blob in more pieces (a figure's torso between its head and legs, still while the
    arms move over it) belong to the figure.
    """

    def instances(ev: np.ndarray) -> np.ndarray:
        return split_instances(
            fill_holes(_figure_cells(cells, line, ev, blobs, cfg.cell_fg_frac)), min_area, cfg.split_depth
        )

    n, lab = cv2.connectedComponents(blobs.view(np.uint8), connectivity=8)
    before, after = instances(evidence), instances(evidence & ~walk)
    out = walk.copy()
    for k in np.unique(lab[walk]):
        blob = lab == k
        if len(np.unique(after[blob & (after > 0)])) > len(np.unique(before[blob & (before > 0)])):
            out &= ~blob
    return out


def _largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` (the figure among scattered prop bits)."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    return lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _moved_whole(frames: np.ndarray, part: np.ndarray, origin: tuple[int, int], tol: int) -> bool:
    """Is ``part`` of frame 0 (a mask at ``origin``) found shifted in some other aligned frame?

    The best shift (at half size, within a tenth of the frame's width) must show at least 60 %
    of the part's pixels in their colour, and 20 points more than no shift does.
    """
    ys, xs = np.nonzero(part)
    x0, y0 = origin[0] + int(xs.min()), origin[1] + int(ys.min())
    x1, y1 = origin[0] + int(xs.max()) + 1, origin[1] + int(ys.max()) + 1
    mask = part[y0 - origin[1] : y1 - origin[1], x0 - origin[0] : x1 - origin[0]]
    hh, ww = frames.shape[1:3]
    r = max(8, ww // 10)
    rx0, ry0, rx1, ry1 = max(0, x0 - r), max(0, y0 - r), min(ww, x1 + r), min(hh, y1 + r)
    tpl = frames[0, y0:y1, x0:x1]
    half = (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2))
    t2 = cv2.resize(tpl, half, interpolation=cv2.INTER_AREA).astype(np.float32)
    m2 = cv2.resize(mask.view(np.uint8), half, interpolation=cv2.INTER_NEAREST)
    if m2.sum() < 16:
        return False
    m2 = cv2.merge([m2.astype(np.float32)] * 3)

    def inside(dx: int, dy: int) -> bool:
        return 0 <= x0 + dx and x1 + dx <= ww and 0 <= y0 + dy and y1 + dy <= hh

    def frac(img: np.ndarray, dx: int, dy: int) -> float:
        win = img[y0 + dy : y1 + dy, x0 + dx : x1 + dx]
        return float((_max_channel(cv2.absdiff(win, tpl))[mask] <= tol).mean())

    for j in range(1, len(frames)):
        reg = frames[j, ry0:ry1, rx0:rx1]
        size = (max(1, (rx1 - rx0) // 2), max(1, (ry1 - ry0) // 2))
        r2 = cv2.resize(reg, size, interpolation=cv2.INTER_AREA).astype(np.float32)
        if r2.shape[0] < t2.shape[0] or r2.shape[1] < t2.shape[1]:
            continue
        res = cv2.matchTemplate(r2, t2, cv2.TM_SQDIFF, mask=m2)
        _, _, (bx, by), _ = cv2.minMaxLoc(np.nan_to_num(res, nan=np.inf))
        dx, dy = rx0 + 2 * bx - x0, ry0 + 2 * by - y0
        if abs(dx) + abs(dy) < 4 or not inside(dx, dy):
            continue
        best = max(
            frac(frames[j], dx + ex, dy + ey)
            for ex in (-1, 0, 1)
            for ey in (-1, 0, 1)
            if inside(dx + ex, dy + ey)
        )
        if best >= 0.6 and best >= frac(frames[j], 0, 0) + 0.2:
            return True
    return False


class _RingCounter:
    """Per cell: how many of the outline pixels bordering it (within 2 px) are set in a mask.

    An outline pixel between two cells counts for both (the nearest cell labels above and
    below it: a grey dilation and erosion of the label map, computed once per frame).
    """

    def __init__(self, cells: np.ndarray, ring: np.ndarray, n: int) -> None:
        lab = cells.astype(np.float32)
        k = np.ones((5, 5), np.uint8)
        self.n, self.ring = n, ring
        self.near = [
            cv2.dilate(lab, k)[ring].astype(np.int64),
            cv2.erode(np.where(cells > 0, lab, np.float32(n)), k)[ring].astype(np.int64),
        ]

    def count(self, mask: np.ndarray | None) -> np.ndarray:
        """Outline pixels per cell where ``mask`` is set (None: all of them)."""
        sel = None if mask is None else mask[self.ring]
        out = np.zeros(self.n, np.int64)
        for idx in self.near:
            idx = idx if sel is None else idx[sel]
            ok = (idx > 0) & (idx < self.n)
            out += np.bincount(idx[ok], minlength=self.n)
        return out


def _figure_cells(
    cells: np.ndarray,
    line: np.ndarray,
    evidence: np.ndarray,
    blobs: np.ndarray,
    frac: float,
) -> np.ndarray:
    """Cells of the moving blobs that differ from the plate, with the outlines around them.

    A cell of a moving blob that the (masked) plate shows unchanged is a static prop the
    figure touches: it is left out.
    """
    inside = blobs & (cells > 0)
    n = int(cells.max()) + 1
    total = np.bincount(cells[inside], minlength=n)
    hit = np.bincount(cells[inside & evidence], minlength=n)
    keep = hit >= frac * np.maximum(total, 1)
    keep[0] = False
    fg = keep[cells] & blobs
    # outlines stay unless they only border dropped cells (a prop's lines); thin parts drawn
    # all in line art (limbs, tails) border no cell at all and stay
    dropped = blobs & (cells > 0) & ~fg
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (13, 13))
    near_kept = cv2.dilate(fg.view(np.uint8), disk) > 0
    near_dropped = cv2.dilate(dropped.view(np.uint8), disk) > 0
    return fg | (line & blobs & (near_kept | ~near_dropped))


# ---------------------------------------------------------------------------------------------
# YOLO backend glue (models.detector, part of issue 15's neural models)
# ---------------------------------------------------------------------------------------------

_detectors: dict[str, Any] = {}
_detectors_lock = threading.Lock()


def get_detector(cfg: DetectionConfig, head: bool = False) -> Any:
    """The neural detector for ``cfg`` (``models.detector.load_detector``), memoised per process.

    ``head=True``: the head detector of ``cfg.head_model`` instead (3-stage crops' head boxes).
    """
    model, kind = (cfg.head_model, "head") if head else (cfg.model, cfg.kind)
    if model is None:
        raise ConfigError("detection.backend=yolo needs detection.model (a local .onnx file or a hub id)")
    key = json.dumps([model, kind, cfg.device, cfg.batch_size])
    with _detectors_lock:
        if key not in _detectors:
            try:
                from yokai_pipeline.models.detector import load_detector
            except ImportError as exc:
                raise ImportError(
                    "detection.backend=yolo needs yokai_pipeline.models.detector and onnxruntime "
                    "(pip install 'yokai-pipeline[gpu]')"
                ) from exc
            _detectors[key] = load_detector(model, kind=kind, device=cfg.device, batch_size=cfg.batch_size)
        return _detectors[key]


def labels_in_boxes(mask_u8: np.ndarray, boxes: np.ndarray, threshold: int, min_area: float) -> np.ndarray:
    """Cut a foreground mask into instances: each box takes the unclaimed mask pixels inside it.

    Boxes are visited by score (best first), so where two boxes overlap the more confident
    detection takes the shared pixels; mask pixels outside every box (background props a
    saliency model picked up) belong to no instance.
    """
    return labels_and_sources(mask_u8, boxes, threshold, min_area)[0]


def labels_and_sources(
    mask_u8: np.ndarray, boxes: np.ndarray, threshold: int, min_area: float
) -> tuple[np.ndarray, list[int]]:
    """:func:`labels_in_boxes` and, per instance k (item k-1), the index of the box that made it."""
    h, w = mask_u8.shape
    fg = mask_u8 > threshold
    out = np.zeros((h, w), np.int32)
    order = np.argsort(-boxes[:, 4], kind="stable") if len(boxes) else []
    parts = []
    for i in order:
        x0, y0, x1, y1 = (int(round(float(v))) for v in boxes[i, :4])
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 <= x0 or y1 <= y0:
            continue
        take = fg[y0:y1, x0:x1] & (out[y0:y1, x0:x1] == 0)
        if take.sum() < min_area:
            continue
        out[y0:y1, x0:x1][take] = len(parts) + 1
        parts.append((x0, y0, int(i)))
    # renumber left to right, like the offline instances
    order_lr = sorted(range(len(parts)), key=lambda k: parts[k])
    lut = np.zeros(len(parts) + 1, np.int32)
    for new, old in enumerate(order_lr, start=1):
        lut[old + 1] = new
    return lut[out], [parts[k][2] for k in order_lr]


def heads_of(labels: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """Each instance's head box among a head detector's boxes (NaN row: none).

    A head belongs to the instance that has the most mask pixels inside it (at least a
    quarter of the box); each head goes to one instance, best score first.
    """
    n = int(labels.max()) if labels.size else 0
    out = np.full((n, 4), np.nan, np.float32)
    h, w = labels.shape
    for i in np.argsort(-heads[:, 4], kind="stable") if len(heads) else []:
        x0, y0, x1, y1 = (int(round(float(v))) for v in heads[i, :4])
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 <= x0 or y1 <= y0:
            continue
        counts = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=n + 1)
        counts[0] = 0
        k = int(counts.argmax())
        if k and np.isnan(out[k - 1, 0]) and counts[k] >= 0.25 * (x1 - x0) * (y1 - y0):
            out[k - 1] = heads[i, :4]
    return out


def detect_yolo(
    frames: list[np.ndarray], masks: list[np.ndarray], cfg: DetectionConfig, threshold: int
) -> list[Detection]:
    """Instances of a batch of frames: detector boxes, the segmenter's mask cut inside each.

    The whole batch goes to the detector at once (it runs ``cfg.batch_size`` frames per
    forward pass); with ``cfg.head_model`` the head detector runs on it too and each
    instance gets its head box (the 3-stage crops' head crop).
    """
    dets = get_detector(cfg).detect(frames)
    heads = get_detector(cfg, head=True).detect(frames) if cfg.head_model else [None] * len(frames)
    out = []
    for im, m, d, hd in zip(frames, masks, dets, heads, strict=True):
        d = np.asarray(d, np.float32).reshape(-1, 6)
        d = d[d[:, 4] >= cfg.score_threshold]
        labels, src = labels_and_sources(m, d, threshold, cfg.min_area_frac * im.shape[0] * im.shape[1])
        found = Detection(labels, boxes_of(labels), source_boxes=d[src].reshape(-1, 6))
        if hd is not None:
            found.heads = heads_of(labels, np.asarray(hd, np.float32).reshape(-1, 6))
        out.append(found)
    return out


# ---------------------------------------------------------------------------------------------
# Stack I/O
# ---------------------------------------------------------------------------------------------

_stacks: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_stacks_lock = threading.Lock()


def read_stack(path: str | Path, frame_index: int | None = None) -> np.ndarray:
    """A shot's stack (written by frame extraction) without frame ``frame_index``; cached per process.

    The cache is keyed on the file's size and mtime too: a re-extracted episode (a replaced
    video) rewrites its stacks under the same names, and layering's worker processes outlive it.

    Raises:
        BadInputError: the stack is missing or unreadable (names the file).
    """
    try:
        st = os.stat(path)
        key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        key = str(path)  # np.load below names the missing file
    with _stacks_lock:
        hit = _stacks.get(key)
        if hit is not None:
            _stacks.move_to_end(key)
    if hit is None:
        try:
            with np.load(path) as z:
                frames, index = z["frames"], z["index"]
        except (OSError, ValueError, KeyError) as exc:
            raise BadInputError(
                path, f"shot stack missing or unreadable ({exc}); re-run frame extraction"
            ) from exc
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(index) != len(frames):
            raise BadInputError(path, f"not a shot stack (frames {frames.shape} {frames.dtype})")
        hit = (frames, index)
        with _stacks_lock:
            _stacks[key] = hit
            while len(_stacks) > _STACK_CACHE:
                _stacks.popitem(last=False)
    frames, index = hit
    return frames[index != frame_index] if frame_index is not None else frames
