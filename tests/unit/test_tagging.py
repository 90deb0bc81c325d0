"""Booru tags: WD14 loading and preprocessing, thresholds, MCut, pruning, caption composition, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yokai_pipeline.captioning import caption_folder, compose_caption
from yokai_pipeline.config import CaptionConfig, TagConfig
from yokai_pipeline.errors import BadInputError
from yokai_pipeline.tagging import (
    core_tags,
    format_tag,
    mcut_threshold,
    offline_tags,
    read_tags,
    select_tags,
    sidecar_path,
    tag_folder,
)

NAMES = ["1girl", "long_hair", "red_hair", "smile", "hatsune_miku", "general", "sensitive", "questionable",
         "explicit", "^_^"]  # fmt: skip
CATS = [0, 0, 0, 0, 4, 9, 9, 9, 9, 0]
VIT_ARGS = {"img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 1, "num_heads": 2,
            "class_token": False, "global_pool": "avg", "fc_norm": False}  # fmt: skip


def write_tags_csv(path: Path, names=NAMES, cats=CATS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (n, c) in enumerate(zip(names, cats, strict=True)):
            w.writerow([i, n, c, 1000 - i])


def build_tiny_tagger(folder: Path, n_out: int = len(NAMES)):
    """A tiny random ViT with a tagger-shaped head, saved the way SmilingWolf's timm exports are."""
    import timm
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=n_out, **VIT_ARGS).eval()
    pcfg = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
            "crop_pct": 1.0, "num_classes": n_out}  # fmt: skip
    cfg = {
        "architecture": "vit_base_patch16_224",
        "num_classes": n_out,
        "model_args": VIT_ARGS,
        "pretrained_cfg": pcfg,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    write_tags_csv(folder / "selected_tags.csv")
    return model


def layer(rgb=(220, 30, 30), size=(40, 60), alpha=True) -> Image.Image:
    """A figure on a transparent (or white) canvas."""
    arr = np.zeros((size[1], size[0], 4), np.uint8)
    arr[..., :3] = 255
    arr[..., 3] = 0 if alpha else 255
    arr[8:-8, 10:-10, :3] = rgb
    arr[8:-8, 10:-10, 3] = 255
    return Image.fromarray(arr, "RGBA")


# --- thresholds, MCut, escaping, pruning, composition: fixed inputs ---------------------------


def test_mcut_is_the_midpoint_of_the_largest_gap():
    assert mcut_threshold(np.array([0.2, 0.9, 0.3, 0.85])) == pytest.approx((0.85 + 0.3) / 2)
    assert mcut_threshold(np.array([0.7])) == pytest.approx(0.7)


def test_select_tags_uses_category_thresholds_and_keeps_rating_apart():
    probs = np.array([0.97, 0.36, 0.34, 0.9, 0.84, 0.7, 0.2, 0.05, 0.01, 0.5])
    got = select_tags(
        probs, NAMES, [{0: "general", 4: "character", 9: "rating"}[c] for c in CATS], TagConfig()
    )
    assert list(got["general"]) == ["1girl", "smile", "^_^", "long_hair"]  # >= 0.35, most probable first
    assert got["character"] == {}  # 0.84 < 0.85
    assert got["rating"] == {"general": 0.7, "sensitive": 0.2, "questionable": 0.05, "explicit": 0.01}
    got = select_tags(probs, NAMES, [{0: "general", 4: "character", 9: "rating"}[c] for c in CATS],
                      TagConfig(general_mcut=True, character_threshold=0.8))  # fmt: skip
    # general scores 0.97 0.9 0.5 0.36 0.34: largest gap 0.9 -> 0.5, cut at 0.7
    assert list(got["general"]) == ["1girl", "smile"]
    assert got["character"] == {"hatsune_miku": 0.84}


@pytest.mark.parametrize(
    ("tag", "text"),
    [
        ("long_hair", "long hair"),
        ("hatsune_miku_(append)", r"hatsune miku \(append\)"),
        ("^_^", "^_^"),
        ("1girl", "1girl"),
    ],  # fmt: skip
)
def test_format_tag_writes_tags_as_kohya_users_do(tag, text):
    assert format_tag(tag) == text


def test_core_tags_are_those_on_most_images_except_framing():
    lists = [
        ["red_hair", "solo", "smile"],
        ["red_hair", "solo"],
        ["red_hair", "solo", "smile"],
        ["solo", "hat"],
    ]
    assert core_tags(lists, 0.7, never=["solo"]) == ["red_hair"]  # 3/4 >= 0.7; smile 2/4 is not
    assert core_tags(lists, 0.7) == ["solo", "red_hair"]


def test_compose_caption_puts_the_trigger_first_and_each_tag_once():
    cap = compose_caption("miko", ["long_hair", "long hair", "kimono_(red)", "miko"], "a girl smiling")
    assert cap == r"miko, long hair, kimono \(red\), a girl smiling"
    assert compose_caption("miko", []) == "miko"


def test_offline_tags_are_what_the_layer_shows():
    rgba = np.asarray(layer())
    got = offline_tags(rgba, {"instances": 3})["general"]  # a cut-out of one of three: the layer is solo
    assert set(got) == {"red_theme", "solo", "transparent_background"}
    got = offline_tags(np.asarray(layer(alpha=False)), {"crop_kind": "upper_body", "instances": 2})["general"]
    assert {"upper_body", "multiple_others", "simple_background", "white_background"} <= set(got)
    assert "solo" not in got and "transparent_background" not in got
    two = np.hstack([rgba, rgba])  # two separate figures, no manifest facts
    assert "multiple_others" in offline_tags(two)["general"]


# --- the WD14 model: loading, preprocessing, runtimes ----------------------------------------


def test_wd14_predictions_match_the_model_card_reference_pipeline(tmp_path):
    """Pad square on white, resize, timm transform, RGB->BGR, sigmoid: written here as the card does."""
    import timm
    import torch

    from yokai_pipeline.models.wd14 import Wd14Tagger

    model = build_tiny_tagger(tmp_path / "tagger")
    paths = []
    for i, (w, h) in enumerate([(40, 60), (90, 30), (32, 32)]):
        paths.append(tmp_path / f"im{i}.png")
        layer(rgb=(30 * i, 200, 90), size=(w, h)).save(paths[-1])
    got = Wd14Tagger(tmp_path / "tagger", "cpu", batch_size=2, num_workers=0).predict(paths)

    # The timm transform the card builds from the model's pretrained_cfg (config.json).
    pcfg = json.loads((tmp_path / "tagger/config.json").read_text())["pretrained_cfg"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=pcfg))
    ref = []
    for p in paths:
        im = Image.open(p).convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        white.alpha_composite(im)
        side = max(im.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(white.convert("RGB"), ((side - im.width) // 2, (side - im.height) // 2))
        x = transform(square.resize((32, 32), Image.BICUBIC)).unsqueeze(0)[:, [2, 1, 0]]
        with torch.no_grad():
            ref.append(torch.sigmoid(model(x))[0].numpy())
    np.testing.assert_allclose(got, np.stack(ref), atol=2e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_wd14_onnx_runtime_matches_torch(tmp_path):
    """The published ONNX layout: NHWC BGR 0..255 in, sigmoid inside."""
    import torch

    from yokai_pipeline.models.wd14 import Wd14Tagger

    model = build_tiny_tagger(tmp_path / "tagger")

    class Exported(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):  # NHWC BGR 0..255, as SmilingWolf's export takes it; the net itself reads BGR
            x = x.permute(0, 3, 1, 2) / 255.0
            return torch.sigmoid(self.net((x - 0.5) / 0.5))

    try:
        torch.onnx.export(Exported(model).eval(), torch.zeros(1, 32, 32, 3), str(tmp_path / "tagger/model.onnx"),
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "b"}},
                          dynamo=False)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - an exporter this torch lacks is not a product bug
        pytest.skip(f"torch.onnx.export unavailable here: {exc}")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"im{i}.png")
        layer(rgb=(60 * i, 40, 200), size=(30 + 10 * i, 50)).save(paths[-1])
    onnx = Wd14Tagger(tmp_path / "tagger", batch_size=2, num_workers=0, runtime="onnx").predict(paths)
    ref = Wd14Tagger(tmp_path / "tagger", "cpu", batch_size=2, num_workers=0).predict(paths)
    np.testing.assert_allclose(onnx, ref, atol=1e-4)


def test_tagger_folder_without_selected_tags_names_the_file(tmp_path):
    from yokai_pipeline.models.wd14 import load_wd14

    build_tiny_tagger(tmp_path / "tagger")
    (tmp_path / "tagger/selected_tags.csv").unlink()
    with pytest.raises(BadInputError, match=r"selected_tags\.csv.*not found"):
        load_wd14(tmp_path / "tagger", "cpu")


def test_tag_list_not_matching_the_model_output_names_the_csv(tmp_path):
    from yokai_pipeline.models.wd14 import load_wd14

    build_tiny_tagger(tmp_path / "tagger")
    write_tags_csv(tmp_path / "tagger/selected_tags.csv", NAMES[:7], CATS[:7])
    with pytest.raises(BadInputError, match=r"selected_tags\.csv: lists 7 tags but the model outputs 10"):
        load_wd14(tmp_path / "tagger", "cpu")


def test_hub_id_not_in_the_cache_is_never_downloaded(tmp_path, monkeypatch):
    from yokai_pipeline.errors import ConfigError
    from yokai_pipeline.models.wd14 import load_wd14

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="neither a local folder nor in the Hugging Face cache"):
        load_wd14("SmilingWolf/wd-vit-tagger-v3-not-cached", "cpu")


