"""Layering: offline segmentation quality on the sample series, layer files, resume, bad frames, U2Net."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from yokai_pipeline import layering, synthetic
from yokai_pipeline.config import LayeringConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.fsio import read_jsonl
from yokai_pipeline.workspace import Workspace

STEP = 4  # every 4th frame of a short episode: 48 frames over several shots


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> synthetic.SeriesInfo:
    return synthetic.generate_series(tmp_path_factory.mktemp("series"), seed=1, episodes=1, seconds=8.0)


def _write_frames(
    series: synthetic.SeriesInfo, ws: Workspace, step: int = STEP, limit: int | None = None
) -> list[dict]:
    """Frame PNGs + manifest rows as the frames stage writes them (every ``step``-th frame)."""
    gt = synthetic.load_ground_truth(series.ground_truth[0])
    cap = cv2.VideoCapture(str(series.episodes[0]))
    rows, idx = [], 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        if idx % step == 0:
            rel = f"episodes/ep01/frames/ep01_f{idx:06d}.png"
            ws.abs(rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(ws.abs(rel)), bgr)
            h, w = bgr.shape[:2]
            rows.append(
                {"episode": "ep01.mp4", "episode_id": "ep01", "frame_index": idx, "timestamp": idx / 24,
                 "shot_id": gt["frames"][idx]["shot_id"], "phash": "0" * 16, "sharpness": 1.0,
                 "width": w, "height": h, "path": rel}
            )  # fmt: skip
        idx += 1
        if limit is not None and len(rows) >= limit:
            break
    cap.release()
    return rows


@pytest.fixture(scope="module")
def layered(series, tmp_path_factory):
    """The offline backend run once over the episode's frames."""
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    rows = _write_frames(series, ws)
    cfg = LayeringConfig()
    out = layering.segment_layers(rows, ws, cfg)
    layering.write_layer_manifest(ws, "ep01", out)
    return ws, rows, out, synthetic.load_ground_truth(series.ground_truth[0])


def test_offline_segmenter_mean_iou_on_sample_series(layered):
    ws, rows, _, gt = layered
    result = layering.mask_iou(ws, "ep01", gt)
    print("offline segmentation IoU:", result)
    assert result["frames"] == len(rows)
    assert result["mean_iou"] >= 0.8
    assert result["min_iou"] >= 0.6


def test_one_character_layer_per_ground_truth_character(layered):
    _, rows, out, gt = layered
    counts: dict[int, int] = {}
    for r in out:
        if r["kind"] == "character":
            counts[r["frame_index"]] = counts.get(r["frame_index"], 0) + 1
    matches = [
        counts.get(r["frame_index"], 0) == len(gt["frames"][r["frame_index"]]["characters"]) for r in rows
    ]
    assert sum(matches) >= 0.95 * len(rows), (
        f"{sum(matches)}/{len(rows)} frames with the right instance count"
    )
    # Every ground-truth character is covered by a layer box (best box IoU well above chance).
    for r in rows[::6]:
        boxes = [o["box"] for o in out if o["kind"] == "character" and o["frame_index"] == r["frame_index"]]
        for ch in gt["frames"][r["frame_index"]]["characters"]:
            assert max(synthetic.box_iou(ch["box"], b) for b in boxes) > 0.7


