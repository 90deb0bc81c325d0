"""SDXL packaging for sdxl_train_network.py, the launcher's script choice, re-training after re-packaging,
and kohya's validation progress bars."""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from tests.unit import kohya_rules
from tests.unit.test_kohya import _make_cluster, _selection
from yokai_pipeline.config import PackagingConfig, PipelineConfig, TrainingConfig
from yokai_pipeline.kohya import prepare_training_data
from yokai_pipeline.kohya_launch import launch_kohya, parse_progress_line

FAKE = Path(__file__).resolve().parents[1] / "fixtures" / "fake_train_network.py"


def _flat(path: str | Path) -> dict:
    doc = tomllib.loads(Path(path).read_text())
    return {k: v for sec in doc.values() for k, v in (sec.items() if isinstance(sec, dict) else [])}


def _clusters(tmp_path: Path) -> tuple[Path, dict]:
    src = tmp_path / "clusters"
    _make_cluster(src, 0, 0, 12)
    _make_cluster(src, 1, 1, 8)
    return src, _selection((0, "nyan", "nyan", "yokai"), (1, "keita", "keita", "human"))


def test_sdxl_family_writes_configs_sdxl_train_network_accepts(tmp_path):
    src, sel = _clusters(tmp_path)
    training = TrainingConfig(family="sdxl", family_per_character={"keita": "sd15"})
    summary = prepare_training_data(
        src,
        tmp_path / "training_data" / "characters",
        sel,
        PackagingConfig(min_resolution=0),
        training=training,
    )
    by_name = {c["name"]: c for c in summary["characters"]}
    nyan, keita = by_name["nyan"], by_name["keita"]
    assert nyan["family"] == "sdxl" and keita["family"] == "sd15"
    assert kohya_rules.check_config_files(nyan["config"], "sdxl_train_network.py") == []
    assert kohya_rules.check_config_files(keita["config"], "train_network.py") == []
    assert "accelerate launch sdxl_train_network.py --config_file" in nyan["command"]
    assert "accelerate launch train_network.py --config_file" in keita["command"]

    args = _flat(nyan["config"])
    assert args["pretrained_model_name_or_path"] == "cagliostrolab/animagine-xl-3.1"
    assert args["no_half_vae"] is True and "clip_skip" not in args  # SDXL ignores clip_skip
    assert args["network_train_unet_only"] is True and args["cache_text_encoder_outputs"] is True
    (ds,) = tomllib.loads(Path(nyan["dataset_config"]).read_text())["datasets"]
    assert ds["resolution"] == 1024 and ds["bucket_reso_steps"] % 32 == 0
    assert (ds["min_bucket_reso"], ds["max_bucket_reso"]) == (512, 2048)
    # the SD 1.5 character keeps its 512 px and its SD 1.5 base model
    assert (
        _flat(keita["config"])["pretrained_model_name_or_path"]
        == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    (ds15,) = tomllib.loads(Path(keita["dataset_config"]).read_text())["datasets"]
    assert ds15["resolution"] == 512


def test_sdxl_with_text_encoders_does_not_cache_their_outputs(tmp_path):
    src, sel = _clusters(tmp_path)
    training = TrainingConfig(family="sdxl", sdxl_train_text_encoders=True)
    summary = prepare_training_data(
        src, tmp_path / "out", sel, PackagingConfig(resolution=768, min_resolution=0), training=training
    )
    for char in summary["characters"]:
        assert kohya_rules.check_config_files(char["config"], "sdxl_train_network.py") == []
        args = _flat(char["config"])
        assert args["network_train_unet_only"] is False and "cache_text_encoder_outputs" not in args
        (ds,) = tomllib.loads(Path(char["dataset_config"]).read_text())["datasets"]
        assert ds["resolution"] == 768  # an explicit resolution wins over the family's


def test_rules_catch_what_sdxl_train_network_asserts():
    ds = {"datasets": [{"bucket_reso_steps": 48, "subsets": [{"image_dir": "x", "shuffle_caption": True}]}]}
    flat = {"cache_text_encoder_outputs": True}
    problems = kohya_rules.check_sdxl_rules(flat, ds)
    assert any("network_train_unet_only" in p for p in problems)
    assert any("multiple of 32" in p for p in problems)
    assert any("shuffle_caption" in p for p in problems)
    # an option only sdxl_train_network.py defines is unknown to train_network.py
    assert kohya_rules.check_training_args(
        {"s": {"cache_text_encoder_outputs": True}}, script="train_network.py"
    )


def test_cli_prepare_family_sdxl(tmp_path):
    import typer

    from yokai_pipeline.commands import prepare as prepare_cmd

    src, sel = _clusters(tmp_path)
    (tmp_path / "selection.json").write_text(__import__("json").dumps(sel))
    app = typer.Typer()
    prepare_cmd.register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "chars"
    res = CliRunner().invoke(
        app, ["prepare", str(src), "--output-dir", str(out), "--family", "sdxl", "--min-resolution", "0"]
    )
    assert res.exit_code == 0, res.output
    assert "sdxl_train_network.py" in res.output
    for cfg in (out / "configs").glob("*_config.toml"):
        assert kohya_rules.check_config_files(cfg, "sdxl_train_network.py") == []
        assert _flat(cfg)["no_half_vae"] is True
    bad = CliRunner().invoke(app, ["prepare", str(src), "--output-dir", str(out), "--family", "sd3"])
    assert bad.exit_code == 2 and "sd3" in bad.output


def test_unknown_family_is_refused_by_the_config():
    with pytest.raises(ValueError, match="sd15"):
        PipelineConfig.model_validate({"training": {"family": "sd3"}})


# ------------------------------------------------------------------ launcher


def _packaged(tmp_path: Path, family: str) -> dict:
    src, sel = _clusters(tmp_path)
    summary = prepare_training_data(
        src,
        tmp_path / "training_data" / "characters",
        sel,
        PackagingConfig(min_resolution=0),
        training=TrainingConfig(family=family),
    )
    return {c["name"]: c for c in summary["characters"]}["keita"]


def test_launcher_runs_sdxl_script_and_retrains_after_repackaging(tmp_path):
    sd = tmp_path / "sd-scripts"
    sd.mkdir()
    shutil.copy(FAKE, sd / "train_network.py")
    shutil.copy(FAKE, sd / "sdxl_train_network.py")
    char = _packaged(tmp_path, "sdxl")
    kw = {"sd_scripts": sd, "python": sys.executable, "launcher": "python"}
    first = launch_kohya(char["config"], **kw)
    assert first["status"] == "finished" and Path(first["command"][1]).name == "sdxl_train_network.py"
    assert launch_kohya(char["config"], **kw)["status"] == "skipped"

    # re-packaging with a changed caption: the character trains again, from the start
    caption = sorted(Path(char["image_dir"]).glob("*.txt"))[0]
    caption.write_text("keita, a different caption\n")
    again = launch_kohya(char["config"], **kw)
    assert again["status"] == "finished" and again["resumed_from"] is None
    assert launch_kohya(char["config"], **kw)["status"] == "skipped"
    # a changed training parameter too
    cfg = Path(char["config"])
    doc = tomllib.loads(cfg.read_text())
    doc["optimizer"]["learning_rate"] = 2e-4
    cfg.write_bytes(tomli_w.dumps(doc).encode())
    assert launch_kohya(char["config"], **kw)["status"] == "finished"


def test_progress_parser_ignores_kohya_validation_bars():
    # tqdm lines as train_network.py prints them (desc "steps", "validation steps", "epoch validation steps")
    train = "steps:  40%|████      | 8/20 [00:04<00:06,  1.95it/s, avr_loss=0.0812]"
    val = "validation steps:  50%|█████     | 2/4 [00:01<00:01,  1.90it/s, timestep=500, val_avg_loss=0.0921]"
    epoch_val = (
        "epoch validation steps: 100%|██████████| 4/4 [00:02<00:00,  1.97it/s, timestep=800, "
        "val_epoch_avg_loss=0.0903]"
    )
    assert parse_progress_line(train) == {"step": 8, "total_steps": 20, "loss": 0.0812}
    assert parse_progress_line(val) == {}
    assert parse_progress_line(epoch_val) == {}
