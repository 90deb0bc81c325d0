"""Frame extraction against the sample series' ground truth, plus bad and unusual inputs."""

from __future__ import annotations

import wave
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from yokai_pipeline import frames, fsio, synthetic
from yokai_pipeline.config import FramesConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.workspace import Workspace

ROW_KEYS = {
    "stack_path",
    "episode",
    "episode_id",
    "frame_index",
    "timestamp",
    "shot_id",
    "phash",
    "sharpness",
    "width",
    "height",
    "path",
}


def _extract_series(series: synthetic.SeriesInfo, ws: Workspace, cfg: FramesConfig) -> dict[str, dict]:
    """Extract every episode in order, earlier episodes' hashes as references (what the flow does)."""
    refs: list[str] = []
    out = {}
    for video in series.episodes:
        stats = frames.extract_frames(video, ws, cfg, reference_hashes=refs)
        ep = frames.episode_id_for(video)
        out[ep] = stats
        refs += frames.read_frame_hashes(ws.frames_manifest(ep))
    return out


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> synthetic.SeriesInfo:
    return synthetic.generate_series(tmp_path_factory.mktemp("series"), seed=2, episodes=2, seconds=12.0)


@pytest.fixture(scope="module")
def extracted(series, tmp_path_factory) -> tuple[Workspace, dict[str, dict]]:
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    return ws, _extract_series(series, ws, FramesConfig())