def test_manifest_rows_follow_the_data_format(layered):
    ws, rows, out, _ = layered
    manifest = read_jsonl(ws.layers_manifest("ep01"))
    assert len(manifest) == len(out)
    keys = [(r["frame_index"], r["kind"], r["layer_id"]) for r in manifest]
    assert keys == sorted(keys)
    char_keys = {
        "layer_id",
        "kind",
        "episode",
        "episode_id",
        "frame_index",
        "shot_id",
        "box",
        "area",
        "path",
        "frame_path",
    }
    for r in manifest:
        if r["kind"] == "character":
            assert set(r) == char_keys
            assert r["path"] == f"layered_frames/character/ep01/{r['layer_id']}.png"
        else:
            assert set(r) == char_keys | {"mask_path"}
            assert r["layer_id"] == f"ep01_f{r['frame_index']:06d}_bg"
            assert r["box"] == [0, 0, 640, 360]
            assert r["path"] == f"layered_frames/background/ep01/ep01_f{r['frame_index']:06d}.png"
            assert r["mask_path"] == f"layered_frames/masks/ep01/ep01_f{r['frame_index']:06d}.png"
        assert ws.abs(r["path"]).is_file() and ws.abs(r["frame_path"]).is_file()
    assert {r["frame_index"] for r in manifest} == {r["frame_index"] for r in rows}


