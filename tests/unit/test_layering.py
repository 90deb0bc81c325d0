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
    crop_keys = {"crop_kind", "crops", "crop_source"}  # the 3-stage crops (yokai_pipeline/crops.py)
    for r in manifest:
        if r["kind"] == "character":
            assert set(r) == char_keys | crop_keys
            assert r["crop_kind"] == "full_body" and set(r["crops"]) == {"upper_body", "head"}
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


def test_a_frame_replaced_under_its_name_or_new_settings_are_cut_again(series, tmp_path, monkeypatch):
    """A fixed video keeps its frames' names; a finished frame is reused only for the same bytes and settings."""
    ws = Workspace(tmp_path)
    rows = _write_frames(series, ws, step=16)
    cfg = LayeringConfig(num_workers=2)  # threads: the spy sees every frame cut
    layering.segment_layers(rows, ws, cfg)
    calls = []
    real = layering._write_frame
    monkeypatch.setattr(
        layering, "_write_frame", lambda *a, **k: calls.append(a[1]["frame_index"]) or real(*a, **k)
    )
    # frame 3 of the "new video" is frame 5's picture, under frame 3's name
    a, b = rows[3], rows[5]
    ws.abs(a["path"]).write_bytes(ws.abs(b["path"]).read_bytes())
    out = layering.segment_layers(rows, ws, cfg)
    assert calls == [a["frame_index"]]
    picture = cv2.cvtColor(cv2.imread(str(ws.abs(a["path"]))), cv2.COLOR_BGR2RGB)
    cut = [r for r in out if r["frame_index"] == a["frame_index"] and r["kind"] == "character"]
    assert cut
    for r in cut:  # each layer is cut from the new picture
        x0, y0, x1, y1 = r["box"]
        rgba = cv2.cvtColor(cv2.imread(str(ws.abs(r["path"])), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
        inside = rgba[..., 3] > 0
        assert np.array_equal(rgba[..., :3][inside], picture[y0:y1, x0:x1][inside])
    calls.clear()
    layering.segment_layers(rows, ws, cfg.model_copy(update={"batch_size": 4, "num_workers": 1}))
    assert calls == []  # speed settings change nothing
    layering.segment_layers(rows, ws, cfg.model_copy(update={"crop_margin": cfg.crop_margin + 4}))
    assert sorted(calls) == sorted(r["frame_index"] for r in rows)


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


@pytest.fixture
def tiny_u2netp(tmp_path, monkeypatch) -> Path:
    """Weights of a tiny U^2-NetP-shaped network (64x64 input), registered as ``u2netp``."""
    torch = pytest.importorskip("torch")
    from yokai_pipeline.models import u2net

    tiny = u2net.U2NetSpec(
        encoder=((7, 3, 4, 8), (6, 8, 4, 8), (5, 8, 4, 8), (4, 8, 4, 8), (0, 8, 4, 8), (0, 8, 4, 8)),
        decoder=((0, 16, 4, 8), (4, 16, 4, 8), (5, 16, 4, 8), (6, 16, 4, 8), (7, 16, 4, 8)),
        side_channels=(8,) * 6,
        preprocess=u2net.U2NetPreprocess(input_size=64),
    )
    monkeypatch.setitem(u2net.SPECS, "u2netp", tiny)
    torch.manual_seed(0)
    return u2net.save_u2net_safetensors(u2net.build_u2net("u2netp").eval(), tmp_path / "tiny.safetensors")


def test_u2net_backend_end_to_end_with_random_weights(series, tmp_path, tiny_u2netp):
    # A tiny U^2-NetP-shaped network (widths 4/8, 64x64 input) keeps the CPU test fast; same code path.
    weights = tiny_u2netp
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


# ---------------------------------------------------------------------------------------------
# Worker processes vs threads; the batched U2Net stream
# ---------------------------------------------------------------------------------------------


def _tree(ws: Workspace) -> dict[str, bytes]:
    return {
        p.relative_to(ws.layered_frames).as_posix(): p.read_bytes()
        for p in sorted(ws.layered_frames.rglob("*"))
        if p.is_file()
    }


def _spy_pool(monkeypatch) -> list[int]:
    started = []
    real = layering._process_pool
    monkeypatch.setattr(layering, "_process_pool", lambda n: started.append(n) or real(n))
    return started


@pytest.mark.parametrize("backend", ["offline", "u2netp"])
def test_worker_processes_write_the_same_files_as_threads(series, tmp_path, monkeypatch, backend, request):
    extra = {}
    if backend == "u2netp":
        extra = {"weights": request.getfixturevalue("tiny_u2netp"), "device": "cpu", "batch_size": 3}
    started = _spy_pool(monkeypatch)
    out = {}
    for mode in ("threads", "processes"):
        ws = Workspace(tmp_path / mode)
        rows = _write_frames(series, ws, step=24, limit=7)
        bad = ws.abs(rows[2]["path"])
        bad.write_bytes(bad.read_bytes()[:300])  # a truncated frame: recorded the same way
        cfg = LayeringConfig(backend=backend, num_workers=3, worker_processes=mode == "processes", **extra)
        out[mode] = (layering.segment_layers(rows, ws, cfg), _tree(ws))
    assert started == [3], "the process path was not taken"
    (rows_t, files_t), (rows_p, files_p) = out["threads"], out["processes"]
    assert rows_p == rows_t
    assert files_p.keys() == files_t.keys()
    assert [k for k in files_t if files_p[k] != files_t[k]] == []
    assert "failures/ep01/ep01_f000048.json" in files_t
    assert sum(k.startswith("character/") for k in files_t) >= 6


def test_worker_processes_skip_finished_frames(series, tmp_path, monkeypatch):
    started = _spy_pool(monkeypatch)
    ws = Workspace(tmp_path)
    rows = _write_frames(series, ws, step=24, limit=6)
    cfg = LayeringConfig(num_workers=3)
    first = layering.segment_layers(rows, ws, cfg)

    def stamps() -> dict[str, tuple[int, int]]:
        # An atomic rewrite renames a new file into place: a new inode.
        return {k: ((st := (ws.layered_frames / k).stat()).st_ino, st.st_mtime_ns) for k in _tree(ws)}

    before = stamps()
    assert layering.segment_layers(rows, ws, cfg) == first
    assert stamps() == before
    redo = [f"masks/ep01/ep01_f{r['frame_index']:06d}.png" for r in rows[1:5]]
    for k in redo:
        (ws.layered_frames / k).unlink()
    assert layering.segment_layers(rows, ws, cfg) == first
    after = stamps()
    changed = {k for k in after if after[k] != before.get(k)}
    assert set(redo) <= changed
    assert all(f"_f{r['frame_index']:06d}" not in k for k in changed for r in (rows[0], rows[5]))
    assert started and started[0] == 3


def test_worker_processes_name_the_file_when_every_frame_fails(series, tmp_path, monkeypatch):
    started = _spy_pool(monkeypatch)
    ws = Workspace(tmp_path)
    rows = _write_frames(series, ws, step=48, limit=4)
    for r in rows:
        ws.abs(r["path"]).write_bytes(b"")
    with pytest.raises(BadInputError, match=r"ep01_f000000\.png: not a decodable image .*all 4 frames"):
        layering.segment_layers(rows, ws, LayeringConfig(num_workers=3))
    assert started == [3]
    rec = read_jsonl_one(ws.abs("layered_frames/failures/ep01/ep01_f000096.json"))
    assert rec == {
        "frame_path": rows[2]["path"],
        "error": "not a decodable image (empty, truncated or corrupt)",
    }


def test_layering_falls_back_to_threads_when_processes_cannot_start(series, tmp_path, monkeypatch, caplog):
    def no_processes(n):
        raise OSError("no POSIX semaphores here")

    monkeypatch.setattr(layering, "_process_pool", no_processes)
    ws = Workspace(tmp_path)
    rows = _write_frames(series, ws, step=24, limit=5)
    out = layering.segment_layers(rows, ws, LayeringConfig(num_workers=3))
    assert {r["frame_index"] for r in out} == {r["frame_index"] for r in rows}
    assert "cannot start worker processes" in caplog.text


def test_u2net_batches_stream_and_binarize(tiny_u2netp):
    seg = layering.U2NetSegmenter(tiny_u2netp, "u2netp", device="cpu", batch_size=3)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), np.uint8) for _ in range(5)]
    images += [rng.integers(0, 256, (32, 48, 3), np.uint8) for _ in range(2)]
    u8 = seg.predict_u8(images)
    assert [m.shape for m in u8] == [(40, 56)] * 5 + [(32, 48)] * 2 and u8[0].dtype == np.uint8
    # Consecutive frames of one size share a batch; a size change starts a new one.
    batches = list(seg.predict_batches(enumerate(images)))
    assert [[k for k, _ in pairs] for pairs, _ in batches] == [[0, 1, 2], [3, 4], [5, 6]]
    for pairs, masks in batches:
        for (k, im), m in zip(pairs, masks, strict=True):
            assert im is images[k] and np.array_equal(m, u8[k])
    streamed = list(seg.predict_stream(enumerate(images)))
    assert [k for k, _, _ in streamed] == list(range(7))
    assert all(np.array_equal(m, u8[k]) for k, _, m in streamed)
    binary = [m for _, masks in seg.predict_batches(enumerate(images), binarize_above=127) for m in masks]
    assert all(np.array_equal(b, (m > 127).astype(np.uint8) * 255) for b, m in zip(binary, u8, strict=True))