def _write_video(path: Path, frames_bgr: list[np.ndarray], fps: float = 24.0, fourcc: str = "mp4v") -> Path:
    h, w = frames_bgr[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened()
    for f in frames_bgr:
        writer.write(f)
    writer.release()
    return path


def _scene(colour, n: int, w: int = 160, h: int = 120, seed: int = 0) -> list[np.ndarray]:
    """A flat-colour scene with a moving square, so frames of a scene differ a little."""
    out = []
    for i in range(n):
        f = np.full((h, w, 3), colour, np.uint8)
        x = 10 + (i * 3) % (w - 40)
        cv2.rectangle(f, (x, 40 + seed), (x + 24, 64 + seed), (250, 250, 250), -1)
        out.append(f)
    return out


def test_shots_match_ground_truth_cuts(series, extracted):
    ws, stats = extracted
    for gt_path in series.ground_truth:
        gt = synthetic.load_ground_truth(gt_path)
        st = stats[Path(gt["episode"]).stem]
        assert st["decoded"] == gt["n_frames"]
        assert st["shots"] == len(gt["shots"])
        assert st["shot_starts"] == [s["start"] for s in gt["shots"]]
        assert st["fps"] == pytest.approx(24.0)


def test_manifest_rows_and_frames_per_shot(series, extracted):
    ws, stats = extracted
    cfg = FramesConfig()
    for gt_path in series.ground_truth:
        gt = synthetic.load_ground_truth(gt_path)
        ep = Path(gt["episode"]).stem
        rows = fsio.read_jsonl(ws.frames_manifest(ep))
        st = stats[ep]
        assert len(rows) == st["kept"] == st["candidates"] - st["dropped_within"] - st["dropped_cross"]
        assert st["candidates"] == cfg.frames_per_shot * st["shots"]
        assert [r["frame_index"] for r in rows] == sorted(r["frame_index"] for r in rows)
        per_shot: dict[int, list[int]] = {}
        for r in rows:
            assert set(r) == ROW_KEYS
            with np.load(ws.abs(r["stack_path"])) as z:  # the shot's stack holds the kept frame
                assert r["frame_index"] in z["index"].tolist() and z["frames"].shape[1:] == (360, 640, 3)
            assert r["episode"] == gt["episode"] and r["episode_id"] == ep
            assert r["timestamp"] == pytest.approx(r["frame_index"] / 24.0, abs=1e-3)
            assert len(r["phash"]) == 16 and int(r["phash"], 16) >= 0
            shot = gt["shots"][r["shot_id"]]
            assert shot["start"] <= r["frame_index"] < shot["end"]
            png = ws.abs(r["path"])
            assert r["path"] == f"episodes/{ep}/frames/{ep}_f{r['frame_index']:06d}.png"
            with Image.open(png) as im:
                assert im.size == (r["width"], r["height"]) == (640, 360) and im.mode == "RGB"
            per_shot.setdefault(r["shot_id"], []).append(r["frame_index"])
        # a few frames per shot, spread out (not neighbours), most shots keep more than one
        assert all(1 <= len(v) <= cfg.frames_per_shot for v in per_shot.values())
        for v in per_shot.values():
            assert all(b - a >= 4 for a, b in zip(v, v[1:], strict=False))
        assert sum(len(v) > 1 for v in per_shot.values()) >= 0.6 * len(per_shot)
        # no leftovers: exactly the manifest's frames are on disk
        assert sorted(p.name for p in (ws.episode_dir(ep) / "frames").iterdir()) == sorted(
            Path(r["path"]).name for r in rows
        )


def test_kept_frame_matches_the_source_frame(series, extracted):
    ws, _ = extracted
    row = fsio.read_jsonl(ws.frames_manifest("ep01"))[5]
    cap = cv2.VideoCapture(str(series.episodes[0]))
    cap.set(cv2.CAP_PROP_POS_FRAMES, row["frame_index"])
    ok, src = cap.read()
    cap.release()
    assert ok
    saved = np.asarray(Image.open(ws.abs(row["path"])))
    assert np.abs(saved.astype(int) - cv2.cvtColor(src, cv2.COLOR_BGR2RGB)).mean() < 2.0


def test_repeated_opening_is_kept_once(series, extracted):
    ws, stats = extracted
    gt1 = synthetic.load_ground_truth(series.ground_truth[0])
    lo, hi = gt1["opening"]
    ep1 = fsio.read_jsonl(ws.frames_manifest("ep01"))
    ep2 = fsio.read_jsonl(ws.frames_manifest("ep02"))
    kept_opening = [r for r in ep1 if lo <= r["frame_index"] < hi]
    assert kept_opening, "the first episode keeps its opening"
    assert not [r for r in ep2 if lo <= r["frame_index"] < hi], "later episodes drop it"
    assert stats["ep02"]["dropped_cross"] >= len(kept_opening)
    assert stats["ep01"]["dropped_cross"] == 0
    # without references the second episode keeps its opening
    alone = frames.extract_frames(series.episodes[1], Workspace(ws.root / "alone"), FramesConfig())
    assert alone["dropped_cross"] == 0 and alone["kept"] > stats["ep02"]["kept"]


def test_extraction_is_deterministic(series, extracted, tmp_path):
    ws, _ = extracted
    ws2 = Workspace(tmp_path)
    frames.extract_frames(series.episodes[0], ws2, FramesConfig())
    a = fsio.read_jsonl(ws.frames_manifest("ep01"))
    b = fsio.read_jsonl(ws2.frames_manifest("ep01"))
    assert a == b
    assert ws.abs(a[0]["path"]).read_bytes() == ws2.abs(b[0]["path"]).read_bytes()


def test_rerun_skips_and_config_change_redoes(series, tmp_path):
    ws = Workspace(tmp_path)
    video = series.episodes[0]
    first = frames.extract_frames(video, ws, FramesConfig())
    manifest = ws.frames_manifest("ep01")
    mtime = manifest.stat().st_mtime_ns
    calls = []
    second = frames.extract_frames(video, ws, FramesConfig(), progress=lambda d, t: calls.append(d))
    assert second["skipped"] and not first["skipped"]
    assert second["kept"] == first["kept"] and calls == []
    assert manifest.stat().st_mtime_ns == mtime
    third = frames.extract_frames(video, ws, FramesConfig(frames_per_shot=1))
    assert not third["skipped"] and third["kept"] < first["kept"]
    on_disk = sorted(p.name for p in (ws.episode_dir("ep01") / "frames").iterdir())
    assert on_disk == sorted(Path(r["path"]).name for r in fsio.read_jsonl(manifest))
    # different reference hashes are a different result too
    refs = frames.read_frame_hashes(manifest)
    fourth = frames.extract_frames(video, ws, FramesConfig(frames_per_shot=1), reference_hashes=refs)
    assert not fourth["skipped"] and fourth["kept"] == 0 and fourth["dropped_cross"] == third["kept"]


def test_progress_reports_up_to_the_total(series, tmp_path):
    calls: list[tuple[int, int]] = []
    frames.extract_frames(
        series.episodes[0], Workspace(tmp_path), FramesConfig(), progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (288, 288)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) > 3


def test_short_flashes_merge_into_the_previous_shot(tmp_path):
    video = _write_video(
        tmp_path / "flash.mp4",
        _scene((200, 120, 60), 30)
        + _scene((60, 200, 120), 2, seed=4)
        + _scene((200, 120, 60), 30, seed=8)
        + _scene((80, 80, 220), 30),
    )
    merged = frames.extract_frames(video, Workspace(tmp_path / "a"), FramesConfig(min_shot_frames=6))
    assert merged["shot_starts"] == [0, 62]
    split = frames.extract_frames(video, Workspace(tmp_path / "b"), FramesConfig(min_shot_frames=1))
    assert split["shot_starts"] == [0, 30, 32, 62]


def test_long_static_shot_keeps_a_bounded_spread_buffer():
    shot = frames._Shot(start=0)
    tiny = np.zeros((2, 2, 3), np.uint8)
    rng = np.random.default_rng(0)
    for i in range(20_000):
        shot.offer(frames._Candidate(i, i / 24, float(rng.random()), tiny), max_bins=9)
        assert len(shot.bins) <= 9
    shot.end = 20_000
    picks = [c.index for c in shot.pick(3)]
    assert len(picks) == 3
    assert [p * 3 // 20_000 for p in picks] == [0, 1, 2]


def test_one_frame_and_vertical_videos(tmp_path):
    one = _write_video(tmp_path / "one.mp4", _scene((90, 160, 220), 1))
    st = frames.extract_frames(one, Workspace(tmp_path / "w1"), FramesConfig())
    assert (st["decoded"], st["shots"], st["kept"]) == (1, 1, 1)
    vertical = _write_video(
        tmp_path / "Vertical Clip (1).mp4",
        _scene((90, 160, 220), 20, w=120, h=240) + _scene((220, 90, 90), 20, w=120, h=240),
    )
    ws = Workspace(tmp_path / "w2")
    st = frames.extract_frames(vertical, ws, FramesConfig())
    ep = frames.episode_id_for(vertical)
    assert ep == "Vertical_Clip_1"
    assert st["shots"] == 2
    rows = fsio.read_jsonl(ws.frames_manifest(ep))
    assert rows and all((r["width"], r["height"]) == (120, 240) for r in rows)


def test_max_side_downscales_saved_frames(series, tmp_path):
    ws = Workspace(tmp_path)
    frames.extract_frames(series.episodes[0], ws, FramesConfig(max_side=320))
    row = fsio.read_jsonl(ws.frames_manifest("ep01"))[0]
    assert (row["width"], row["height"]) == (320, 180)
    assert Image.open(ws.abs(row["path"])).size == (320, 180)


def _audio_only(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * 8000)
    return path


@pytest.mark.parametrize(
    ("name", "make", "problem"),
    [
        ("empty.mp4", lambda p: p.write_bytes(b""), "empty"),
        ("notes.mp4", lambda p: p.write_text("this is a text file, not a video\n"), "not a readable video"),
        ("sound.mp4", _audio_only, "not a readable video"),
        ("missing.mp4", lambda p: None, "does not exist"),
    ],
)
def test_bad_files_raise_an_error_naming_them(tmp_path, name, make, problem):
    path = tmp_path / name
    make(path)
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(BadInputError) as exc:
        frames.extract_frames(path, ws, FramesConfig())
    assert str(path) in str(exc.value) and problem in str(exc.value)
    assert not ws.frames_manifest(frames.episode_id_for(path)).exists()


def test_truncated_video_is_reported(tmp_path):
    rng = np.random.default_rng(0)
    full = _write_video(
        tmp_path / "full.avi",
        [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8) for _ in range(48)],
        fourcc="MJPG",
    )
    cut = tmp_path / "cut.avi"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError) as exc:
        frames.extract_frames(cut, Workspace(tmp_path / "ws"), FramesConfig())
    assert str(cut) in str(exc.value) and "truncated" in str(exc.value)
    # an mp4 cut short loses its index: it cannot be opened at all
    mp4 = synthetic.generate_series(tmp_path / "s", seed=1, episodes=1, seconds=2.0).episodes[0]
    short = tmp_path / "short.mp4"
    short.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    with pytest.raises(BadInputError, match="short.mp4"):
        frames.extract_frames(short, Workspace(tmp_path / "ws"), FramesConfig())


