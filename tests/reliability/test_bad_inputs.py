"""Bad and unusual inputs through the stage that reads them.

Each file is either processed like a normal input, or rejected with an error that names the
file and the problem; the good inputs of the same batch are still processed and what was
produced before is kept. docs/reliability.md tabulates the outcomes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.reliability import badfiles as bf
from yokai_pipeline import fsio
from yokai_pipeline.config import (
    AnalysisConfig,
    AugmentConfig,
    CaptionConfig,
    EmbeddingConfig,
    FramesConfig,
    LayeringConfig,
    PackagingConfig,
)
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.workspace import Workspace

REJECTED_IMAGES = sorted(n for n, (_, ok) in bf.BAD_IMAGES.items() if not ok)
HANDLED_IMAGES = sorted(n for n, (_, ok) in bf.BAD_IMAGES.items() if ok)


def _av():
    return pytest.importorskip("av", reason="PyAV writes audio-only and VFR mp4 files: pip install av")


# ============================================================================ videos -> frames


def _faststart_truncated(path: Path) -> Path:
    """moov atom first (PyAV +faststart), then cut: the container opens but frames are missing."""
    av = _av()
    full = path.with_name("full_" + path.name)
    with av.open(str(full), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for img in bf.flat_frames(96, 320, 180):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    full.unlink()
    return path


REJECTED_VIDEOS = {
    "zero_byte.mp4": (bf.zero_byte_video, "empty"),
    "truncated_moov.mp4": (bf.truncated_video, "not a readable video"),
    "truncated_frames.mp4": (_faststart_truncated, "truncated"),
    "text.mp4": (bf.text_as_video, "not a readable video"),
    "audio_only.mp4": (lambda p: (_av(), bf.audio_only_mp4(p))[1], "not a readable video"),
}


@pytest.fixture
def frames_ws(tmp_path) -> tuple[Workspace, dict]:
    """A workspace where one good episode was already extracted."""
    ws = Workspace(tmp_path / "ws")
    good = bf.good_video(tmp_path / "good.mp4")
    from yokai_pipeline.frames import extract_frames

    extract_frames(good, ws, FramesConfig())
    before = {p: fsio.file_sha256(p) for p in ws.root.rglob("*") if p.is_file()}
    assert before
    return ws, before


@pytest.mark.parametrize("name", sorted(REJECTED_VIDEOS))
def test_bad_video_is_rejected_naming_file_and_keeps_earlier_outputs(tmp_path, frames_ws, name):
    from yokai_pipeline.frames import episode_id_for, extract_frames

    ws, before = frames_ws
    maker, problem = REJECTED_VIDEOS[name]
    video = maker(tmp_path / name)
    with pytest.raises(BadInputError) as exc:
        extract_frames(video, ws, FramesConfig())
    assert exc.value.path == str(video)
    assert name in str(exc.value) and problem in str(exc.value)
    # nothing claims the bad episode is done, and the good episode's outputs are untouched
    assert not (ws.episode_dir(episode_id_for(video)) / "extract.json").exists()
    after = {p: fsio.file_sha256(p) for p in before}
    assert after == before
    assert not list(ws.root.rglob(".tmp-*"))


def _extract_and_layer(video: Path, ws: Workspace, **frames_kw) -> tuple[dict, list[dict]]:
    from yokai_pipeline.frames import episode_id_for, extract_frames
    from yokai_pipeline.layering import segment_layers

    stats = extract_frames(video, ws, FramesConfig(**frames_kw))
    rows = fsio.read_jsonl(ws.frames_manifest(episode_id_for(video)))
    layers = segment_layers(rows, ws, LayeringConfig(num_workers=2))
    return stats, layers


@pytest.mark.parametrize(
    "name,maker,size",
    [
        ("one_frame.mp4", bf.one_frame_video, (320, 180)),
        ("vertical.mp4", bf.vertical_video, (180, 320)),
    ],
)
def test_odd_but_valid_video_goes_through_frames_and_layering(tmp_path, name, maker, size):
    ws = Workspace(tmp_path / "ws")
    stats, layers = _extract_and_layer(maker(tmp_path / name), ws)
    assert (stats["width"], stats["height"]) == size
    assert stats["kept"] >= 1
    backgrounds = [r for r in layers if r["kind"] == "background"]
    assert len(backgrounds) == stats["kept"]
    for r in backgrounds:
        assert Image.open(ws.abs(r["path"])).size == size


@pytest.mark.slow
def test_4k_video_is_extracted_at_full_size_and_can_be_capped(tmp_path):
    from yokai_pipeline.frames import extract_frames

    video = bf.uhd_video(tmp_path / "uhd.mp4", n=6)
    ws = Workspace(tmp_path / "ws")
    stats = extract_frames(video, ws, FramesConfig())
    assert (stats["width"], stats["height"]) == (3840, 2160)
    row = fsio.read_jsonl(ws.frames_manifest("uhd"))[0]
    assert Image.open(ws.abs(row["path"])).size == (3840, 2160)
    # max_side keeps layering affordable on 4K sources
    ws2 = Workspace(tmp_path / "ws2")
    stats2, layers = _extract_and_layer(video, ws2, max_side=960)
    bg = next(r for r in layers if r["kind"] == "background")
    assert Image.open(ws2.abs(bg["path"])).size == (960, 540)


def test_variable_frame_rate_timestamps_are_the_real_ones(tmp_path):
    _av()
    from yokai_pipeline.frames import extract_frames

    video, times = bf.vfr_mp4(tmp_path / "vfr.mp4")
    ws = Workspace(tmp_path / "ws")
    stats = extract_frames(video, ws, FramesConfig())
    assert stats["decoded"] == len(times)
    rows = fsio.read_jsonl(ws.frames_manifest("vfr"))
    assert rows
    for r in rows:
        # the container's presentation time, not frame_index / nominal fps
        assert r["timestamp"] == pytest.approx(times[r["frame_index"]], abs=1e-3)


# ============================================================================ images


@pytest.fixture
def bad_images(tmp_path) -> dict[str, Path]:
    return bf.make_bad_images(tmp_path / "bad")


def _eight_bit_equivalent(path: Path) -> np.ndarray:
    """What a careful reader should see: 16-bit scaled (not clipped) to 8 bits, as RGBA."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    raw8 = (raw >> 8).astype(np.uint8)
    if raw8.ndim == 2:
        return np.dstack([raw8, raw8, raw8, np.full_like(raw8, 255)])
    return cv2.cvtColor(raw8, cv2.COLOR_BGRA2RGBA)