def test_rgba_layers_are_the_frame_cut_by_the_mask(layered):
    ws, _, out, _ = layered
    for r in [o for o in out if o["kind"] == "character"][:20]:
        rgba = cv2.cvtColor(cv2.imread(str(ws.abs(r["path"])), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
        frame = cv2.cvtColor(cv2.imread(str(ws.abs(r["frame_path"]))), cv2.COLOR_BGR2RGB)
        mask = cv2.imread(str(ws.abs(f"layered_frames/masks/ep01/ep01_f{r['frame_index']:06d}.png")), 0) > 127
        x0, y0, x1, y1 = r["box"]
        assert rgba.shape == (y1 - y0, x1 - x0, 4)
        alpha = rgba[..., 3] > 0
        assert alpha.sum() == r["area"]
        assert not (alpha & ~mask[y0:y1, x0:x1]).any(), "alpha outside the mask"
        assert np.array_equal(rgba[..., :3][alpha], frame[y0:y1, x0:x1][alpha])
        # The margin leaves transparent pixels around the instance on every side inside the frame.
        assert not alpha[0].any() or y0 == 0
        assert not alpha[:, 0].any() or x0 == 0


def test_background_has_no_outline_left_where_characters_were(layered):
    ws, rows, _, gt = layered
    for r in rows:
        region = synthetic.gt_mask(gt, r["frame_index"]) > 0
        if not region.any():
            continue
        frame = cv2.imread(str(ws.abs(r["path"])))
        bg = cv2.imread(str(ws.abs(f"layered_frames/background/ep01/ep01_f{r['frame_index']:06d}.png")))
        dark_before = (frame.max(axis=2) < 60)[region].mean()
        dark_after = (bg.max(axis=2) < 60)[region].mean()
        assert dark_before > 0.02  # the outlines were there
        assert dark_after < 0.002, (
            f"frame {r['frame_index']}: {dark_after:.4f} of the character area still dark"
        )
        # Away from the characters the background is the frame, untouched.
        far = cv2.dilate(region.astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
        assert np.array_equal(bg[far], frame[far])


def test_rerun_skips_finished_frames_and_redoes_missing_ones(series, tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    rows = _write_frames(series, ws, step=16)
    cfg = LayeringConfig()
    first = layering.segment_layers(rows, ws, cfg)

    calls = []
    real = layering._write_frame
    monkeypatch.setattr(
        layering, "_write_frame", lambda *a, **k: calls.append(a[1]["frame_index"]) or real(*a, **k)
    )
    assert layering.segment_layers(rows, ws, cfg) == first
    assert calls == []

    redo = rows[3]
    ws.abs(f"layered_frames/masks/ep01/ep01_f{redo['frame_index']:06d}.png").unlink()
    assert layering.segment_layers(rows, ws, cfg) == first
    assert calls == [redo["frame_index"]]


def test_a_corrupt_frame_is_recorded_and_the_rest_complete(series, tmp_path):
    ws = Workspace(tmp_path)
    rows = _write_frames(series, ws, step=24)
    bad = ws.abs(rows[1]["path"])
    bad.write_bytes(bad.read_bytes()[:200])  # truncated PNG
    out = layering.segment_layers(rows, ws, LayeringConfig())
    done = {r["frame_index"] for r in out}
    assert done == {r["frame_index"] for r in rows} - {rows[1]["frame_index"]}
    failure = read_jsonl_one(ws.abs(f"layered_frames/failures/ep01/ep01_f{rows[1]['frame_index']:06d}.json"))
    assert failure["frame_path"] == rows[1]["path"]


def read_jsonl_one(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_a_chunk_where_every_frame_fails_names_the_file(series, tmp_path):
    ws = Workspace(tmp_path)
    rows = _write_frames(series, ws, step=48, limit=2)
    for r in rows:
        ws.abs(r["path"]).write_bytes(b"")
    with pytest.raises(BadInputError, match=r"ep01_f000000\.png: not a decodable image"):
        layering.segment_layers(rows, ws, LayeringConfig())


def test_layers_from_mask_drops_specks_and_inpaints():
    frame = np.full((120, 200, 3), (90, 160, 220), np.uint8)
    mask = np.zeros((120, 200), np.float32)
    cv2.circle(frame, (50, 60), 25, (0, 0, 0), 3)
    cv2.circle(mask, (50, 60), 27, 1.0, -1)
    cv2.rectangle(mask, (120, 20), (180, 100), 0.9, -1)
    mask[5:7, 5:7] = 1.0  # a 4-pixel speck
    cfg = LayeringConfig(min_area_frac=0.002, crop_margin=0.1)
    layers, bg = layering.layers_from_mask(frame, mask, cfg)
    assert len(layers) == 2
    (_, box0, area0), (rgba1, box1, area1) = layers  # left to right: circle, then rectangle
    assert box1 == (114, 12, 187, 109)  # 61x81 tight box (120..180, 20..100) + round(10%) per side
    assert area1 == 61 * 81
    assert set(np.unique(rgba1[..., 3])) == {0, round(0.9 * 255)}  # soft alpha kept inside the instance
    assert np.abs(bg.astype(int) - (90, 160, 220)).max() <= 6  # outline painted out with the flat colour


def test_u2net_backend_end_to_end_with_random_weights(series, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from yokai_pipeline.models import u2net

    # A tiny U^2-NetP-shaped network (widths 4/8, 64x64 input) keeps the CPU test fast; same code path.
    tiny = u2net.U2NetSpec(
        encoder=((7, 3, 4, 8), (6, 8, 4, 8), (5, 8, 4, 8), (4, 8, 4, 8), (0, 8, 4, 8), (0, 8, 4, 8)),
        decoder=((0, 16, 4, 8), (4, 16, 4, 8), (5, 16, 4, 8), (6, 16, 4, 8), (7, 16, 4, 8)),
        side_channels=(8,) * 6,
        preprocess=u2net.U2NetPreprocess(input_size=64),
    )
    monkeypatch.setitem(u2net.SPECS, "u2netp", tiny)
    torch.manual_seed(0)
    weights = u2net.save_u2net_safetensors(u2net.build_u2net("u2netp").eval(), tmp_path / "tiny.safetensors")
    ws = Workspace(tmp_path / "ws")
    rows = _write_frames(series, ws, step=48, limit=3)
    cfg = LayeringConfig(backend="u2netp", weights=weights, device="cpu", batch_size=2)
    out = layering.segment_layers(rows, ws, cfg)
    backgrounds = [r for r in out if r["kind"] == "background"]
    assert [r["frame_index"] for r in backgrounds] == [r["frame_index"] for r in rows]
    for r in out:
        assert ws.abs(r["path"]).is_file()
    mask = cv2.imread(str(ws.abs(backgrounds[0]["mask_path"])), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (360, 640) and set(np.unique(mask)) <= {0, 255}
    # The segmenter contract: float masks in [0, 1] of the frame's size.
    seg = layering.get_segmenter(cfg)
    frame = layering.read_frame(ws.abs(rows[0]["path"]))
    (m,) = seg.predict([frame])
    assert m.shape == (360, 640) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
