"""Validation: every planted defect is reported; a freshly packaged dataset validates 100%."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import tomli_w
from PIL import Image
from typer.testing import CliRunner

from tests.unit import kohya_rules
from tests.unit.test_kohya import _make_cluster, _selection
from yokai_pipeline.config import PackagingConfig
from yokai_pipeline.kohya import prepare_training_data
from yokai_pipeline.validation import (
    check_dataset_config,
    check_training_args,
    format_validation_summary,
    validate_training_data,
)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pk")
    src = root / "augmented_clusters"
    _make_cluster(src, 3, char_id=3, n_orig=6, n_aug_per=1)
    _make_cluster(src, 8, char_id=8, n_orig=5)
    sel = _selection((3, "nyan", "nyan", "yokai"), (8, "sakana", "sakana", "yokai"))
    summary = prepare_training_data(
        src,
        root / "training_data" / "characters",
        sel,
        PackagingConfig(resolution=256, min_resolution=256, upscale_to=256),
    )
    return Path(summary["output_dir"])


def _copy(packaged: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "characters"
    shutil.copytree(packaged, dest)
    # configs hold absolute paths into the original; rewrite them to point at the copy
    for p in (dest / "configs").glob("*.toml"):
        p.write_text(p.read_text().replace(str(packaged), str(dest)))
    return dest


def test_clean_packaged_dataset_validates_100_percent(packaged, tmp_path):
    report_path = tmp_path / "report.json"
    report = validate_training_data(packaged, min_resolution=256, report_path=report_path)
    assert report["passed"], format_validation_summary(report)
    assert report["valid_percent"] == 100.0 and report["invalid_pairs"] == 0
    # nyan: 6 originals + 6 copies less the held-out original's copy; sakana: 5
    assert report["total_images"] == 6 + 6 - 1 + 5
    assert report["config_issues"] == [] and report["structure_issues"] == []
    assert json.loads(report_path.read_text())["passed"] is True
    text = format_validation_summary(report)
    assert text.startswith("Validation Summary\n==================\nTraining Set:\n  Total images: 16\n")
    assert "  Valid pairs: 16 (100.0%)" in text and text.endswith(
        "✅ VALIDATION PASSED - Training data is ready"
    )
    # the independent kohya rules agree on every generated config
    for cfg in (packaged / "configs").glob("*_config.toml"):
        assert kohya_rules.check_config_files(cfg) == []


def test_every_planted_defect_is_reported(packaged, tmp_path):
    d = _copy(packaged, tmp_path)
    folder = next(p for p in d.iterdir() if p.name.endswith("_nyan"))
    pngs = sorted(folder.glob("*.png"))
    # missing caption
    pngs[0].with_suffix(".txt").unlink()
    # truncated image
    data = pngs[1].read_bytes()
    pngs[1].write_bytes(data[: len(data) // 2])
    # low resolution
    Image.new("RGB", (100, 120), (200, 10, 10)).save(pngs[2])
    # empty caption
    pngs[3].with_suffix(".txt").write_text("  \n")
    # non-UTF-8 caption
    pngs[4].with_suffix(".txt").write_bytes(b"nyan, \xff\xfe broken")
    # very short caption (warning only)
    pngs[5].with_suffix(".txt").write_text("nyan")
    # extreme aspect ratio (warning) with an odd filename (warning)
    Image.new("RGB", (1300, 260), (0, 0, 255)).save(folder / "wide image (1).png")
    (folder / "wide image (1).txt").write_text("nyan, a very wide strip of blue")
    # stray file
    (folder / "Thumbs.db").write_bytes(b"\0\1")
    # folder without repeat prefix, holding images
    (d / "validation" / "nyan").mkdir(parents=True)
    Image.new("RGB", (300, 300)).save(d / "validation" / "nyan" / "a.png")
    (d / "extra").mkdir()
    Image.new("RGB", (300, 300)).save(d / "extra" / "b.png")

    report = validate_training_data(d, min_resolution=256)
    assert not report["passed"]
    by_image = {Path(p["image"]).name: p for p in report["pairs"] if p["folder"] == folder.name}
    assert "Caption file missing" in by_image[pngs[0].name]["issues"]
    assert "Corrupt or unreadable image" in by_image[pngs[1].name]["issues"]
    assert "Resolution too low" in by_image[pngs[2].name]["issues"]
    assert "Empty caption" in by_image[pngs[3].name]["issues"]
    assert "Caption not UTF-8" in by_image[pngs[4].name]["issues"]
    assert (
        by_image[pngs[5].name]["issues"] == [] and "Very short caption" in by_image[pngs[5].name]["warnings"]
    )
    wide = by_image["wide image (1).png"]
    assert wide["issues"] == [] and {"Extreme aspect ratio", "Unusual characters in filename"} <= set(
        wide["warnings"]
    )
    assert report["invalid_pairs"] == 5 and report["valid_pairs"] == report["total_images"] - 5
    structure = {(i["path"], i["problem"].split(":")[0]) for i in report["structure_issues"]}
    assert ("validation", "Directory without repeat prefix (kohya skips it)") in structure
    assert ("extra", "Directory without repeat prefix (kohya skips it)") in structure
    assert any(
        w["path"].endswith("Thumbs.db") and w["problem"] == "Stray file" for w in report["structure_warnings"]
    )

    text = format_validation_summary(report)
    for line in (
        "  - Caption file missing: 1 occurrences",
        "  - Resolution too low: 1 occurrences",
        "  - Empty caption: 1 occurrences",
        "  - Corrupt or unreadable image: 1 occurrences",
        "  - Very short caption: 1 occurrences",
        "  - Stray file: 1 occurrences",
        "  - Directory without repeat prefix (kohya skips it): 2 occurrences",
        "  - validation: Directory without repeat prefix (kohya skips it): validation",
    ):
        assert line in text, text
    assert text.endswith("❌ VALIDATION FAILED - Fix the issues above and re-run validation")


def test_config_defects_are_reported(packaged, tmp_path):
    d = _copy(packaged, tmp_path)
    ds_path = next((d / "configs").glob("nyan_dataset.toml"))
    doc = tomllib.loads(ds_path.read_text())
    sub = doc["datasets"][0]["subsets"][0]
    sub["validation_split"] = 0.1
    del doc["general"]["caption_extension"]
    del sub["caption_extension"]
    ds_path.write_text(tomli_w.dumps(doc))
    cfg_path = d / "configs" / "sakana_config.toml"
    args = tomllib.loads(cfg_path.read_text())
    args["network"]["network_dim"] = "48"
    args["training"]["max_train_epoch"] = 10  # typo: kohya would silently ignore it
    cfg_path.write_text(tomli_w.dumps(args))
    report = validate_training_data(d, min_resolution=256)
    assert not report["passed"]
    problems = [(i["path"], i["problem"]) for i in report["config_issues"]]
    assert any(p == "nyan_dataset.toml" and "'validation_split' not allowed" in m for p, m in problems)
    assert any(p == "nyan_dataset.toml" and "caption_extension missing" in m for p, m in problems)
    assert any(p == "sakana_config.toml" and "'network_dim' must be int" in m for p, m in problems)
    assert any(p == "sakana_config.toml" and "'max_train_epoch'" in m for p, m in problems)


def _good_dataset(image_dir: str) -> dict:
    return {
        "general": {"caption_extension": ".txt", "keep_tokens": 1},
        "datasets": [
            {
                "resolution": 512,
                "batch_size": 1,
                "validation_split": 0.1,
                "subsets": [{"image_dir": image_dir, "num_repeats": 10}],
            }
        ],
    }


def _plant(doc: dict, defect: str) -> dict:
    ds = doc["datasets"][0]
    sub = ds["subsets"][0]
    if defect == "validation_split in subset":
        sub["validation_split"] = ds.pop("validation_split")
    elif defect == "batch_size in subset":
        sub["batch_size"] = ds.pop("batch_size")
    elif defect == "repeats typo":
        sub["repeats"] = sub.pop("num_repeats")
    elif defect == "missing caption_extension":
        del doc["general"]["caption_extension"]
    elif defect == "string where int needed":
        sub["num_repeats"] = "10"
    elif defect == "int where float needed":
        ds["validation_split"] = 0
    elif defect == "missing resolution":
        del ds["resolution"]
    elif defect == "missing image_dir":
        del sub["image_dir"]
    elif defect == "wrong caption_extension":
        doc["general"]["caption_extension"] = ".caption"
    return doc


DEFECTS = [
    "validation_split in subset",
    "batch_size in subset",
    "repeats typo",
    "missing caption_extension",
    "string where int needed",
    "int where float needed",
    "missing resolution",
    "missing image_dir",
    "wrong caption_extension",
]


@pytest.mark.parametrize("defect", DEFECTS)
def test_planted_bad_dataset_configs_fail_both_checkers(defect, tmp_path):
    good = _good_dataset(str(tmp_path))
    assert kohya_rules.check_dataset_config(good) == [] and check_dataset_config(good) == []
    bad = _plant(_good_dataset(str(tmp_path)), defect)
    # round-trip through TOML so the types are what kohya would read
    bad = tomllib.loads(tomli_w.dumps(bad))
    assert kohya_rules.check_dataset_config(bad), defect
    assert check_dataset_config(bad), defect


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"network_dim": 32.0}, "network_dim"),
        ({"unet_lr": "1e-4"}, "unet_lr"),
        ({"gradient_checkpointing": "true"}, "gradient_checkpointing"),
        ({"max_train_epochs": True}, "max_train_epochs"),
        ({"mixed_precision": "float16"}, "mixed_precision"),
        ({"color_aug": True}, "cache_latents"),
        ({"learnig_rate": 1e-4}, "learnig_rate"),
        ({"alpha_mask": False}, "masked_loss"),
    ],
)
def test_planted_bad_training_args_fail_both_checkers(patch, needle):
    good = {
        "pretrained_model_name_or_path": "m",
        "output_dir": "/o",
        "network_module": "networks.lora",
        "network_dim": 32,
        "unet_lr": 1e-4,
        "max_train_epochs": 10,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
        "cache_latents": True,
        "masked_loss": True,
        "alpha_mask": True,
        "dataset_config": "/d.toml",
    }
    assert kohya_rules.check_training_args({"s": good}) == [] and check_training_args({"s": good}) == []
    bad = {"s": {**good, **patch}}
    assert any(needle in p for p in kohya_rules.check_training_args(bad))
    assert any(needle in p for p in check_training_args(bad))


def test_repeat_prefix_rules_match_kohya(tmp_path):
    for name in ("10_char", "0_zero", "validation", "x_10", "3_a_b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (600, 600)).save(tmp_path / name / "i.png")
        (tmp_path / name / "i.txt").write_text("char, a b c")
    used, skipped = kohya_rules.kohya_subdirs(tmp_path)
    assert [u[0] for u in used] == ["10_char", "3_a_b"] and sorted(skipped) == [
        "0_zero",
        "validation",
        "x_10",
    ]
    report = validate_training_data(tmp_path)
    flagged = sorted(i["path"] for i in report["structure_issues"])
    assert flagged == sorted(skipped)
    assert {f["folder"] for f in report["folders"]} == {"10_char", "3_a_b"}


def test_cli_validate_exit_codes(packaged, tmp_path):
    from yokai_pipeline.cli import app

    runner = CliRunner()
    report = tmp_path / "r.json"
    ok = runner.invoke(
        app, ["validate", str(packaged), "--output-report", str(report), "--min-resolution", "256"]
    )
    assert ok.exit_code == 0, ok.output
    assert "✅ VALIDATION PASSED" in ok.output and json.loads(report.read_text())["passed"]
    strict = runner.invoke(
        app, ["validate", str(packaged), "--output-report", str(report), "--min-resolution", "1024"]
    )
    assert strict.exit_code == 1 and "Resolution too low: 16 occurrences" in strict.output
    assert "❌ VALIDATION FAILED" in strict.output


def test_training_waits_for_a_passed_and_current_validation(packaged, tmp_path):
    from yokai_pipeline.validation import ValidationFailed, require_passed

    data = _copy(packaged, tmp_path)
    report_path = tmp_path / "logs" / "validation_report.json"
    with pytest.raises(ValidationFailed, match=f"{report_path}: no validation report"):
        require_passed(report_path, data)
    assert require_passed(
        validate_training_data(data, min_resolution=256, report_path=report_path) and report_path, data
    )["passed"]
    # a low-resolution minimum the data does not meet: the report fails, and so does the gate
    validate_training_data(data, min_resolution=512, report_path=report_path)
    with pytest.raises(ValidationFailed) as err:
        require_passed(report_path, data)
    msg = str(err.value)
    assert (
        "failed validation" in msg
        and "Resolution too low: 16" in msg
        and msg.endswith(f"Report: {report_path}")
    )
    # re-packaged after validating: the old report no longer speaks for the data
    validate_training_data(data, min_resolution=256, report_path=report_path)
    summary = data / "configs" / "preparation_summary.json"
    summary.touch()
    import os

    os.utime(summary, (report_path.stat().st_mtime + 5, report_path.stat().st_mtime + 5))
    with pytest.raises(ValidationFailed, match="older than"):
        require_passed(report_path, data)


def test_training_flow_refuses_unvalidated_data(tmp_path):
    from flows.training import training_flow
    from yokai_pipeline.config import PipelineConfig
    from yokai_pipeline.validation import ValidationFailed
    from yokai_pipeline.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    ws.validation_report.parent.mkdir(parents=True)
    ws.validation_report.write_text(
        json.dumps({"passed": False, "valid_percent": 50.0, "issue_counts": {"Caption file missing": 3}})
    )
    with pytest.raises(ValidationFailed, match=f"Caption file missing: 3.*Report: {ws.validation_report}"):
        training_flow.fn(str(ws.root), PipelineConfig())