@pytest.mark.parametrize("name", sorted(bf.BAD_IMAGES))
def test_read_image_normalises_or_rejects(bad_images, name):
    path = bad_images[name]
    if name in REJECTED_IMAGES:
        with pytest.raises(BadInputError) as exc:
            fsio.read_image(path)
        assert str(path) in str(exc.value)
        return
    im = fsio.read_image(path)
    assert im.mode in ("RGB", "RGBA")
    if name.startswith("png16"):
        got = np.asarray(im.convert("RGBA"))
        assert np.abs(got.astype(int) - _eight_bit_equivalent(path)).max() <= 1
    if name == "palette_trns.png":
        assert im.mode == "RGBA" and (np.asarray(im)[..., 3] == 0).mean() > 0.2


def _frame_rows(ws: Workspace, files: dict[str, Path]) -> list[dict]:
    rows = []
    for k, (name, src) in enumerate(sorted(files.items())):
        dest = ws.episode_dir("ep") / "frames" / f"ep_f{k:06d}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        rows.append(
            {
                "episode": "ep.mp4",
                "episode_id": "ep",
                "frame_index": k,
                "shot_id": 0,
                "path": ws.rel(dest),
                "source_name": name,
            }
        )
    return rows


def test_layering_skips_bad_frames_and_layers_the_rest(tmp_path, bad_images):
    from yokai_pipeline.layering import segment_layers

    ws = Workspace(tmp_path / "ws")
    frame = tmp_path / "good.png"
    cv2.imwrite(str(frame), bf.flat_frames(1, 320, 180)[0])
    rows = _frame_rows(ws, {**bad_images, "good.png": frame})
    out = segment_layers(rows, ws, LayeringConfig(num_workers=2))
    layered = {r["frame_index"] for r in out if r["kind"] == "background"}
    for row in rows:
        failure = ws.layered_frames / "failures" / "ep" / f"ep_f{row['frame_index']:06d}.json"
        if row["source_name"] in [*REJECTED_IMAGES, "one_pixel.png"]:  # a 1x1 frame cannot be segmented
            assert row["frame_index"] not in layered
            rec = fsio.read_json(failure)
            assert rec["frame_path"] == row["path"] and rec["error"]
        else:
            assert row["frame_index"] in layered, row["source_name"]
            assert not failure.exists()