# --- the folder stage and captions -----------------------------------------------------------


def test_wd14_tag_folder_writes_sidecars_with_probabilities_and_names_an_unreadable_image(tmp_path):
    build_tiny_tagger(tmp_path / "tagger")
    folder = tmp_path / "cluster_000"
    folder.mkdir()
    for i in range(3):
        layer(rgb=(200, 40 * i, 40)).save(folder / f"l{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    # Low thresholds so the random model's ~0.5 scores are kept.
    cfg = TagConfig(backend="wd14", model=str(tmp_path / "tagger"), device="cpu", num_workers=0,
                    general_threshold=0.01, character_threshold=0.01)  # fmt: skip
    res = tag_folder(folder, cfg)
    assert res["tagged"] == 3 and [f["name"] for f in res["failed"]] == ["broken.png"]
    assert "unreadable image" in res["failed"][0]["problem"]
    doc = json.loads(sidecar_path(folder / "l0.png").read_text())
    assert set(doc["general"]) == {"1girl", "long_hair", "red_hair", "smile", "^_^"}
    assert set(doc["character"]) == {"hatsune_miku"} and len(doc["rating"]) == 4
    assert all(0 < p < 1 for p in doc["general"].values())
    again = tag_folder(folder, cfg)
    assert again["tagged"] == 0 and again["skipped"] == 3  # resumes; the broken file is retried and reported
    assert read_tags(folder / "l0.png", {"other": 1}) is None  # other settings: stale


def test_tag_captions_are_trigger_first_with_core_tags_pruned_and_old_captions_kept(tmp_path):
    folder = tmp_path / "cluster_003"
    folder.mkdir()
    for i in range(4):
        layer(rgb=(220, 30, 30) if i < 3 else (30, 30, 220)).save(folder / f"l{i}.png")
    (folder / "l3.txt").write_text("oni, written earlier\n")
    cfg = TagConfig(core_tag_ratio=0.7)
    res = tag_folder(folder, cfg, meta={"l1": {"crop_kind": "portrait"}})
    assert res["core_tags"] == ["red_theme"]  # 3 of 4; solo / transparent_background never pruned
    cap = caption_folder(folder, CaptionConfig(), trigger="oni", tags=cfg)
    assert cap["captioned"] == 3 and cap["skipped"] == 1 and cap["core_tags"] == ["red_theme"]
    assert (folder / "l0.txt").read_text() == "oni, solo, transparent background\n"
    assert (folder / "l1.txt").read_text() == "oni, portrait, solo, transparent background\n"
    assert (folder / "l3.txt").read_text() == "oni, written earlier\n"


def test_captions_without_tag_sidecars_fail_by_name_and_write_nothing(tmp_path):
    folder = tmp_path / "cluster_001"
    folder.mkdir()
    layer().save(folder / "a.png")
    cap = caption_folder(folder, CaptionConfig(), trigger="oni", tags=TagConfig())
    assert cap["captioned"] == 0 and cap["failed"][0]["name"] == "a.png"
    assert "a.tags.json" in cap["failed"][0]["problem"] and not (folder / "a.txt").exists()


def test_both_mode_puts_the_sentence_after_the_tags(tmp_path):
    folder = tmp_path / "cluster_002"
    folder.mkdir()
    layer().save(folder / "a.png")
    cfg = TagConfig(caption="both", prune_core_tags=False)
    tag_folder(folder, cfg)
    caption_folder(folder, CaptionConfig(), trigger="oni", char_type="yokai", tags=cfg)
    text = (folder / "a.txt").read_text().strip()
    assert text.startswith("oni, red theme, solo, transparent background, a red")
    assert "yokai" in text.split("transparent background, ", 1)[1]


def test_decode_pool_gives_the_same_probabilities_as_inline(tmp_path):
    from yokai_pipeline.models.wd14 import Wd14Tagger

    build_tiny_tagger(tmp_path / "tagger")
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"im{i}.png")
        layer(rgb=(50 * i, 90, 20), size=(36, 28 + 6 * i)).save(paths[-1])
    inline = Wd14Tagger(tmp_path / "tagger", "cpu", batch_size=2, num_workers=0).predict(paths)
    pooled = Wd14Tagger(tmp_path / "tagger", "cpu", batch_size=2, num_workers=2).predict(paths)
    np.testing.assert_array_equal(pooled, inline)