def test_read_frame_hashes(tmp_path):
    m = tmp_path / "frames.jsonl"
    fsio.write_jsonl(
        m, [{"phash": "00ff00ff00ff00ff", "frame_index": 1}, {"phash": "ffffffffffffffff", "frame_index": 9}]
    )
    assert frames.read_frame_hashes(m) == ["00ff00ff00ff00ff", "ffffffffffffffff"]
    assert frames.hamming("00ff00ff00ff00ff", "00ff00ff00ff00fe") == 1
    rng = np.random.default_rng(0)
    hashes = [f"{int(v):016x}" for v in rng.integers(0, 2**63, 5000, dtype=np.int64) * 2 + 1]
    index = frames.HashIndex(hashes)
    assert len(index) == 5000
    probe = f"{int(hashes[1234], 16) ^ 0b1011:016x}"  # 3 bits away from one of them
    assert index.near(probe, 3) and not index.near(probe, 2)
    assert index.near("ffffffffffffffff", 64) and not frames.HashIndex().near("ffffffffffffffff", 64)


@pytest.mark.slow
def test_default_series_end_to_end(sample_series, tmp_path):
    """The demo's series: every cut found, opening kept once, and every tier of the guide populated."""
    info = synthetic.generate_series(sample_series, seed=0)  # no-op: the session fixture made it
    ws = Workspace(tmp_path)
    stats = _extract_series(info, ws, FramesConfig())
    kept: list[tuple[str, int]] = []
    for k, gt_path in enumerate(info.ground_truth):
        gt = synthetic.load_ground_truth(gt_path)
        ep = Path(gt["episode"]).stem
        assert stats[ep]["shot_starts"] == [s["start"] for s in gt["shots"]]
        rows = fsio.read_jsonl(ws.frames_manifest(ep))
        in_opening = [r for r in rows if r["frame_index"] < gt["opening"][1]]
        assert bool(in_opening) == (k == 0)
        kept += [(ep, r["frame_index"]) for r in rows]
    counts = synthetic.character_counts(info.ground_truth_dir, kept)

    def tier(n: int) -> str:
        return "S" if n >= 100 else "A" if n >= 50 else "B" if n >= 20 else "C" if n >= 15 else "D"

    by_tier: dict[str, set[str]] = {}
    for c in synthetic.CHARACTERS:
        by_tier.setdefault(tier(counts[c.id]), set()).add(c.type)
    assert by_tier == {t: {"human", "yokai"} for t in "SABCD"}, counts
    rare = [counts[c.id] for c in synthetic.CHARACTERS if tier(counts[c.id]) == "D"]
    assert all(5 <= n <= 15 for n in rare)