def test_layering_read_frame_names_bomb_file(bad_images):
    from yokai_pipeline.layering import read_frame

    with pytest.raises(BadInputError, match="bomb.png"):
        read_frame(bad_images["bomb.png"])


def test_layering_tiny_frame_failure_says_why(tmp_path, bad_images):
    from yokai_pipeline.layering import segment_layers

    ws = Workspace(tmp_path / "ws")
    frame = tmp_path / "good.png"
    cv2.imwrite(str(frame), bf.flat_frames(1, 320, 180)[0])
    rows = _frame_rows(ws, {"one_pixel.png": bad_images["one_pixel.png"], "z.png": frame})
    segment_layers(rows, ws, LayeringConfig(num_workers=1))
    rec = fsio.read_json(ws.layered_frames / "failures" / "ep" / "ep_f000000.json")
    assert "OpenCV" not in rec["error"] and "1x1" in rec["error"]


def _layer_manifest(ws: Workspace, files: dict[str, Path]) -> list[dict]:
    rows = []
    for k, (name, src) in enumerate(sorted(files.items())):
        dest = ws.layered_frames / "character" / "ep" / f"ep_f{k:06d}_i00{src.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        rows.append(
            {
                "layer_id": f"ep_f{k:06d}_i00",
                "kind": "character",
                "episode": "ep.mp4",
                "episode_id": "ep",
                "frame_index": k,
                "box": [0, 0, 1, 1],
                "area": 1,
                "path": ws.rel(dest),
                "source_name": name,
            }
        )
    fsio.write_jsonl(ws.layers_manifest("ep"), rows)
    return rows


def test_embedding_zero_rows_for_bad_layers_and_embeds_the_rest(tmp_path, bad_images):
    from yokai_pipeline.embedding import embed_layers, load_embeddings

    ws = Workspace(tmp_path / "ws")
    good = {f"good{i}.png": bf.good_png(tmp_path / f"good{i}.png", seed=i) for i in range(2)}
    rows = _layer_manifest(ws, {**bad_images, **good})
    stats = embed_layers(ws, "ep", EmbeddingConfig(num_workers=1))
    X, _ = load_embeddings(ws, "ep")
    failed = {f["layer_id"]: f["error"] for f in stats["failed"]}
    for i, row in enumerate(rows):
        if row["source_name"] in REJECTED_IMAGES:
            assert row["layer_id"] in failed and Path(row["path"]).name in failed[row["layer_id"]]
            assert not X[i].any()
        else:
            assert row["layer_id"] not in failed
            assert np.linalg.norm(X[i]) == pytest.approx(1.0, abs=1e-4)


def test_embedding_of_16bit_png_matches_its_8bit_equivalent(bad_images, tmp_path):
    from yokai_pipeline.embedding import embed_images

    cfg = EmbeddingConfig(num_workers=1)
    for name in ("png16_grey.png", "png16_rgba.png"):
        eq = Image.fromarray(_eight_bit_equivalent(bad_images[name]), "RGBA")
        eq_path = tmp_path / f"eq_{name}"
        eq.save(eq_path)
        a, b = embed_images([bad_images[name], eq_path], cfg)
        assert float(a @ b) > 0.99, name