def test_u2net_compile_padding_keeps_the_masks(tiny_u2netp):
    seg = layering.U2NetSegmenter(tiny_u2netp, "u2netp", device="cpu", batch_size=4)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 56, 3), np.uint8) for _ in range(3)]
    plain = seg.predict_u8(images)
    seg.compile = True  # pads the short batch to batch_size as under torch.compile
    assert seg._pad(seg._stack(images)).shape[0] == 4
    padded = seg.predict_u8(images)
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(plain, padded, strict=True))


def test_a_producer_error_reaches_the_consumer(tiny_u2netp):
    seg = layering.U2NetSegmenter(tiny_u2netp, "u2netp", device="cpu", batch_size=2)

    def items():
        yield 0, np.zeros((40, 56, 3), np.uint8)
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        list(seg.predict_batches(items()))


@pytest.mark.gpu
def test_pipelined_cuda_masks_equal_one_batch_at_a_time(tiny_u2netp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seg = layering.U2NetSegmenter(tiny_u2netp, "u2netp", device="cuda", batch_size=4)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (90, 160, 3), np.uint8) for _ in range(11)]
    images += [rng.integers(0, 256, (72, 128, 3), np.uint8) for _ in range(3)]
    # The same batches, each waited for before the next is queued.
    parts = [images[0:4], images[4:8], images[8:11], images[11:]]
    expected = [m.astype(int) for part in parts for m in seg._run(seg._stack(part))]
    got = [m.copy() for _, masks in seg.predict_batches(enumerate(images)) for m in masks]
    assert len(got) == len(expected) == 14
    # Same kernels on the same shapes: equal up to cuDNN's choice of algorithm.
    assert max(int(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True)) <= 1
    binary = [
        m.copy() for _, masks in seg.predict_batches(enumerate(images), binarize_above=127) for m in masks
    ]
    for b, m in zip(binary, expected, strict=True):
        assert set(np.unique(b)) <= {0, 255}
        differ = b != np.where(m > 127, 255, 0)
        assert not differ.any() or np.abs(m[differ] - 127.5).max() <= 1.5
