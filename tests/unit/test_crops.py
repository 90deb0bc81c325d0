"""3-stage crops: head / upper-body boxes against the sample series' drawing, shares, dataset cut, tags."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from yokai_pipeline import crops, fsio, synthetic, tagging
from yokai_pipeline.config import CropConfig, LayeringConfig, PipelineConfig
from yokai_pipeline.layering import layer_crops

CFG = LayeringConfig()


def _human_truth(cid: int, scale: float, pose: float) -> tuple[np.ndarray, dict[str, float]]:
    """A human of the sample series and where its face is, from synthetic._human's drawing code.

    The pen draws in units of 0.9 * scale px with the feet at the origin: head ellipse centred
    at y = -104 + bob with a 20-unit vertical radius (chin at -84, also the shoulder line),
    eyes at head_y + 2, mouth at head_y + 12, hips at -46.
    """
    rgb, mask, (_, dy) = synthetic._render_crop(cid, scale, 1, pose)
    u = 0.9 * scale
    bob = -2.5 * abs(math.sin(2 * math.pi * pose))
    rel = {
        name: dy + (y + bob) * u for name, y in {"eyes": -102, "mouth": -92, "chin": -84, "hips": -46}.items()
    }
    rel["feet"] = float(mask.shape[0])
    return mask > 0, rel


HUMANS = sorted(synthetic._BUILDS)
SHORT_HAIR = [0, 4, 9]  # their neck shows; 2 and 7 wear long hair over it


@pytest.mark.parametrize("cid", HUMANS)
@pytest.mark.parametrize("scale", [0.6, 1.0, 1.6])
@pytest.mark.parametrize("pose", [0.0, 0.3])
def test_head_and_upper_body_crops_frame_the_drawn_face_and_shoulders(cid, scale, pose):
    inside, truth = _human_truth(cid, scale, pose)
    h, w = inside.shape
    origin = (100, 40)
    boxes = crops.crop_boxes(inside, origin, (1000, 1000), LayeringConfig(crop_margin=0.0))
    head, upper = boxes["head"], boxes["upper_body"]
    head_bottom, upper_bottom = head[3] - origin[1], upper[3] - origin[1]
    assert head[1] == upper[1] == origin[1]  # both start at the figure's top (hair)
    # the head crop holds the whole face and stops above the hips
    assert truth["mouth"] < head_bottom < truth["hips"]
    if cid in SHORT_HAIR and scale >= 1.0:  # at 50-80 px the 2-px outlines can fill the neck in
        assert boxes["source"] == "neck"
    if cid in SHORT_HAIR and boxes["source"] == "neck":
        assert abs(head_bottom - truth["chin"]) <= 0.04 * h
    # the upper body holds head and shoulders, not the legs
    assert truth["chin"] + 0.1 * h < upper_bottom <= truth["feet"] - 0.2 * h
    assert upper[0] >= origin[0] and upper[2] <= origin[0] + w


def test_a_figure_without_a_neck_gets_the_ratio_head():
    inside = np.zeros((100, 60), bool)
    cv2.ellipse(inside.view(np.uint8), (30, 50), (29, 49), 0, 0, 360, 1, -1)  # a round yokai
    rows, how = crops.head_rows(inside, CFG)
    assert how == "ratio" and rows == 30  # crop_head_frac 0.3 of 100 rows


def test_head_detector_box_wins_over_geometry():
    inside, _ = _human_truth(0, 1.0, 0.0)
    box = crops.crop_boxes(
        inside, (0, 0), (500, 500), LayeringConfig(crop_margin=0.0), head_box=(10, 0, 40, 30)
    )
    assert box["source"] == "head_detector" and box["head"] == [10, 0, 40, 30]


def test_shares_give_the_configured_mix_and_follow_their_instances():
    cfg = CropConfig()
    ids = [f"ep_f{i:06d}_i00" for i in range(20)]
    all_kinds = {i: {"full_body", "upper_body", "head"} for i in ids}
    assert crops.plan_crops(ids, all_kinds, cfg) == {"full_body": 20, "upper_body": 12, "head": 8}
    picks = crops.pick_crops(ids, all_kinds, cfg)
    assert {i for i, _ in picks} <= set(ids)  # crops come from the character's own instances
    # a new instance keeps every earlier pick of a kind it does not take
    more = crops.pick_crops([*ids, "ep_f999999_i00"], {**all_kinds, "ep_f999999_i00": {"full_body"}}, cfg)
    assert {p for p in picks if p[1] == "full_body"} < set(more)
    # kinds nobody has (layers older than crops) leave the full bodies alone
    assert crops.plan_crops(ids, {i: {"full_body"} for i in ids}, cfg)["full_body"] == 20
    with pytest.raises(ValueError, match="keep full_body"):
        CropConfig(kinds=["head"], share={"head": 1.0})
    with pytest.raises(ValueError, match="positive share"):
        CropConfig(kinds=["full_body", "head"], share={"full_body": 1.0})
    assert PipelineConfig().crops.enabled and not CropConfig(kinds=["full_body"]).enabled


def _layer_row(layer_id: str, rgba: np.ndarray, origin: tuple[int, int]) -> dict:
    (layer,) = [(rgba, (*origin, origin[0] + rgba.shape[1], origin[1] + rgba.shape[0]), 0)]
    c = layer_crops([layer], (640, 360), CFG)[0]
    return {
        "layer_id": layer_id,
        "kind": "character",
        "box": list(layer[1]),
        "crop_kind": "full_body",
        "crops": {k: c[k] for k in ("upper_body", "head")},
    }


def test_crop_cluster_adds_crops_as_derived_images_that_packaging_and_tags_follow(tmp_path):
    from yokai_pipeline import kohya

    src, out = tmp_path / "cluster_000", tmp_path / "augmented" / "cluster_000"
    src.mkdir()
    out.mkdir(parents=True)
    rows = {}
    for i in range(5):
        rgba = synthetic.render_character(0, scale=1.2, pose=i / 5)
        layer_id = f"ep1_f{i:06d}_i00"
        cv2.imwrite(str(src / f"{layer_id}.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        (out / f"{layer_id}.png").write_bytes(
            (src / f"{layer_id}.png").read_bytes()
        )  # augmentation's original
        rows[layer_id] = _layer_row(layer_id, rgba, (50 + i, 20))
    (src / "hand_added.png").write_bytes((src / "ep1_f000000_i00.png").read_bytes())
    res = crops.crop_cluster(src, out, rows, CropConfig())
    # 6 instances (one added by hand, without crops): 6 full bodies, then 30 % / 20 % of 12
    assert res["counts"] == {"full_body": 6, "upper_body": 4, "head": 2} and not res["failed"]
    made = fsio.read_jsonl(out / crops.CROPS_MANIFEST)
    assert sorted(m["crop_kind"] for m in made) == ["head"] * 2 + ["upper_body"] * 4
    for m in made:
        img = cv2.imread(str(out / m["path"]), cv2.IMREAD_UNCHANGED)
        row = rows[m["layer_id"]]
        x0, y0, x1, y1 = row["crops"][m["crop_kind"]]
        full = cv2.imread(str(src / m["source"]), cv2.IMREAD_UNCHANGED)
        lx, ly = row["box"][:2]
        np.testing.assert_array_equal(img, full[y0 - ly : y1 - ly, x0 - lx : x1 - lx])
        assert img.shape[0] < full.shape[0] and m["source"] == f"{m['layer_id']}.png"
    # packaging sees each crop as derived from its instance (the guide's rows count instances)
    sources = kohya.read_sources(out)
    assert {sources[m["path"]] for m in made} <= {f"{i}.png" for i in rows}
    # the offline tagger's framing tag for each image, from the layer manifest
    (tmp_path / "manifests").mkdir()
    fsio.write_jsonl(tmp_path / "manifests" / "ep1.jsonl", list(rows.values()))
    meta = tagging.layer_meta(tmp_path / "manifests")
    images = sorted(out.glob("ep1_*.png"))
    want = {"full_body": "full_body", "upper_body": "upper_body", "head": "portrait"}
    for p, facts in zip(images, tagging._folder_metas(out, images, meta), strict=True):
        kind = next((k for k in ("upper_body", "head") if p.stem.endswith(k)), "full_body")
        rgba = cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
        assert want[kind] in tagging.offline_tags(rgba, facts)["general"], p.name
    # a re-run with the same plan rewrites nothing; a narrower plan removes its crops and captions
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    crops.crop_cluster(src, out, rows, CropConfig())
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    (out / made[0]["path"]).with_suffix(".txt").write_text("old caption")
    crops.crop_cluster(src, out, rows, CropConfig(kinds=["full_body"]))
    assert sorted(p.name for p in out.glob("*")) == sorted(
        [*(f"{i}.png" for i in rows), crops.CROPS_MANIFEST]
    )