def test_analysis_reports_bad_images_and_measures_the_rest(tmp_path, bad_images):
    from yokai_pipeline.analysis import analyze_clusters

    folder = tmp_path / "character_clusters" / "cluster_000"
    folder.mkdir(parents=True)
    for i in range(4):
        bf.good_png(folder / f"good{i}.png", seed=i)
    for name, p in bad_images.items():
        shutil.copyfile(p, folder / name)
    res = analyze_clusters(folder.parent, AnalysisConfig())
    text = " ".join(map(str, res["errors"]))
    for name in REJECTED_IMAGES:
        assert name in text
    for name in HANDLED_IMAGES:
        assert name not in text
    assert res["clusters"][0]["images"] == 4 + len(HANDLED_IMAGES)  # the readable ones


def test_augmentation_reports_bad_images_and_augments_the_rest(tmp_path, bad_images):
    from yokai_pipeline.augmentation import augment_cluster

    src = tmp_path / "cluster_000"
    src.mkdir()
    for i in range(6):
        bf.good_png(src / f"good{i}.png", seed=i)
    for name, p in bad_images.items():
        if name != "bomb.png":  # the bomb has its own test below
            shutil.copyfile(p, src / name)
    res = augment_cluster(src, tmp_path / "out" / "cluster_000", AugmentConfig())
    assert sorted(f["name"] for f in res["failed"]) == [n for n in REJECTED_IMAGES if n != "bomb.png"]
    assert res["originals"] == 6 + len(HANDLED_IMAGES)
    assert res["total"] > res["originals"]
    out = tmp_path / "out" / "cluster_000"
    for name in HANDLED_IMAGES:
        assert (out / name).exists()


def test_augmentation_of_16bit_grey_keeps_its_brightness(tmp_path, bad_images):
    from yokai_pipeline.augmentation import load_rgba

    got = load_rgba(bad_images["png16_grey.png"])
    assert (
        abs(
            float(got[..., :3].mean())
            - float(_eight_bit_equivalent(bad_images["png16_grey.png"])[..., :3].mean())
        )
        < 2
    )


def test_augmentation_survives_a_decompression_bomb(tmp_path, bad_images):
    from yokai_pipeline.augmentation import augment_cluster

    src = tmp_path / "cluster_000"
    src.mkdir()
    for i in range(6):
        bf.good_png(src / f"good{i}.png", seed=i)
    shutil.copyfile(bad_images["bomb.png"], src / "bomb.png")
    res = augment_cluster(src, tmp_path / "out", AugmentConfig())
    assert [f["name"] for f in res["failed"]] == ["bomb.png"]


def test_captioning_reports_bad_images_and_captions_the_rest(tmp_path, bad_images):
    from yokai_pipeline.captioning import caption_folder

    folder = tmp_path / "cluster_000"
    folder.mkdir()
    bf.good_png(folder / "good.png")
    for name in bad_images:
        if name != "bomb.png":  # the bomb has its own test below
            shutil.copyfile(bad_images[name], folder / name)
    res = caption_folder(folder, CaptionConfig(), trigger="kappa", num_workers=1)
    assert sorted(f["name"] for f in res["failed"]) == [n for n in REJECTED_IMAGES if n != "bomb.png"]
    for name in [*HANDLED_IMAGES, "good.png"]:
        assert (folder / name).with_suffix(".txt").read_text(encoding="utf-8").startswith("kappa")


def test_captioning_survives_a_decompression_bomb(tmp_path, bad_images):
    from yokai_pipeline.captioning import caption_folder

    folder = tmp_path / "cluster_000"
    folder.mkdir()
    bf.good_png(folder / "good.png")
    shutil.copyfile(bad_images["bomb.png"], folder / "bomb.png")
    res = caption_folder(folder, CaptionConfig(), trigger="kappa", num_workers=1)
    assert [f["name"] for f in res["failed"]] == ["bomb.png"]
    assert (folder / "good.txt").exists()


def _cluster_with_captions(folder: Path, bad_images: dict[str, Path], n_good: int = 6) -> None:
    folder.mkdir(parents=True)
    for i in range(n_good):
        bf.good_png(folder / f"good{i}.png", seed=i)
        (folder / f"good{i}.txt").write_text("kappa, a green yokai\n", encoding="utf-8")
    for name, p in bad_images.items():
        shutil.copyfile(p, folder / name)
        (folder / name).with_suffix(".txt").write_text(f"kappa, {Path(name).stem}\n", encoding="utf-8")


