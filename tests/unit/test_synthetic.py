"""The sample series: characters, drawing style, layout rules, ground truth and idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from yokai_pipeline import synthetic
from yokai_pipeline.synthetic import CHARACTERS, GAP, MARGIN

SHORT = {"seed": 5, "episodes": 2, "seconds": 8.0}


@pytest.fixture(scope="module")
def short_series(tmp_path_factory) -> synthetic.SeriesInfo:
    return synthetic.generate_series(tmp_path_factory.mktemp("short_series"), **SHORT)


def _decode(video: Path, indices: set[int] | None = None) -> dict[int, np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    out, i = {}, 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if indices is None or i in indices:
            out[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        i += 1
    cap.release()
    return out


def test_cast_has_distinct_humans_and_yokai():
    assert len(CHARACTERS) >= 8
    assert [c.id for c in CHARACTERS] == list(range(len(CHARACTERS)))
    assert len({c.name for c in CHARACTERS}) == len(CHARACTERS)
    types = [c.type for c in CHARACTERS]
    assert types.count("human") >= 3 and types.count("yokai") >= 3
    # distinct designs: each character's main fill colours (>= 8% of its pixels) are its own
    signatures = []
    for c in CHARACTERS:
        img = synthetic.render_character(c.id)
        px = img[img[..., 3] > 0][:, :3]
        colours, counts = np.unique(px, axis=0, return_counts=True)
        main = {tuple(col) for col, n in zip(colours, counts, strict=True) if n >= 0.08 * len(px)} - {
            (0, 0, 0)
        }
        assert main, c.name
        signatures.append(frozenset(main))
    assert len(set(signatures)) == len(CHARACTERS)
    # and every yokai differs from every human in silhouette (aspect ratio of the crop)
    aspect = {c.id: np.divide(*synthetic.render_character(c.id).shape[:2]) for c in CHARACTERS}
    humans = [aspect[c.id] for c in CHARACTERS if c.type == "human"]
    yokai = [aspect[c.id] for c in CHARACTERS if c.type == "yokai"]
    assert min(humans) > max(yokai)


@pytest.mark.parametrize("char_id", [c.id for c in CHARACTERS])
def test_render_character_is_an_outlined_single_blob(char_id):
    for pose in (0.0, 0.25, 0.6):
        for facing in (1, -1):
            img = synthetic.render_character(char_id, scale=1.2, facing=facing, pose=pose)
            assert img.dtype == np.uint8 and img.shape[2] == 4
            alpha = img[..., 3] > 0
            assert set(np.unique(img[..., 3])) == {0, 255}
            # tight crop: the alpha touches all four sides
            assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()
            n, _ = cv2.connectedComponents(alpha.astype(np.uint8))
            assert n == 2, "one connected character"
            # black outline: the mask's border pixels are black
            border = alpha & ~cv2.erode(alpha.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            dark = img[..., :3].max(axis=2) < 40
            assert (dark & border).sum() / border.sum() > 0.95
            # flat fills: few distinct colours
            assert len(np.unique(img[alpha][:, :3], axis=0)) < 40


def test_pose_scale_and_facing_change_the_drawing():
    a = synthetic.render_character(0, pose=0.0)
    b = synthetic.render_character(0, pose=0.25)
    assert a.shape != b.shape or not np.array_equal(a, b)
    big = synthetic.render_character(0, scale=1.5)
    assert big.shape[0] > 1.4 * a.shape[0]
    for c in CHARACTERS:
        left = synthetic.render_character(c.id, facing=-1, pose=0.3)
        mirrored = np.fliplr(synthetic.render_character(c.id, facing=1, pose=0.3))
        assert left.shape == mirrored.shape
        union = (left[..., 3] > 0) | (mirrored[..., 3] > 0)
        differ = (np.abs(left[..., :3].astype(int) - mirrored[..., :3]).max(-1) > 60) & union
        frac = differ.sum() / union.sum()
        if c.symmetric:
            assert frac == 0, c.name  # a flip is a valid image of a symmetric character
        else:
            assert frac > 0.02, c.name  # the asymmetric mark stays on its side when turning


def test_backgrounds_are_painted_without_dark_lines():
    bgs = synthetic.paint_backgrounds(360, 640, seed=0)
    assert len(bgs) >= 5
    for bg in bgs:
        assert bg.shape == (360, 1024, 3)
        assert bg.max(axis=2).min() > 60
    assert len({bg[::8, ::8].tobytes() for bg in bgs}) == len(bgs)


def test_series_files_and_ground_truth_agree_with_the_video(short_series):
    info = short_series
    chars = json.loads(info.characters.read_text())["characters"]
    assert [c["id"] for c in chars] == [c.id for c in CHARACTERS]
    for video, gt_path in zip(info.episodes, info.ground_truth, strict=True):
        gt = synthetic.load_ground_truth(gt_path)
        assert gt["episode"] == video.name
        cap = cv2.VideoCapture(str(video))
        assert cap.isOpened()
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == gt["n_frames"] == len(gt["frames"]) == 8 * 24
        assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (640, 360)
        cap.release()
        shots = gt["shots"]
        assert shots[0]["start"] == 0 and shots[-1]["end"] == gt["n_frames"]
        assert all(a["end"] == b["start"] for a, b in zip(shots, shots[1:], strict=False))
        assert gt["opening"] == [0, 96] and shots[1]["end"] == 96
        for i, fr in enumerate(gt["frames"]):
            assert fr["frame_index"] == i
            shot = shots[fr["shot_id"]]
            assert shot["start"] <= fr["frame_index"] < shot["end"]
            boxes = [c["box"] for c in fr["characters"]]
            assert 1 <= len(boxes) <= 3
            for x0, y0, x1, y1 in boxes:
                assert x0 >= MARGIN and y0 >= MARGIN and x1 <= 640 - MARGIN and y1 <= 360 - MARGIN
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    a, b = boxes[i], boxes[j]
                    gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                    assert gap >= GAP


def test_frames_show_outlined_characters_on_line_free_backgrounds(short_series):
    gt = synthetic.load_ground_truth(short_series.ground_truth[0])
    picks = {10, 50, 100, 150, 190}
    frames = _decode(short_series.episodes[0], picks)
    for fi, frame in frames.items():
        labels = synthetic.gt_mask(gt, fi)
        fg = labels > 0
        assert set(np.unique(labels)) - {0} == {c["id"] + 1 for c in gt["frames"][fi]["characters"]}
        # background (away from the characters, past codec ringing) has no dark pixels
        near = cv2.dilate(fg.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert frame[~near].max(axis=1).min() > 50
        # the polygon's edge runs along the black outline
        ring = fg & ~cv2.erode(fg.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert (frame[ring].max(axis=1) < 90).mean() > 0.6
        # and the character is where the ground truth says (box = polygon extent)
        for c in gt["frames"][fi]["characters"]:
            ys, xs = np.nonzero(labels == c["id"] + 1)
            x0, y0, x1, y1 = c["box"]
            assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
            assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1


def test_opening_is_identical_in_every_episode_and_shots_move(short_series):
    g1, g2 = (synthetic.load_ground_truth(p) for p in short_series.ground_truth)
    assert g1["frames"][: g1["opening"][1]] == g2["frames"][: g2["opening"][1]]
    assert g1["frames"][g1["opening"][1] :] != g2["frames"][g2["opening"][1] :]
    f1 = _decode(short_series.episodes[0], {5, 60})
    f2 = _decode(short_series.episodes[1], {5, 60})
    for k in (5, 60):
        assert np.abs(f1[k].astype(int) - f2[k]).mean() < 1.0
    # inside a shot, characters move: boxes of the first and last frame differ
    for shot in g1["shots"]:
        first = [c["box"] for c in g1["frames"][shot["start"]]["characters"]]
        last = [c["box"] for c in g1["frames"][shot["end"] - 1]["characters"]]
        assert first != last


def test_generation_is_idempotent_and_deterministic(tmp_path, short_series):
    again = synthetic.generate_series(short_series.root, **SHORT)
    assert again.episodes == short_series.episodes
    mtimes = [p.stat().st_mtime_ns for p in short_series.episodes]
    synthetic.generate_series(short_series.root, **SHORT)
    assert [p.stat().st_mtime_ns for p in short_series.episodes] == mtimes
    other = synthetic.generate_series(tmp_path / "copy", **SHORT)
    assert other.ground_truth[1].read_bytes() == short_series.ground_truth[1].read_bytes()
    changed = synthetic.generate_series(tmp_path / "seed6", **{**SHORT, "seed": 6, "episodes": 1})
    assert changed.ground_truth[0].read_bytes() != short_series.ground_truth[0].read_bytes()
    # a changed parameter regenerates in place
    synthetic.generate_series(tmp_path / "copy", **{**SHORT, "seconds": 6.0})
    assert synthetic.load_ground_truth(other.ground_truth[0])["n_frames"] == 6 * 24
    assert not list((tmp_path / "copy").rglob(".tmp-*"))


def test_small_or_vertical_frames_still_respect_the_layout(tmp_path):
    info = synthetic.generate_series(
        tmp_path / "v", seed=1, episodes=1, seconds=5.0, width=240, height=400, fps=12
    )
    gt = synthetic.load_ground_truth(info.ground_truth[0])
    assert gt["n_frames"] == 60
    for fr in gt["frames"]:
        for c in fr["characters"]:
            x0, y0, x1, y1 = c["box"]
            assert x0 >= MARGIN and y0 >= MARGIN and x1 <= 240 - MARGIN and y1 <= 400 - MARGIN


def test_ground_truth_labels_match_layers_by_box(short_series):
    gt = synthetic.load_ground_truth(short_series.ground_truth[0])
    rows = []
    for fi in (3, 120):
        for k, c in enumerate(gt["frames"][fi]["characters"]):
            x0, y0, x1, y1 = c["box"]
            rows.append(
                {
                    "layer_id": f"ep01_f{fi:06d}_i{k:02d}",
                    "kind": "character",
                    "episode": "ep01.mp4",
                    "episode_id": "ep01",
                    "frame_index": fi,
                    "box": [x0 - 3, y0 + 2, x1 + 4, y1 - 1],
                    "expected": c["id"],
                }
            )
    rows.append(
        {
            "layer_id": "ep01_f000003_i09",
            "kind": "character",
            "episode": "ep01.mp4",
            "episode_id": "ep01",
            "frame_index": 3,
            "box": [0, 0, 3, 3],
            "expected": None,
        }
    )
    rows.append(
        {
            "layer_id": "ep01_f000003_bg",
            "kind": "background",
            "episode": "ep01.mp4",
            "episode_id": "ep01",
            "frame_index": 3,
            "box": [0, 0, 640, 360],
        }
    )
    rows.append(
        {
            "layer_id": "ep99_f000003_i00",
            "kind": "character",
            "episode": "ep99.mp4",
            "episode_id": "ep99",
            "frame_index": 3,
            "box": [0, 0, 30, 30],
            "expected": None,
        }
    )
    labels = synthetic.ground_truth_labels(rows, short_series.ground_truth_dir)
    assert "ep01_f000003_bg" not in labels
    for r in rows:
        if r["kind"] == "character":
            assert labels[r["layer_id"]] == r["expected"]


def test_bad_ground_truth_file_is_named(tmp_path):
    bad = tmp_path / "ep01.json"
    bad.write_text("{not json")
    with pytest.raises(Exception) as exc:
        synthetic.load_ground_truth(bad)
    assert str(bad) in str(exc.value)
