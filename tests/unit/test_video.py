"""Decoder backends: keyframe segments, torch frame analysis vs OpenCV, NVDEC fallback and errors (CPU).

The NVDEC decoder itself needs a GPU: tests/gpu/test_nvdec.py compares it with PyAV there.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from yokai_pipeline import frames, fsio, synthetic
from yokai_pipeline.config import FramesConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.video import features, nvdec
from yokai_pipeline.video.segments import Segment, plan_segments
from yokai_pipeline.workspace import Workspace

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    series = synthetic.generate_series(tmp_path_factory.mktemp("series"), seed=5, episodes=1, seconds=12.0)
    return series.episodes[0]


def _rows(ws: Workspace, video) -> list[dict]:
    return fsio.read_jsonl(ws.frames_manifest(frames.episode_id_for(video)))


def _planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(frames._plane(p).copy() for p in frame.planes)  # type: ignore[return-value]


def _nv12(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    h, w = y.shape
    return np.concatenate([y, np.stack([u, v], -1).reshape(h // 2, w)], 0)


def _decoded(video, n: int) -> list:
    import av

    with av.open(str(video)) as c:
        out = []
        for f in c.decode(video=0):
            out.append(f)
            if len(out) == n:
                return out
    return out


# --------------------------------------------------------------------------------------
# Segments


def test_segments_cover_every_frame_once_and_start_at_keyframes():
    keys = list(range(0, 1000, 12))
    segs = plan_segments(1000, keys, 7)
    assert len(segs) == 7
    assert segs[0].start == 0 and segs[-1].end == 1000
    assert all(a.end == b.start for a, b in zip(segs, segs[1:], strict=False))  # contiguous, no overlap
    assert all(s.start in keys for s in segs)
    # near-equal: within one keyframe interval of 1000 / 7
    assert max(len(s) for s in segs) - min(len(s) for s in segs) <= 2 * 12


def test_segments_sparse_keyframes_and_short_streams():
    # one keyframe in the middle: two segments however many are asked for
    assert plan_segments(600, [0, 300], 7) == [Segment(0, 300), Segment(300, 600)]
    # no keyframe but the first: one segment
    assert plan_segments(600, [0], 4) == [Segment(0, 600)]
    # too short to be worth a second decoder (min_frames 48)
    assert plan_segments(60, list(range(0, 60, 12)), 4) == [Segment(0, 60)]
    assert plan_segments(0, [0], 4) == []


def test_segmented_decode_equals_one_pass(episode, tmp_path):
    """Segments decoded one after the other (each its own container, seeking) = one pass over the file."""
    one = frames.extract_frames(episode, Workspace(tmp_path / "one"), FramesConfig(decoder="pyav"))
    ws = Workspace(tmp_path / "seg")
    seg = frames.extract_frames(episode, ws, FramesConfig(decoder="pyav", decode_segments=4))
    assert one["decode_segments"] == 1 and seg["decode_segments"] == 4
    for key in ("decoded", "shots", "shot_starts", "kept", "candidates", "dropped_within"):
        assert seg[key] == one[key], key
    a, b = _rows(Workspace(tmp_path / "one"), episode), _rows(ws, episode)
    strip = [{k: v for k, v in r.items() if k not in ("path", "stack_path")} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in ("path", "stack_path")} for r in b]
    for ra, rb in zip(a, b, strict=True):
        pa = Workspace(tmp_path / "one").abs(ra["path"]).read_bytes()
        assert pa == ws.abs(rb["path"]).read_bytes()


# --------------------------------------------------------------------------------------
# Torch analysis (the GPU path's definitions, run on CPU torch here)


def test_torch_histogram_and_sharpness_are_opencvs_on_the_same_planes(episode):
    """Given the same small planes, the torch BGR, histogram and sharpness are OpenCV's, bit for bit."""
    import cv2

    for f in _decoded(episode, 30)[::6]:
        y, u, v = _planes(f)
        small, grey = frames.yuv420_analysis_images(y, u, v, 160, 320)
        hh, hw = small.shape[:2]
        sy = cv2.resize(grey, (hw, hh), interpolation=cv2.INTER_LINEAR)
        su = cv2.resize(u, (hw // 2, hh // 2), interpolation=cv2.INTER_LINEAR)
        sv = cv2.resize(v, (hw // 2, hh // 2), interpolation=cv2.INTER_LINEAR)
        bgr = features.i420_to_bgr(*(torch.from_numpy(p)[None] for p in (sy, su, sv)))
        assert np.array_equal(bgr[0].permute(1, 2, 0).numpy(), small)
        assert np.array_equal(features.colour_histograms(bgr)[0].numpy(), frames.colour_histogram(small))
        lap = features.laplacian_variance(torch.from_numpy(grey)[None])[0].item()
        assert lap == pytest.approx(frames.sharpness(grey), rel=1e-9)


def test_torch_nv12_features_within_documented_bound(episode):
    """The whole torch path (float bilinear resizes) vs OpenCV's fixed-point one: within one level."""
    decoded = _decoded(episode, 48)
    y0, _, _ = _planes(decoded[0])
    h, w = y0.shape
    nv = torch.from_numpy(np.stack([_nv12(*_planes(f)) for f in decoded]))
    hist, sharp, grey = features.nv12_features(nv, w, h, 160, 320)
    for i, f in enumerate(decoded):
        small, g = frames.yuv420_analysis_images(*_planes(f), 160, 320)
        diff = np.abs(grey[i].numpy().astype(int) - g)
        assert diff.max() <= 1 and diff.mean() < 0.25
        assert frames.histogram_distance(hist[i].numpy(), frames.colour_histogram(small)) < 0.03
        assert float(sharp[i]) == pytest.approx(frames.sharpness(g), rel=0.03)


def _torch_frame_features(frame, hist_width):
    """frames.frame_features computed the GPU path's way (torch, NV12) from a PyAV frame's planes."""
    y, u, v = _planes(frame)
    hist, sharp, grey = features.nv12_features(
        torch.from_numpy(_nv12(y, u, v))[None], y.shape[1], y.shape[0], hist_width, frames._SHARPNESS_WIDTH
    )
    return hist[0].numpy(), float(sharp[0]), grey[0].numpy()


def test_torch_analysis_keeps_the_same_frames(episode, tmp_path, monkeypatch):
    """Shots and kept frames from the torch analysis = from OpenCV's, on the synthetic episode."""
    cpu = frames.extract_frames(episode, Workspace(tmp_path / "cpu"), FramesConfig(decoder="pyav"))
    monkeypatch.setattr(frames, "frame_features", _torch_frame_features)
    gpu_way = frames.extract_frames(episode, Workspace(tmp_path / "torch"), FramesConfig(decoder="pyav"))
    assert gpu_way["shot_starts"] == cpu["shot_starts"]
    a = [r["frame_index"] for r in _rows(Workspace(tmp_path / "cpu"), episode)]
    b = [r["frame_index"] for r in _rows(Workspace(tmp_path / "torch"), episode)]
    assert a == b and len(a) >= 10


def test_nv12_to_rgb_matches_pyav_rgb24(episode):
    for f in _decoded(episode, 12)[::4]:
        y, u, v = _planes(f)
        rgb = features.nv12_to_rgb(torch.from_numpy(_nv12(y, u, v)), y.shape[1], y.shape[0]).numpy()
        ref = f.to_ndarray(format="rgb24")
        diff = np.abs(rgb.astype(int) - ref)
        assert diff.mean() < 1.0 and diff.max() <= 3


# --------------------------------------------------------------------------------------
# NVDEC selection, fallback and bad input (the decoder faked: no GPU here)


def test_auto_is_pyav_without_cuda_and_nvdec_asked_for_fails_clearly(monkeypatch):
    monkeypatch.setattr(nvdec, "nvdec_available", lambda: False)
    assert frames.resolve_decoder("auto") == "pyav"
    with pytest.raises(RuntimeError, match="decoder=auto or pyav"):
        frames.resolve_decoder("nvdec")
    monkeypatch.setattr(nvdec, "nvdec_available", lambda: True)
    assert frames.resolve_decoder("auto") == "nvdec"
    assert frames.resolve_decoder("pyav") == "pyav"


def test_stream_nvdec_cannot_decode_falls_back_to_pyav_with_a_log_line(
    episode, tmp_path, monkeypatch, caplog
):
    class Refuses:
        def __init__(self, *a, **k):
            raise nvdec.NvdecUnsupported("Codec not supported on this GPU")

    monkeypatch.setattr(nvdec, "nvdec_available", lambda: True)
    monkeypatch.setattr(nvdec, "NvdecSource", Refuses)
    ref = frames.extract_frames(episode, Workspace(tmp_path / "ref"), FramesConfig(decoder="pyav"))
    with caplog.at_level(logging.WARNING, logger="yokai_pipeline.frames"):
        st = frames.extract_frames(episode, Workspace(tmp_path / "fb"), FramesConfig(decoder="auto"))
    assert st["decoder"] == "pyav" and "Codec not supported" in st["decoder_note"]
    assert episode.name in caplog.text and "PyAV" in caplog.text
    assert st["kept"] == ref["kept"] and st["shot_starts"] == ref["shot_starts"]


def test_nvdec_stopping_early_is_a_clear_bad_input_and_keeps_earlier_outputs(episode, tmp_path, monkeypatch):
    """A truncated stream on the GPU path: BadInputError naming the file; a finished episode stays."""
    ws = Workspace(tmp_path)
    done = frames.extract_frames(episode, ws, FramesConfig(decoder="pyav"))
    before = ws.frames_manifest(frames.episode_id_for(episode)).read_bytes()

    class Stops:
        total, fps, segments = 300, 24.0, [Segment(0, 300)]

        def __init__(self, *a, **k):
            pass

        def frames_from(self, start=0):
            for item in frames.analysed_frames(*frames._open_video(episode), 160):
                if item.index == 40:
                    raise nvdec.NvdecDecodeError("decoding stopped at frame 40 of 300")
                yield item

    monkeypatch.setattr(nvdec, "nvdec_available", lambda: True)
    monkeypatch.setattr(nvdec, "NvdecSource", Stops)
    other = tmp_path / "other" / "cut.mp4"
    other.parent.mkdir()
    other.write_bytes(episode.read_bytes())
    with pytest.raises(BadInputError, match=r"cut\.mp4.*truncated or corrupt: decoding failed after 40"):
        frames.extract_frames(other, ws, FramesConfig(decoder="nvdec"))
    assert ws.frames_manifest(frames.episode_id_for(episode)).read_bytes() == before
    assert done["kept"] > 0


def test_gpu_out_of_memory_halves_the_batch_not_a_crash(monkeypatch, caplog):
    real = features.nv12_features
    calls: list[int] = []

    def small_gpu(nv12, *a):
        calls.append(nv12.shape[0])
        if nv12.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(nv12, *a)

    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 255, (8, 96, 64), dtype=np.uint8))
    want = real(batch, 64, 64, 32, 64)
    monkeypatch.setattr(features, "nv12_features", small_gpu)
    with caplog.at_level(logging.WARNING):
        got = nvdec._analyse(batch, 64, 64, 32, 64)
    assert "out of memory" in caplog.text and calls[:3] == [8, 4, 2]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# --------------------------------------------------------------------------------------
# Segments scanned at once = one pass, on made-up analysis streams with flashes and short shots


class _Dummy:
    width, height = 64, 36


def _stream(seed: int, n: int) -> list[frames.DecodedFrame]:
    """Frames whose histograms follow a scene sequence with long shots, flashes and returns."""
    rng = np.random.default_rng(seed)
    scenes, scene, nxt = [], 0, 1
    while len(scenes) < n:
        kind = rng.random()
        if kind < 0.25:  # a flash of 1-3 frames, then back to the same scene or on to a new one
            scenes += [nxt] * int(rng.integers(1, 4))
            nxt += 1
            if rng.random() < 0.5:
                scene, nxt = nxt, nxt + 1
        else:
            scene, nxt = nxt, nxt + 1
        scenes += [scene] * int(rng.integers(1, 40))
    out = []
    for i, s in enumerate(scenes[:n]):
        hist = np.zeros(160, np.float32)
        hist[s % 160] = 1.0
        thumb = rng.integers(0, 255, (18, 32), dtype=np.uint8)
        out.append(frames.DecodedFrame(i, i / 24, _Dummy(), hist, float(rng.random()), thumb))
    return out


def _summary(shots) -> list[tuple]:
    return [(s.start, [(c.index, h) for c, h in s.picks], [c.index for c in s.stack]) for s in shots]


@pytest.mark.parametrize("seed", range(8))
def test_segmented_scan_equals_one_pass_on_flashes_and_short_shots(seed):
    stream = _stream(seed, 900)
    cfg = FramesConfig(min_shot_frames=6, frames_per_shot=3)
    one = frames.FrameSource("test", 24.0, len(stream), iter(stream), (RuntimeError,))
    want = _summary(frames._shots_one_pass(one, cfg, frames._ScanInfo(), None))
    rng = np.random.default_rng(100 + seed)
    for parts in (2, 5, 11):
        starts = [0, *sorted(rng.choice(np.arange(1, len(stream)), parts - 1, replace=False).tolist())]
        seg = frames.FrameSource(
            "test",
            24.0,
            len(stream),
            iter(()),
            (RuntimeError,),
            parts,
            "",
            starts,
            lambda s: iter(stream[s:]),
        )
        info = frames._ScanInfo()
        got = _summary(frames._shots_segmented(seg, cfg, info, None))
        assert got == want, (seed, starts)
        assert info.decoded == len(stream)


def test_gpu_frame_pixels_shrunk_and_written_like_pyav_frames(episode, tmp_path):
    """NvdecFrame (here on CPU torch): pixels at a side cap, shrunk stack copies, PNG/stack writers."""
    import cv2

    f = _decoded(episode, 1)[0]
    y, u, v = _planes(f)
    frame = nvdec.NvdecFrame(torch.from_numpy(_nv12(y, u, v)), y.shape[1], y.shape[0])
    ref = f.to_ndarray(format="rgb24")
    assert np.abs(frame.to_ndarray("bgr24")[..., ::-1].astype(int) - ref).max() <= 3
    small = frames.frame_pixels(frame, 320, "rgb24")
    want = cv2.resize(ref, (320, 180), interpolation=cv2.INTER_AREA)
    assert small.shape == (180, 320, 3) and np.abs(small.astype(int) - want).mean() < 1.5
    stack_copy = frame.shrunk(320)
    assert (stack_copy.width, stack_copy.height) == (320, 180)
    assert np.array_equal(frames.frame_pixels(stack_copy, 320, "rgb24"), small)
    png = frames._save_frame(tmp_path / "f.png", frame, 0)
    assert cv2.imread(str(png)).shape == ref.shape
    with pytest.raises(ValueError, match="rgb24 or bgr24"):
        frame.pixels(0, "gray")
