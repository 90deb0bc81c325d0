"""Training on a host with (fake) GPUs: one training per device at a time, each pinned to its lease."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

import pytest
import tomli_w

from yokai_pipeline import runtime
from yokai_pipeline.config import PipelineConfig

pytestmark = pytest.mark.usefixtures("prefect_harness")

FAKE = Path(__file__).resolve().parents[1] / "fixtures" / "fake_train_network.py"


def _package(root: Path, names: list[str], batch: int = 2) -> None:
    """Training configs and the preparation summary the dataset flow would write."""
    configs = root / "training_data" / "characters" / "configs"
    configs.mkdir(parents=True)
    chars = []
    for name in names:
        cfg = configs / f"{name}_config.toml"
        training = {
            "output_dir": str(root / "trained_models" / name),
            "output_name": name,
            "max_train_epochs": 1,
            "save_every_n_epochs": 1,
            "train_batch_size": batch,
            "learning_rate": 1e-4,
        }
        cfg.write_bytes(tomli_w.dumps({"training": training}).encode())
        chars.append({"name": name, "config": str(cfg)})
    (configs / "preparation_summary.json").write_text(json.dumps({"characters": chars}))
    # training starts only on validated data (the guide); this report is what validation writes
    report = root / "logs" / "validation_report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"passed": True, "valid_percent": 100.0}))


@pytest.fixture
def kohya_host(tmp_path, monkeypatch):
    """sd-scripts stand-in, two fake GPUs, a private lease folder, a log of every training run."""
    sd = tmp_path / "sd-scripts"
    sd.mkdir()
    shutil.copy(FAKE, sd / "train_network.py")
    log = tmp_path / "runs.jsonl"
    monkeypatch.setenv(runtime.ENV_FAKE_GPUS, "2")
    monkeypatch.setenv(runtime.ENV_LEASE_DIR, str(tmp_path / "leases"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("FAKE_TRAIN_LOG", str(log))
    monkeypatch.setenv("FAKE_TRAIN_STEPS_PER_EPOCH", "4")
    monkeypatch.setenv("FAKE_TRAIN_STEP_SECONDS", "0.15")
    return sd, log


def _overlaps(runs: list[dict]) -> int:
    """Most runs alive at one instant."""
    events = sorted(itertools.chain(((r["start"], 1) for r in runs), ((r["end"], -1) for r in runs)))
    alive = worst = 0
    for _, step in events:  # an end sorts before a start at the same instant (-1 < 1)
        alive += step
        worst = max(worst, alive)
    return worst


def test_eight_characters_on_two_devices_never_share_one(tmp_path, kohya_host):
    from flows.training import training_flow

    sd, log = kohya_host
    names = [f"char{i:03d}" for i in range(8)]
    _package(tmp_path, names)
    cfg = PipelineConfig()
    cfg.training.backend = "kohya"
    cfg.training.sd_scripts = sd
    # a python without accelerate runs the script directly (fast start); CUDA_VISIBLE_DEVICES pins it
    cfg.training.python = Path(shutil.which("python3") or sys.executable)
    cfg.training.evidence = False
    out = training_flow(str(tmp_path), cfg)

    assert out["finished"] == 8 and out["failed"] == 0
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["name"] for r in runs) == names
    by_device = {d: [r for r in runs if r["cuda_visible_devices"] == d] for d in ("0", "1")}
    assert {r["cuda_visible_devices"] for r in runs} == {"0", "1"}, "each run sees exactly one GPU"
    for device, rs in by_device.items():
        assert _overlaps(rs) == 1, f"two trainings at once on GPU {device}"
    assert _overlaps(runs) <= 2
    rec = out["runs"]["char000"]
    assert rec["gpus"] == 1 and rec["effective_batch_size"] == 2 and rec["learning_rate"] == 1e-4
    assert rec["device"] in ("fake-gpu:0", "fake-gpu:1")


@pytest.mark.slow  # two accelerate launches (torch import each)
def test_ddp_run_holds_two_devices_and_records_the_effective_batch(tmp_path, kohya_host):
    pytest.importorskip("accelerate", reason="accelerate not installed in this python")
    from flows.training import training_flow

    sd, log = kohya_host
    _package(tmp_path, ["char000", "char001"], batch=3)
    cfg = PipelineConfig()
    cfg.training.backend = "kohya"
    cfg.training.sd_scripts = sd
    cfg.training.python = Path(sys.executable)
    cfg.training.evidence = False
    cfg.training.gpus_per_run = 2
    out = training_flow(str(tmp_path), cfg)

    runs = [json.loads(line) for line in log.read_text().splitlines()]
    # accelerate --multi_gpu starts one process per GPU, each seeing the pair
    assert sorted(r["name"] for r in runs) == ["char000", "char000", "char001", "char001"]
    assert {r["cuda_visible_devices"] for r in runs} == {"0,1"}
    first = [r for r in runs if r["name"] == "char000"]
    second = [r for r in runs if r["name"] == "char001"]
    assert max(r["end"] for r in first) <= min(r["start"] for r in second) or max(
        r["end"] for r in second
    ) <= min(r["start"] for r in first), "two DDP runs on the same pair at once"
    rec = out["runs"]["char001"]
    assert rec["gpus"] == 2 and rec["train_batch_size"] == 3 and rec["effective_batch_size"] == 6
    assert rec["learning_rate"] == 1e-4  # DDP does not rescale it; recorded as trained
