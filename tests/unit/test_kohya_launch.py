"""kohya launcher: the real subprocess path with a stand-in train_network.py."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import tomli_w

from yokai_pipeline import kohya_launch
from yokai_pipeline.errors import ConfigError
from yokai_pipeline.kohya_launch import TrainingError, launch_kohya, parse_progress_line

FAKE = Path(__file__).resolve().parents[1] / "fixtures" / "fake_train_network.py"


@pytest.fixture
def sd_scripts(tmp_path) -> Path:
    sd = tmp_path / "sd-scripts"
    sd.mkdir()
    shutil.copy(FAKE, sd / "train_network.py")
    return sd


def make_config(root: Path, name: str = "char000", epochs: int = 2) -> Path:
    cfg = root / "configs" / f"{name}_config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_bytes(
        tomli_w.dumps(
            {
                "model": {"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5"},
                "training": {
                    "output_dir": str(root / "trained_models" / name),
                    "output_name": name,
                    "max_train_epochs": epochs,
                    "save_every_n_epochs": 1,
                    "dataset_config": str(root / "configs" / f"{name}_dataset.toml"),
                },
            }
        ).encode()
    )
    return cfg


def calls(root: Path, name: str = "char000") -> list[dict]:
    path = root / "trained_models" / name / "fake_calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_progress_is_parsed_from_kohya_lines():
    bar = "steps:  12%|█▏        | 120/1000 [00:30<03:40,  4.00it/s, avr_loss=0.123]"
    assert parse_progress_line(bar) == {"step": 120, "total_steps": 1000, "loss": 0.123}
    assert parse_progress_line("epoch 3/20") == {"epoch": 3, "total_epochs": 20}
    assert parse_progress_line("INFO     loading model") == {}


def test_missing_sd_scripts_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv(kohya_launch.ENV_SD_SCRIPTS, raising=False)
    monkeypatch.delenv(kohya_launch.ENV_SD_PYTHON, raising=False)
    cfg = make_config(tmp_path)
    with pytest.raises(ConfigError, match="YOKAI_SD_SCRIPTS=/path/to/sd-scripts"):
        launch_kohya(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no train_network.py"):
        launch_kohya(cfg, sd_scripts=tmp_path / "empty")
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "train_network.py").write_text("")
    with pytest.raises(ConfigError, match="YOKAI_SD_PYTHON"):
        launch_kohya(cfg, sd_scripts=sd)


def test_accelerate_command_is_an_argument_list(tmp_path, sd_scripts):
    cmd = kohya_launch.build_kohya_command(
        Path("/venv/bin/python"),
        sd_scripts,
        tmp_path / "c.toml",
        launcher="accelerate",
        base_model="/models/base.safetensors",
        resume=tmp_path / "char000-000002-state",
    )
    assert cmd[:5] == [
        "/venv/bin/python",
        "-m",
        "accelerate.commands.launch",
        "--num_cpu_threads_per_process",
        "1",
    ]
    assert cmd[5] == str(sd_scripts / "train_network.py")
    assert cmd[6:] == [
        "--config_file",
        str(tmp_path / "c.toml"),
        "--save_state",
        "--resume",
        str(tmp_path / "char000-000002-state"),
        "--pretrained_model_name_or_path",
        "/models/base.safetensors",
    ]


def test_launch_runs_script_relays_progress_and_marks_finished(tmp_path, sd_scripts, monkeypatch):
    monkeypatch.setenv(kohya_launch.ENV_SD_SCRIPTS, str(sd_scripts))
    monkeypatch.setenv(kohya_launch.ENV_SD_PYTHON, sys.executable)
    cfg = make_config(tmp_path)
    progress, lines = [], []
    result = launch_kohya(
        cfg,
        base_model="/models/base",
        on_progress=progress.append,
        on_line=lines.append,
        launcher="python",
        env={"FAKE_TRAIN_STEPS_PER_EPOCH": "3"},
    )
    out = tmp_path / "trained_models" / "char000"
    assert result["status"] == "finished" and result["returncode"] == 0
    assert result["checkpoint"] == str(out / "char000.safetensors")
    assert (result["step"], result["total_steps"], result["epoch"], result["total_epochs"]) == (6, 6, 2, 2)
    assert [p["step"] for p in progress if "step" in p][-1] == 6
    assert sorted({p["step"] for p in progress if "step" in p}) == [1, 2, 3, 4, 5, 6]
    assert progress[-1]["loss"] == pytest.approx(0.14)
    assert any("epoch 2/2" in line for line in lines)
    assert not any("\r" in line for line in lines)
    (call,) = calls(tmp_path)
    assert call["argv"][:3] == ["--config_file", str(cfg.resolve()), "--save_state"]
    assert call["base"] == "/models/base" and Path(call["cwd"]) == sd_scripts
    marker = json.loads((out / ".finished").read_text())
    assert marker["checkpoint"] == str(out / "char000.safetensors") and marker["backend"] == "kohya"

    again = launch_kohya(cfg, launcher="python")
    assert again["status"] == "skipped" and len(calls(tmp_path)) == 1  # not run again


def test_failure_carries_last_output_and_next_launch_resumes(tmp_path, sd_scripts):
    cfg = make_config(tmp_path)
    with pytest.raises(TrainingError, match=r"exited with code 1(.|\n)*CUDA out of memory") as err:
        launch_kohya(
            cfg,
            sd_scripts=sd_scripts,
            python=sys.executable,
            launcher="python",
            env={"FAKE_TRAIN_FAIL_AT_STEP": "5"},
        )
    assert str(cfg.resolve()) in str(err.value)
    out = tmp_path / "trained_models" / "char000"
    assert not (out / ".finished").exists()
    assert (out / "char000-000001-state" / "train_state.json").is_file()

    progress = []
    result = launch_kohya(
        cfg, sd_scripts=sd_scripts, python=sys.executable, launcher="python", on_progress=progress.append
    )
    assert result["status"] == "finished"
    assert result["resumed_from"] == str(out / "char000-000001-state")
    second = calls(tmp_path)[-1]["argv"]
    assert second[second.index("--resume") + 1] == str(out / "char000-000001-state")
    assert min(p["step"] for p in progress if "step" in p) == 4  # continued after the saved step 3


def test_newest_state_folder_is_chosen(tmp_path):
    out = tmp_path / "out"
    for name, step in (("c-000002-state", 20), ("c-000004-state", 40), ("c-step00000030-state", 30)):
        (out / name).mkdir(parents=True)
        (out / name / "train_state.json").write_text(json.dumps({"current_step": step}))
    (out / "c-000009-state").mkdir()  # empty: an interrupted save, not usable
    (out / "other-000010-state").mkdir()
    (out / "other-000010-state" / "train_state.json").write_text(json.dumps({"current_step": 99}))
    assert kohya_launch.find_resume_state(out, "c") == out / "c-000004-state"


@pytest.mark.slow
def test_accelerate_launch_path(tmp_path, sd_scripts):
    pytest.importorskip("accelerate", reason="accelerate not installed in this python")
    cfg = make_config(tmp_path, epochs=1)
    result = launch_kohya(
        cfg,
        sd_scripts=sd_scripts,
        python=sys.executable,
        launcher="auto",
        env={"FAKE_TRAIN_STEPS_PER_EPOCH": "2"},
    )
    assert result["command"][1:3] == ["-m", "accelerate.commands.launch"]
    assert result["status"] == "finished" and result["step"] == 2


def _cli():
    import typer

    from yokai_pipeline.commands import train as train_cmd

    app = typer.Typer()
    train_cmd.register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps `train` a named subcommand
        pass

    return app


def test_cli_kohya_without_sd_scripts_prints_what_to_set(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.delenv(kohya_launch.ENV_SD_SCRIPTS, raising=False)
    cfg = make_config(tmp_path)
    res = CliRunner().invoke(_cli(), ["train", str(cfg), "--backend", "kohya"], env={"COLUMNS": "300"})
    assert res.exit_code == 2
    assert "YOKAI_SD_SCRIPTS=/path/to/sd-scripts" in res.output and "--sd-scripts" in res.output
    assert calls(tmp_path) == []


def test_cli_kohya_failing_character_fails_alone(tmp_path, sd_scripts, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setenv(kohya_launch.ENV_SD_SCRIPTS, str(sd_scripts))
    monkeypatch.setenv(kohya_launch.ENV_SD_PYTHON, sys.executable)
    good, bad = make_config(tmp_path, "good", epochs=1), make_config(tmp_path, "bad", epochs=1)
    # "bad" has a corrupt saved state: the stand-in crashes when resuming from it
    (tmp_path / "trained_models" / "bad").mkdir(parents=True)
    (tmp_path / "trained_models" / "bad" / "bad-000001-state").mkdir()
    (tmp_path / "trained_models" / "bad" / "bad-000001-state" / "train_state.json").write_text("not json")
    res = CliRunner().invoke(
        _cli(),
        ["train", str(bad), str(good), "--backend", "kohya", "--launcher", "python"],
        env={"COLUMNS": "300"},
    )
    assert res.exit_code == 1, res.output
    assert (tmp_path / "trained_models" / "good" / ".finished").is_file()
    assert not (tmp_path / "trained_models" / "bad" / ".finished").exists()
    assert "1 of 2 failed" in res.output


def test_accelerate_device_args_pin_one_run_to_its_lease():
    one = kohya_launch.accelerate_device_args(["3"], port=29617)
    assert one == [
        "--num_processes",
        "1",
        "--gpu_ids",
        "3",
        "--main_process_port",
        "29617",
        "--num_cpu_threads_per_process",
        "1",
    ]
    ddp = kohya_launch.accelerate_device_args(["0", "1"], port=29618)
    assert ddp[:5] == ["--multi_gpu", "--num_processes", "2", "--gpu_ids", "0,1"]
    assert kohya_launch.accelerate_device_args([])[:3] == ["--num_processes", "1", "--cpu"]
    # each launch asks the OS for a free rendezvous port instead of accelerate's shared default 29500
    ports = {int(kohya_launch.accelerate_device_args(["0"])[5]) for _ in range(5)}
    assert 29500 not in ports and all(1024 < p < 65536 for p in ports)
    cmd = kohya_launch.build_kohya_command(
        Path("/venv/bin/python"), Path("/sd"), Path("c.toml"), accelerate_args=one
    )
    assert cmd[3:11] == one and cmd[11] == "/sd/train_network.py"