def test_tag_captions_package_with_shuffle_and_keep_tokens_that_kohya_accepts(tmp_path):
    """Tags -> captions -> kohya packaging -> validation, with kohya's own rules as the judge."""
    import tomllib

    from tests.unit import kohya_rules
    from tests.unit.test_kohya import LOW_RES_OK, _make_cluster, _selection
    from yokai_pipeline.config import PackagingConfig
    from yokai_pipeline.kohya import format_preparation_summary, prepare_training_data
    from yokai_pipeline.validation import validate_training_data

    src = tmp_path / "augmented_clusters"
    folder = _make_cluster(src, 3, char_id=3, n_orig=6, n_aug_per=1)
    for txt in folder.glob("*.txt"):
        txt.unlink()  # captions come from the tags
    cfg = TagConfig()
    tags = tag_folder(folder, cfg)
    assert tags["core_tags"]  # the synthetic character's colours are on every image
    caption_folder(folder, CaptionConfig(), trigger="nyan", tags=cfg)
    summary = prepare_training_data(
        src,
        tmp_path / "characters",
        _selection((3, "nyan", "nyan", "yokai")),
        PackagingConfig(**{**LOW_RES_OK, "resolution": 256}),
    )
    char = summary["characters"][0]
    assert char["core_tags"] == tags["core_tags"] and char["shuffle_caption"] is True
    assert "core tags (left out of captions, learned by nyan)" in format_preparation_summary(summary)
    assert kohya_rules.check_config_files(char["config"]) == []
    subset = tomllib.loads(Path(char["dataset_config"]).read_text())["datasets"][0]["subsets"][0]
    assert subset["shuffle_caption"] is True and subset["keep_tokens"] == 1
    for txt in Path(char["image_dir"]).glob("*.txt"):
        tokens = [t.strip() for t in txt.read_text().split(",")]
        assert tokens[0] == "nyan" and not set(tokens) & {format_tag(t) for t in tags["core_tags"]}
    report = validate_training_data(tmp_path / "characters", min_resolution=0)  # sizes are not the point here
    assert report["passed"], report["issue_counts"]


