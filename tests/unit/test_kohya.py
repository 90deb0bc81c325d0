"""kohya packaging: the guide's table, type adjustments, and files sd-scripts accepts as they are."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.unit import kohya_rules
from yokai_pipeline.config import PackagingConfig
from yokai_pipeline.fsio import write_jsonl
from yokai_pipeline.kohya import (
    exact_validation_split,
    format_preparation_summary,
    kohya_validation_positions,
    prepare_training_data,
    training_params,
)
from yokai_pipeline.synthetic import render_character
from yokai_pipeline.validation import validate_training_data


def _make_cluster(
    root: Path, cluster: int, char_id: int, n_orig: int, n_aug_per: int = 0, caption: str | None = None
) -> Path:
    """cluster_NNN with n_orig RGBA originals (+ augmented copies listed in augment_manifest.jsonl)."""
    folder = root / f"cluster_{cluster:03d}"
    folder.mkdir(parents=True)
    rows = []
    for i in range(n_orig):
        rgba = render_character(char_id, scale=1.0, pose=i / max(1, n_orig))
        name = f"ep01_f{i:06d}_i00"
        Image.fromarray(rgba).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(
            caption or f"char{cluster:03d}, a character with red hair, pose {i}"
        )
        rows.append({"path": f"{name}.png", "source": f"{name}.png", "kind": "original"})
        for k in range(n_aug_per):
            aug = f"{name}_aug{k:03d}"
            Image.fromarray(np.ascontiguousarray(rgba[:, ::-1])).save(folder / f"{aug}.png")
            (folder / f"{aug}.txt").write_text(f"char{cluster:03d}, a character with red hair, flipped {k}")
            rows.append({"path": f"{aug}.png", "source": f"{name}.png", "kind": "augmented"})
    write_jsonl(folder / "augment_manifest.jsonl", rows)
    return folder


# The rendered test characters are 50-130 px: below the guide's 512 px minimum, which the
# low-resolution tests exercise; the others accept them.
LOW_RES_OK = {"min_resolution": 0}


def _selection(*chars: tuple[int, str, str, str]) -> dict:
    return {
        "version": 1,
        "characters": [
            {"cluster": c, "name": n, "trigger": t, "type": ty, "tier": "A", "images": 0}
            for c, n, t, ty in chars
        ],
    }


@pytest.mark.parametrize(
    ("n", "repeat", "epochs", "unet", "text"),
    [
        (5, 30, 30, 5e-5, 2e-5),
        (10, 30, 30, 5e-5, 2e-5),
        (11, 20, 25, 8e-5, 3e-5),
        (20, 20, 25, 8e-5, 3e-5),
        (21, 15, 20, 1e-4, 5e-5),
        (50, 15, 20, 1e-4, 5e-5),
        (51, 10, 15, 1e-4, 5e-5),
        (100, 10, 15, 1e-4, 5e-5),
        (101, 5, 12, 1e-4, 5e-5),
        (2000, 5, 12, 1e-4, 5e-5),
    ],
)
def test_parameter_table_matches_guide(n, repeat, epochs, unet, text):
    human = training_params(n, "human")
    assert (human["repeat"], human["epochs"], human["unet_lr"], human["text_encoder_lr"]) == (
        repeat,
        epochs,
        unet,
        text,
    )
    assert human["network_dim"] == 32 and human["network_alpha"] == 16.0
    yokai = training_params(n, "yokai")
    assert yokai["network_dim"] == 48 and yokai["network_alpha"] == 24.0
    assert yokai["unet_lr"] == pytest.approx(unet * 1.1) and yokai["text_encoder_lr"] == pytest.approx(
        text * 1.1
    )
    assert (yokai["repeat"], yokai["epochs"]) == (repeat, epochs)


def test_no_auto_params_uses_standard_row():
    p = training_params(7, "human", auto=False)
    assert (p["repeat"], p["epochs"], p["unet_lr"], p["text_encoder_lr"]) == (15, 20, 1e-4, 5e-5)


@pytest.mark.parametrize(("n", "k"), [(2, 1), (15, 1), (15, 2), (33, 3), (60, 6), (101, 10), (7, 6)])
def test_exact_split_reproduces_kohya_counts(n, k):
    s = exact_validation_split(n, k)
    train, val = kohya_validation_positions(n, s, seed=0)
    assert len(val) == k and len(train) == n - k and not set(train) & set(val)


def _prepare_two(tmp_path: Path, **cfg_kw) -> tuple[dict, PackagingConfig]:
    src = tmp_path / "augmented_clusters"
    _make_cluster(src, 3, char_id=3, n_orig=6, n_aug_per=2)  # yokai: 6 originals + 12 augmented
    _make_cluster(src, 7, char_id=0, n_orig=12)  # human
    sel = _selection((3, "nyan", "nyan", "yokai"), (7, "keita", "keita", "human"))
    cfg = PackagingConfig(**{**LOW_RES_OK, **cfg_kw})
    summary = prepare_training_data(src, tmp_path / "training_data" / "characters", sel, cfg)
    return summary, cfg


def test_generated_configs_pass_kohya_rules_and_carry_the_table(tmp_path):
    summary, cfg = _prepare_two(tmp_path)
    assert summary["characters_prepared"] == 2
    by_name = {c["name"]: c for c in summary["characters"]}
    nyan, keita = by_name["nyan"], by_name["keita"]

    for char in (nyan, keita):
        # kohya loads these with the `toml` package; every check must pass as they are
        assert kohya_rules.check_config_files(char["config"]) == []
        args = tomllib.loads(Path(char["config"]).read_text())
        flat = {k: v for sec in args.values() for k, v in sec.items()}
        ds = tomllib.loads(Path(char["dataset_config"]).read_text())
        (dataset,) = ds["datasets"]
        (subset,) = dataset["subsets"]
        # each character trains on its own folder only
        assert Path(subset["image_dir"]) == Path(char["image_dir"])
        assert Path(subset["image_dir"]).name == f"{char['params']['repeat']}_{char['name']}"
        assert ds["general"]["caption_extension"] == ".txt" and subset["keep_tokens"] == 1
        assert dataset["resolution"] == 512 and isinstance(dataset["batch_size"], int)
        assert "validation_split" not in subset and isinstance(dataset["validation_split"], float)
        assert dataset["enable_bucket"] is True and dataset["bucket_no_upscale"] is True
        # alpha is kept, not dropped: alpha_mask in the subset + masked_loss in the training args
        assert subset["alpha_mask"] is True and flat["masked_loss"] is True
        assert flat["cache_latents"] is True and not subset.get("color_aug") and not subset.get("random_crop")
        assert flat["network_module"] == "networks.lora" and flat["save_model_as"] == "safetensors"
        assert flat["mixed_precision"] == "bf16" and flat["log_with"] == "tensorboard"
        assert flat["output_dir"].endswith(f"trained_models/{char['name']}")
        assert Path(flat["dataset_config"]) == Path(char["dataset_config"])
        assert subset["num_repeats"] == char["params"]["repeat"]
        assert flat["max_train_epochs"] == char["params"]["epochs"]
        prompts = Path(flat["sample_prompts"]).read_text().splitlines()
        assert any(
            line.startswith(f"{char['trigger']}, ") and " --n " in line and " --w 512" in line
            for line in prompts
        )

    # yokai nyan has 6 original images (5 train + 1 validation; 10 augmented copies): the guide's
    # table is by the images a character has, so row 5-10 (repeat 30, 30 epochs, 5e-5 / 2e-5),
    # x1.1 LR and dim 48 for a yokai -- even though 15 images are trained after augmentation
    assert nyan["train_images"] == 15 and nyan["validation_images"] == 1 and nyan["dropped_images"] == 2
    assert nyan["original_images"] == 6
    ny = {k: v for sec in tomllib.loads(Path(nyan["config"]).read_text()).values() for k, v in sec.items()}
    assert Path(nyan["image_dir"]).name == "30_nyan" and ny["max_train_epochs"] == 30
    assert ny["network_dim"] == 48 and ny["network_alpha"] == 24.0
    assert ny["unet_lr"] == pytest.approx(5.5e-5) and ny["text_encoder_lr"] == pytest.approx(2.2e-5)
    # human keita: 12 originals -> row 11-20 (repeat 20, 25 epochs, 8e-5 / 3e-5), dim 32
    kt = {k: v for sec in tomllib.loads(Path(keita["config"]).read_text()).values() for k, v in sec.items()}
    assert keita["train_images"] == 11 and keita["original_images"] == 12
    assert Path(keita["image_dir"]).name == "20_keita" and kt["max_train_epochs"] == 25
    assert kt["network_dim"] == 32 and kt["unet_lr"] == 8e-5
    assert kt["text_encoder_lr"] == 3e-5 and kt["network_alpha"] == 16.0

    # the packaged folder is a valid classic train_data_dir too: only repeat folders, none skipped
    used, skipped = kohya_rules.kohya_subdirs(summary["output_dir"])
    assert sorted(u[0] for u in used) == sorted(Path(c["image_dir"]).name for c in summary["characters"])
    assert skipped == ["configs"]  # holds only TOML/JSON, no images


def test_kohya_holds_out_exactly_our_validation_originals(tmp_path):
    summary, cfg = _prepare_two(tmp_path)
    for char in summary["characters"]:
        split = json.loads(Path(char["config"]).with_name(f"{char['name']}_split.json").read_text())
        ds = tomllib.loads(Path(char["dataset_config"]).read_text())["datasets"][0]
        train, val = kohya_rules.kohya_split(char["image_dir"], ds["validation_split"], ds["validation_seed"])
        ours_val = sorted(r["file"] for r in split["files"] if r["split"] == "validation")
        assert sorted(val) == ours_val and len(val) == char["validation_images"]
        assert not set(train) & set(val) and len(train) == char["train_images"]
        # validation images are originals, and none of their augmented copies is trained on
        val_sources = {r["source"] for r in split["files"] if r["split"] == "validation"}
        assert all(r["original"] == r["source"] for r in split["files"] if r["split"] == "validation")
        train_originals = {r["original"] for r in split["files"] if r["split"] == "train"}
        assert not val_sources & train_originals


def test_split_is_deterministic_and_rerun_is_clean(tmp_path):
    s1, _ = _prepare_two(tmp_path, resolution=128)
    files1 = {c["name"]: sorted(p.name for p in Path(c["image_dir"]).iterdir()) for c in s1["characters"]}
    # rerun with no split and standard params: old folders/files must not linger
    s2, _ = _prepare_two_again(tmp_path, validation_split=0.0, auto_params=False, resolution=128)
    for c in s2["characters"]:
        assert c["validation_images"] == 0
        ds = tomllib.loads(Path(c["dataset_config"]).read_text())["datasets"][0]
        assert "validation_split" not in ds
        assert len(list(Path(c["image_dir"]).glob("*.png"))) == c["train_images"]
    used, _ = kohya_rules.kohya_subdirs(s2["output_dir"])
    assert sorted(u[0] for u in used) == ["15_keita", "15_nyan"]  # the 20_/30_ folders are gone
    s3, _ = _prepare_two_again(tmp_path, resolution=128)
    files3 = {c["name"]: sorted(p.name for p in Path(c["image_dir"]).iterdir()) for c in s3["characters"]}
    assert files1 == files3


def _prepare_two_again(tmp_path: Path, **cfg_kw) -> tuple[dict, PackagingConfig]:
    src = tmp_path / "augmented_clusters"
    sel = _selection((3, "nyan", "nyan", "yokai"), (7, "keita", "keita", "human"))
    cfg = PackagingConfig(**{**LOW_RES_OK, **cfg_kw})
    return prepare_training_data(src, tmp_path / "training_data" / "characters", sel, cfg), cfg


def _packaged(summary: dict) -> dict[str, bytes]:
    return {
        f"{c['name']}/{p.name}": p.read_bytes()
        for c in summary["characters"]
        for p in sorted(Path(c["image_dir"]).iterdir())
    }


def test_rerun_keeps_unchanged_images_and_rewrites_changed_ones(tmp_path, monkeypatch):
    import yokai_pipeline.kohya as kohya

    s1, _ = _prepare_two(tmp_path, upscale_to=256)
    first = _packaged(s1)
    written = []
    real_write = kohya.atomic_write_bytes
    monkeypatch.setattr(kohya, "atomic_write_bytes", lambda p, b: written.append(p.name) or real_write(p, b))

    s2, _ = _prepare_two_again(tmp_path, upscale_to=256)
    assert written == []  # nothing changed: no image upscaled and encoded again
    assert _packaged(s2) == first

    # a source repainted, an output damaged: those two (and only those) are made again
    keita = next(c for c in s1["characters"] if c["name"] == "keita")
    split = json.loads((Path(keita["image_dir"]).parent / "configs" / "keita_split.json").read_text())
    repainted, damaged = split["files"][3], split["files"][5]
    src = tmp_path / "augmented_clusters" / "cluster_007" / repainted["source"]
    Image.fromarray(np.full((90, 60, 4), 200, np.uint8)).save(src)
    out = Path(keita["image_dir"]) / damaged["file"]
    out.write_bytes(out.read_bytes()[:-50])
    s3, _ = _prepare_two_again(tmp_path, upscale_to=256)
    assert sorted(written) == sorted([repainted["file"], damaged["file"]])
    third = _packaged(s3)
    assert [k for k in first if third[k] != first[k]] == [f"keita/{repainted['file']}"]

    written.clear()  # another preparation setting: every image again
    _prepare_two_again(tmp_path, upscale_to=300)
    assert len(written) == len([k for k in first if k.endswith(".png")])


def test_source_resolution_kept_unless_upscaling_is_configured(tmp_path):
    summary, _ = _prepare_two(tmp_path)
    for c in summary["characters"]:
        split = json.loads(Path(c["config"]).with_name(f"{c['name']}_split.json").read_text())
        sizes = {r["file"]: r for r in split["files"]}
        for p in Path(c["image_dir"]).glob("*.png"):
            with Image.open(p) as im:
                # the layer's own size (the test layers are 50-130 px): no upscaling by default
                assert im.mode == "RGBA" and list(im.size) == sizes[p.name]["source_size"]
                assert max(im.size) < 512 and not sizes[p.name]["upscaled"]
                alpha = np.asarray(im.getchannel("A"))
                assert alpha.min() == 0 and alpha.max() == 255  # transparent background survives
    assert summary["upscaled_images"] == 0

    up, _ = _prepare_two(tmp_path / "u", upscale_to=512, min_resolution=512)
    for c in up["characters"]:
        split = json.loads(Path(c["config"]).with_name(f"{c['name']}_split.json").read_text())
        assert all(r["upscaled"] and min(r["size"]) == 512 > min(r["source_size"]) for r in split["files"])
    assert up["upscaled_images"] == sum(c["train_images"] + c["validation_images"] for c in up["characters"])
    assert "Upscaled (packaging.upscale_to): " in format_preparation_summary(up)

    comp, _ = _prepare_two(tmp_path / "c", alpha_mode="composite", composite_color=(0, 255, 0))
    c = comp["characters"][0]
    ds = tomllib.loads(Path(c["dataset_config"]).read_text())
    args = tomllib.loads(Path(c["config"]).read_text())
    assert "alpha_mask" not in ds["datasets"][0]["subsets"][0]
    assert "masked_loss" not in args["training"]
    assert kohya_rules.check_config_files(c["config"]) == []
    p = sorted(Path(c["image_dir"]).glob("*.png"))[0]
    with Image.open(p) as im:
        assert im.mode == "RGB" and min(im.size) < 512
        assert tuple(np.asarray(im)[0, 0]) == (0, 255, 0)  # corner = composite colour


def test_low_resolution_layers_are_dropped_or_reported_by_validation(tmp_path):
    src = tmp_path / "clusters"
    folder = _make_cluster(src, 3, char_id=3, n_orig=6)
    big = render_character(3, scale=5.0)  # about 320 x 300 px: above a 256 px minimum
    Image.fromarray(big).save(folder / "ep02_f000001_i00.png")
    (folder / "ep02_f000001_i00.txt").write_text("char003, a big one")
    small_side = min(min(Image.open(p).size) for p in folder.glob("ep01_*.png"))
    assert small_side < 256 <= min(big.shape[:2])

    dropped = prepare_training_data(src, tmp_path / "a", None, PackagingConfig(min_resolution=256))
    (c,) = dropped["characters"]
    assert c["train_images"] + c["validation_images"] == 1 and len(c["low_resolution"]) == 6
    assert all(
        "resolution too low" in x["problem"] and "min_resolution 256" in x["problem"]
        for x in c["low_resolution"]
    )
    assert "Below min_resolution 256 px, left out: 6" in format_preparation_summary(dropped)
    report = validate_training_data(tmp_path / "a", min_resolution=256)
    assert report["passed"] and report["issue_counts"] == {}

    kept = prepare_training_data(
        src, tmp_path / "b", None, PackagingConfig(min_resolution=256, low_resolution="keep")
    )
    assert kept["low_resolution"] == []
    report = validate_training_data(tmp_path / "b", min_resolution=256)
    assert not report["passed"] and report["issue_counts"]["Resolution too low"] == 6
    from yokai_pipeline.cli import app

    res = CliRunner().invoke(
        app,
        [
            "validate",
            str(tmp_path / "b"),
            "--min-resolution",
            "256",
            "--output-report",
            str(tmp_path / "r.json"),
        ],
    )
    assert res.exit_code == 1 and "Resolution too low: 6" in res.output, res.output

    # nothing at or above the minimum: the character is skipped with a message naming the folder
    none = prepare_training_data(src, tmp_path / "c", None, PackagingConfig(min_resolution=1024))
    assert none["characters"] == [] and "below min_resolution 1024" in none["skipped"][0]["problem"]
    assert Path(none["skipped"][0]["path"]) == folder


def test_hostile_names_and_triggers_cannot_escape_or_inject(tmp_path):
    src = tmp_path / "clusters"
    _make_cluster(src, 1, char_id=1, n_orig=5, caption="a ghost\nwith a second line")
    evil = 'x"\n[general]\nnum_repeats = 99 --n evil, tag'
    sel = _selection((1, "../../etc/passwd", evil, "yokai"))
    out = tmp_path / "out"
    summary = prepare_training_data(src, out, sel, PackagingConfig(**LOW_RES_OK))
    (c,) = summary["characters"]
    assert Path(c["image_dir"]).parent == out.resolve() and ".." not in c["name"]
    assert "\n" not in c["trigger"] and "," not in c["trigger"] and "--" not in c["trigger"]
    assert kohya_rules.check_config_files(c["config"]) == []
    ds = tomllib.loads(Path(c["dataset_config"]).read_text())
    assert ds["datasets"][0]["subsets"][0]["class_tokens"] == c["trigger"]
    caption = sorted(Path(c["image_dir"]).glob("*.txt"))[0].read_text()
    assert caption.count("\n") == 1 and caption.startswith(c["trigger"] + ", a ghost, with a second line")
    prompts = Path(c["sample_prompts"]).read_text().splitlines()[1:]
    assert all(line.count(" --n ") == 1 for line in prompts)


def test_multi_concept_config_trains_all_characters(tmp_path):
    summary, _ = _prepare_two(tmp_path, multi_concept=True)
    multi = summary["multi_concept"]
    assert multi and sorted(multi["characters"]) == ["keita", "nyan"]
    assert kohya_rules.check_config_files(multi["config"]) == []
    ds = tomllib.loads(Path(multi["dataset_config"]).read_text())
    dirs = sorted(s["image_dir"] for d in ds["datasets"] for s in d["subsets"])
    assert dirs == sorted(c["image_dir"] for c in summary["characters"])
    args = tomllib.loads(Path(multi["config"]).read_text())
    # one LoRA, one rank: the largest any character needs (the yokai's 48)
    assert args["network"]["network_dim"] == 48 and args["network"]["network_alpha"] == 24.0
    # LR: the guide's row for 6 + 12 = 18 originals (11-20: 8e-5 / 3e-5), x1.1 only for the yokai's
    # share of the images seen per epoch (nyan 15 x 30, keita 11 x 20), not for every character
    by_name = {c["name"]: c for c in summary["characters"]}
    nyan_seen, keita_seen = 15 * 30, 11 * 20
    assert (by_name["nyan"]["train_images"], by_name["nyan"]["params"]["repeat"]) == (15, 30)
    assert (by_name["keita"]["train_images"], by_name["keita"]["params"]["repeat"]) == (11, 20)
    factor = (1.1 * nyan_seen + keita_seen) / (nyan_seen + keita_seen)
    assert args["optimizer"]["unet_lr"] == pytest.approx(8e-5 * factor, rel=1e-4)
    assert args["optimizer"]["text_encoder_lr"] == pytest.approx(3e-5 * factor, rel=1e-4)
    assert args["training"]["max_train_epochs"] == 25
    # each character keeps its repeats and its exact held-out images: no validation image is trained
    for d in ds["datasets"]:
        (sub,) = d["subsets"]
        char = next(c for c in summary["characters"] if c["image_dir"] == sub["image_dir"])
        assert sub["num_repeats"] == char["params"]["repeat"]
        train, val = kohya_rules.kohya_split(sub["image_dir"], d["validation_split"], d["validation_seed"])
        split = json.loads(Path(char["config"]).with_name(f"{char['name']}_split.json").read_text())
        assert sorted(val) == sorted(r["file"] for r in split["files"] if r["split"] == "validation")
        assert len(val) == char["validation_images"] >= 1 and not set(train) & set(val)
    prompts = Path(multi["config"]).with_name("multi_concept_sample_prompts.txt").read_text()
    assert "nyan, " in prompts and "keita, " in prompts


def test_bad_image_is_skipped_and_named(tmp_path):
    src = tmp_path / "clusters"
    folder = _make_cluster(src, 2, char_id=2, n_orig=6)
    good = sorted(folder.glob("*.png"))[0].read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 3])
    summary = prepare_training_data(src, tmp_path / "out", None, PackagingConfig(**LOW_RES_OK))
    assert [Path(s["path"]).name for s in summary["skipped"]] == ["broken.png"]
    (c,) = summary["characters"]
    # unnamed clusters follow the guide: folder/config char_002, trigger word char002
    assert Path(c["image_dir"]).name == "30_char_002" and Path(c["config"]).name == "char_002_config.toml"
    assert c["trigger"] == "char002"
    assert c["name"] == "char_002" and c["train_images"] + c["validation_images"] == 6


def test_selected_clusters_and_summary_text(tmp_path):
    src = tmp_path / "clusters"
    _make_cluster(src, 3, char_id=3, n_orig=5)
    _make_cluster(src, 4, char_id=4, n_orig=5)
    summary = prepare_training_data(
        src, tmp_path / "out", None, PackagingConfig(**LOW_RES_OK), selected_clusters=[4]
    )
    assert [c["cluster"] for c in summary["characters"]] == [4]
    text = format_preparation_summary(summary)
    assert text.startswith("Preparation Complete\n====================\n  Characters prepared: 1")
    assert "Ready to train! Example commands:" in text
    cfg_path = Path(summary["characters"][0]["config"])
    assert f"accelerate launch train_network.py --config_file {cfg_path}" in text and cfg_path.is_absolute()


def test_cli_prepare(tmp_path):
    from yokai_pipeline.cli import app

    ws = tmp_path / "ws"
    src = ws / "augmented_clusters"
    _make_cluster(src, 3, char_id=3, n_orig=6)
    _make_cluster(src, 5, char_id=5, n_orig=6)
    (ws / "selection.json").write_text(
        json.dumps(_selection((3, "nyan", "nyan", "yokai"), (5, "medama", "medama", "yokai")))
    )
    out = ws / "training_data" / "characters"
    res = CliRunner().invoke(
        app,
        [
            "prepare",
            str(src),
            "--output-dir",
            str(out),
            "--validation-split",
            "0.2",
            "--selected-clusters",
            "5",
            "--min-resolution",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Characters prepared: 1" in res.output and "medama_config.toml" in res.output
    assert [p.name for p in out.iterdir() if p.is_dir() and p.name != "configs"] == ["30_medama"]
    cfg = tomllib.loads((out / "configs" / "medama_config.toml").read_text())
    assert cfg["saving"]["output_dir"] == str((ws / "trained_models" / "medama").resolve())
