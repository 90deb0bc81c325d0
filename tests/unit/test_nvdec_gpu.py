"""NVDEC against PyAV on the same H.264 file (needs a CUDA GPU and PyNvVideoCodec: ``-m gpu``)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from yokai_pipeline import frames, fsio, synthetic
from yokai_pipeline.config import FramesConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.video import nvdec
from yokai_pipeline.workspace import Workspace

pytestmark = pytest.mark.gpu


def _encode(
    src: Path, dest: Path, width: int, height: int, pix_fmt: str = "yuv420p", faststart=False
) -> Path:
    import av

    with (
        av.open(str(src)) as c,
        av.open(str(dest), "w", options={"movflags": "faststart"} if faststart else {}) as o,
    ):
        s = o.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        s.options = {"preset": "veryfast", "crf": "18"}
        for n, f in enumerate(c.decode(video=0)):
            g = f.reformat(width=width, height=height, format=pix_fmt)
            g.pts, g.time_base = n, Fraction(1, 24)
            for p in s.encode(g):
                o.mux(p)
        for p in s.encode(None):
            o.mux(p)
    return dest


@pytest.fixture(scope="module")
def h264(tmp_path_factory) -> Path:
    if not nvdec.nvdec_available():
        pytest.skip("no CUDA device or PyNvVideoCodec")
    root = tmp_path_factory.mktemp("nvdec")
    series = synthetic.generate_series(root / "src", seed=3, episodes=1, seconds=20.0)
    return _encode(series.episodes[0], root / "ep_1080p.mp4", 1920, 1080)


def test_nvdec_keeps_the_frames_pyav_keeps(h264, tmp_path):
    a, b = Workspace(tmp_path / "pyav"), Workspace(tmp_path / "nvdec")
    cpu = frames.extract_frames(h264, a, FramesConfig(decoder="pyav"))
    gpu = frames.extract_frames(h264, b, FramesConfig(decoder="nvdec"))
    assert gpu["decoder"] == "nvdec" and gpu["decode_segments"] >= 2
    assert gpu["decoded"] == cpu["decoded"]
    assert gpu["shot_starts"] == cpu["shot_starts"]
    ra = fsio.read_jsonl(a.frames_manifest(frames.episode_id_for(h264)))
    rb = fsio.read_jsonl(b.frames_manifest(frames.episode_id_for(h264)))
    assert [r["frame_index"] for r in ra] == [r["frame_index"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert frames.hamming(x["phash"], y["phash"]) <= 2
        pa = cv2.imread(str(a.abs(x["path"])))
        pb = cv2.imread(str(b.abs(y["path"])))
        diff = np.abs(pa.astype(int) - pb)
        assert diff.mean() < 1.0 and diff.max() <= 3


def test_ten_bit_stream_falls_back_to_pyav(h264, tmp_path):
    ten = _encode(h264, tmp_path / "ep10.mp4", 640, 360, "yuv420p10le")
    st = frames.extract_frames(ten, Workspace(tmp_path / "w"), FramesConfig(decoder="nvdec"))
    assert st["decoder"] == "pyav" and "PyAV" in st["decoder_note"] and st["kept"] > 0


def test_truncated_file_is_a_clear_bad_input(h264, tmp_path):
    fast = _encode(h264, tmp_path / "fast.mp4", 640, 360, faststart=True)
    cut = tmp_path / "cut.mp4"
    data = fast.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(BadInputError, match=r"cut\.mp4.*(truncated|corrupt)"):
        frames.extract_frames(cut, Workspace(tmp_path / "w"), FramesConfig(decoder="nvdec"))
    half = tmp_path / "half.mp4"
    half.write_bytes(h264.read_bytes()[: h264.stat().st_size // 2])  # moov at the end: unreadable
    with pytest.raises(BadInputError, match=r"half\.mp4"):
        frames.extract_frames(half, Workspace(tmp_path / "w2"), FramesConfig(decoder="nvdec"))