def test_validation_flags_trigger_not_first_empty_and_duplicate_tags():
    from yokai_pipeline.validation import check_caption_tokens

    assert check_caption_tokens("nyan, red theme, solo\n", "nyan") == ([], [])
    assert check_caption_tokens("red theme, nyan\n", "nyan") == (["Trigger word not first"], [])
    assert check_caption_tokens("nyan\n", "nyan") == ([], ["Empty tag list"])
    assert check_caption_tokens("nyan, solo, Solo\n", "nyan") == ([], ["Duplicate tags"])


def test_cluster_report_shows_each_characters_top_and_core_tags(tmp_path):
    from tests.unit.test_analysis import build_clusters
    from yokai_pipeline import analysis
    from yokai_pipeline.config import AnalysisConfig
    from yokai_pipeline.tagging import cluster_tag_summaries

    cdir = build_clusters(tmp_path, [(0, 6, "normal"), (3, 6, "normal")], noise=0)
    result = analysis.analyze_clusters(cdir, AnalysisConfig())
    tag_folder(cdir / "cluster_001", TagConfig())
    tags = cluster_tag_summaries(cdir)
    assert list(tags) == [1] and tags[1]["top_tags"][0]["share"] == 1.0
    top = [(-t["share"], t["tag"]) for t in tags[1]["top_tags"]]
    assert top == sorted(top)  # ties by name: the same bytes whatever the process's hash seed
    html = analysis.render_report(result, tags=tags)
    section = html.split('id="cluster-001"', 1)[1]
    assert "top tags:" in section and "transparent_background 100%" in section
    assert "core tags (learned by the trigger" in section
    assert "top tags:" not in html.split('id="cluster-001"', 1)[0].split('id="cluster-000"', 1)[1]