def test_packaging_skips_bad_images_and_normalises_odd_ones(tmp_path, bad_images):
    from yokai_pipeline.kohya import prepare_training_data

    src = tmp_path / "augmented_clusters"
    _cluster_with_captions(src / "cluster_000", bad_images)
    out = tmp_path / "training_data" / "characters"
    summary = prepare_training_data(
        src, out, None, PackagingConfig(validation_split=0.0, upscale_to=0, min_resolution=0)
    )
    skipped = {Path(s["path"]).name for s in summary["skipped"]}
    assert skipped == set(REJECTED_IMAGES)
    (char_dir,) = [d for d in out.iterdir() if d.is_dir() and d.name != "configs"]
    pngs = sorted(char_dir.glob("*.png"))
    assert len(pngs) == 6 + len(HANDLED_IMAGES)
    for p in pngs:
        with Image.open(p) as im:
            assert im.mode == "RGBA", p.name  # alpha_mask mode: 8-bit RGBA for every source
    grey = next(p for p in pngs if "png16_grey" in p.name)
    expected = _eight_bit_equivalent(bad_images["png16_grey.png"])[..., :3].mean()
    assert abs(np.asarray(Image.open(grey))[..., :3].mean() - expected) < 2  # scaled, not clipped white


# ============================================================================ captions


def test_validation_flags_bad_images_and_captions_by_file(tmp_path, bad_images):
    from yokai_pipeline.validation import validate_training_data

    folder = tmp_path / "train" / "10_kappa"
    _cluster_with_captions(folder, bad_images, n_good=2)
    bf.good_png(folder / "empty_caption.png", size=96)
    (folder / "empty_caption.txt").write_bytes(b"")
    bf.good_png(folder / "latin1_caption.png", size=96)
    (folder / "latin1_caption.txt").write_bytes("kappa, caf\xe9 yokai\n".encode("latin-1"))
    report = validate_training_data(tmp_path / "train", min_resolution=64)
    by_name = {Path(p["image"]).name: p for p in report["pairs"]}
    assert not report["passed"]
    for name in REJECTED_IMAGES:
        assert "Corrupt or unreadable image" in by_name[name]["issues"]
    assert "Resolution too low" in by_name["one_pixel.png"]["issues"]
    for name in ("png16_rgba.png", "png16_grey.png", "cmyk.jpg", "palette_trns.png", "good0.png"):
        assert by_name[name]["issues"] == [], name
    assert by_name["empty_caption.png"]["issues"] == ["Empty caption"]
    assert by_name["latin1_caption.png"]["issues"] == ["Caption not UTF-8"]


def test_packaging_with_empty_and_non_utf8_captions(tmp_path):
    from yokai_pipeline.kohya import prepare_training_data

    folder = tmp_path / "src" / "cluster_000"
    folder.mkdir(parents=True)
    for i in range(4):
        bf.good_png(folder / f"img{i}.png", seed=i)
    (folder / "img0.txt").write_text("kappa, green skin\n", encoding="utf-8")
    (folder / "img1.txt").write_bytes(b"")
    (folder / "img2.txt").write_bytes("kappa, caf\xe9 hat\n".encode("latin-1"))
    out = tmp_path / "training_data" / "characters"
    selection = {"characters": [{"cluster": 0, "name": "kappa", "trigger": "kappa", "type": "yokai"}]}
    prepare_training_data(
        tmp_path / "src",
        out,
        selection,
        PackagingConfig(validation_split=0.0, upscale_to=0, min_resolution=0),
    )
    (char_dir,) = [d for d in out.iterdir() if d.is_dir() and d.name != "configs"]
    captions = {p.name.split("_", 1)[1]: p.read_bytes().decode("utf-8") for p in char_dir.glob("*.txt")}
    assert captions["img0.txt"] == "kappa, green skin\n"
    assert captions["img1.txt"] == "kappa\n"  # empty caption: the trigger alone, never an empty file
    assert captions["img2.txt"].startswith("kappa, caf")  # undecodable byte replaced, file still UTF-8
    assert captions["img3.txt"] == "kappa\n"  # missing caption