def _encode(path: Path, frames_bgr: list[np.ndarray], codec: str, pix_fmt: str, fps: int = 24) -> Path:
    import av

    h, w = frames_bgr[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for img in frames_bgr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def test_analysis_on_yuv_planes_matches_a_full_colour_conversion(series):
    """The fast path (small images straight from the decoder's planes) makes the cut decisions
    a full BGR conversion would, and ranks sharpness the same way."""
    import av

    fast, full = [], []
    with av.open(str(series.episodes[0])) as c:
        for f in c.decode(video=0):
            assert f.format.name == "yuv420p"
            fast.append(frames.frame_features(f, 160)[:2])
            bgr = f.to_ndarray(format="bgr24")
            full.append((frames.colour_histogram(frames.analysis_image(bgr, 160)), frames.sharpness(bgr)))
            if len(fast) == 200:
                break
    cfg = FramesConfig()

    def cuts(feats: list) -> list[int]:
        d = [frames.histogram_distance(a[0], b[0]) for a, b in zip(feats, feats[1:], strict=False)]
        return [i + 1 for i, v in enumerate(d) if v >= cfg.shot_threshold]

    assert cuts(fast) == cuts(full) and len(cuts(full)) >= 3
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = np.corrcoef(ranks([a[1] for a in fast]), ranks([b[1] for b in full]))[0, 1]
    assert rho > 0.8, rho


@pytest.mark.parametrize(
    "codec,pix_fmt,size",
    [("libx264", "yuv420p", (202, 114)), ("libx264", "yuv444p", (160, 120)), ("ffv1", "bgr0", (160, 120))],
)
def test_any_pixel_format_and_odd_row_padding_find_the_cuts(tmp_path, codec, pix_fmt, size):
    """4:4:4 and RGB streams take the full-conversion path; a width whose rows the decoder pads
    takes the plane path with strided views. All three find the same two cuts."""
    w, h = size
    scenes = [
        _scene(c, 20, w, h, seed=k) for k, c in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)])
    ]
    video = _encode(tmp_path / f"v_{pix_fmt}.mkv", [f for s in scenes for f in s], codec, pix_fmt)
    ws = Workspace(tmp_path / "ws")
    stats = frames.extract_frames(video, ws, FramesConfig(dedup_hamming=0))
    assert stats["decoded"] == 60
    assert stats["shot_starts"] == [0, 20, 40]
    rows = fsio.read_jsonl(ws.frames_manifest(frames.episode_id_for(video)))
    img = np.asarray(Image.open(ws.abs(rows[0]["path"])))
    assert img.shape == (h, w, 3)
    # the kept frame's colours are the scene's (RGB on disk; scenes were written as BGR)
    assert np.abs(img[5, 5].astype(int) - np.array([40, 40, 200])).max() < 12