def test_cli_tag_then_caption_with_tags(tmp_path):
    from typer.testing import CliRunner

    from yokai_pipeline.cli import app

    folder = tmp_path / "clusters" / "cluster_004"
    folder.mkdir(parents=True)
    for i in range(3):
        layer().save(folder / f"l{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    res = CliRunner().invoke(app, ["tag", str(tmp_path / "clusters"), "--backend", "offline"])
    assert res.exit_code == 1, res.output  # the unreadable image fails by name; the rest are tagged
    assert "bad.png" in res.output and sidecar_path(folder / "l0.png").is_file()
    res = CliRunner().invoke(
        app,
        [
            "caption",
            str(tmp_path / "clusters"),
            "--backend",
            "offline",
            "--content",
            "tags",
            "--no-prune-core-tags",
        ],
    )
    assert (folder / "l0.txt").read_text() == "char004, red theme, solo, transparent background\n"
    res = CliRunner().invoke(app, ["tag", str(tmp_path / "missing"), "--backend", "offline"])
    assert res.exit_code == 1 and "folder does not exist" in " ".join(res.output.split())


@pytest.mark.gpu
def test_wd14_on_cuda_from_png_files_through_the_decode_pool(tmp_path):
    """bf16 on CUDA, pinned uploads over several batches, a bad file: close to the fp32 CPU scores."""
    from yokai_pipeline.models.wd14 import Wd14Tagger

    build_tiny_tagger(tmp_path / "tagger")
    paths = []
    for i in range(11):
        paths.append(tmp_path / f"im{i}.png")
        layer(rgb=(20 * i, 120, 60), size=(30 + 3 * i, 44)).save(paths[-1])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    cpu = Wd14Tagger(tmp_path / "tagger", "cpu", batch_size=4, num_workers=0).predict(paths)
    errors: list = []
    gpu = Wd14Tagger(tmp_path / "tagger", "cuda", batch_size=4, num_workers=2).predict(
        [*paths[:5], bad, *paths[5:]], errors=errors
    )
    assert [i for i, _ in errors] == [5] and not gpu[5].any()
    np.testing.assert_allclose(np.delete(gpu, 5, axis=0), cpu, atol=2e-2)


@pytest.mark.parametrize(("train_te", "shuffled"), [(False, False), (True, True)])
def test_sdxl_with_cached_text_encoder_outputs_never_shuffles_tag_captions(tmp_path, train_te, shuffled):
    """kohya asserts on cache_text_encoder_outputs with shuffle_caption: UNet-only SDXL keeps tag order."""
    import tomllib

    from tests.unit import kohya_rules
    from tests.unit.test_kohya import LOW_RES_OK, _make_cluster, _selection
    from yokai_pipeline.config import PackagingConfig, TrainingConfig
    from yokai_pipeline.kohya import prepare_training_data

    src = tmp_path / "augmented_clusters"
    folder = _make_cluster(src, 3, char_id=3, n_orig=5)
    for txt in folder.glob("*.txt"):
        txt.unlink()
    tag_folder(folder, TagConfig())
    caption_folder(folder, CaptionConfig(), trigger="nyan", tags=TagConfig())
    summary = prepare_training_data(
        src,
        tmp_path / "characters",
        _selection((3, "nyan", "nyan", "yokai")),
        PackagingConfig(**LOW_RES_OK),
        training=TrainingConfig(family="sdxl", sdxl_train_text_encoders=train_te),
    )
    char = summary["characters"][0]
    subset = tomllib.loads(Path(char["dataset_config"]).read_text())["datasets"][0]["subsets"][0]
    assert subset.get("shuffle_caption", False) is shuffled and char["shuffle_caption"] is shuffled
    assert kohya_rules.check_config_files(char["config"], script="sdxl_train_network.py") == []
