"""Peak memory of the built-in trainer stays flat as characters are added (one base model per process).

A fresh process (``tests/fixtures/peak_rss_training.py``) trains 4 characters one after another,
as the training flow does on one device, and reports the peak RSS of each character's training
(the kernel's VmHWM, reset before each one). The base model is made big enough (a
256/512-wide UNet: 190 MiB of fp32 weights) that one extra resident copy stands well out of the
allocator's noise; a second process that gives each character its own base model shows the test
sees that regression.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the built-in trainer needs diffusers (pip install diffusers peft)")
pytest.importorskip("peft", reason="the built-in trainer needs peft (pip install diffusers peft)")

from yokai_pipeline import training  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "fixtures" / "peak_rss_training.py"
MIB = 1024 * 1024


def _peak(configs: list[Path], own_copies: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(SCRIPT), *(["--own-copies"] if own_copies else []), *map(str, configs)]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _base_mib(model: Path) -> float:
    """The base model's weights as loaded (fp32 safetensors: file size = resident tensor bytes)."""
    return sum(p.stat().st_size for p in model.rglob("*.safetensors")) / MIB


@pytest.mark.slow  # two fresh processes, each importing torch + diffusers and training 4 characters
def test_peak_rss_after_four_characters_is_that_after_one(tmp_path):
    from tests.unit.test_training import make_character

    model = training.build_tiny_sd_model(tmp_path / "sd", block_out_channels=(256, 512))
    base = _base_mib(model)
    # fresh characters for each process: a finished one would be skipped
    runs = {
        run: [make_character(tmp_path / run / f"c{i}", model, n_images=4, epochs=1) for i in range(4)]
        for run in ("cached", "own")
    }
    cached = _peak(runs["cached"])
    own = _peak(runs["own"], own_copies=True)
    print(
        f"base model {base:.0f} MiB; peak RSS after 1..4 characters: {[round(p) for p in cached['peak_mib']]} MiB "
        f"(one base model), {[round(p) for p in own['peak_mib']]} MiB (a base model per character)"
    )
    assert cached["loads"] == 1 and own["loads"] == 4
    one = cached["peak_mib"][0]
    # margin: half a base model. Every extra resident copy adds a whole one, so even one more copy
    # fails; half a copy leaves room for the allocator's growth over 3 more trainings
    assert max(cached["peak_mib"][1:]) <= one + 0.5 * base
    # the control: the same measurement sees the regression. At the fourth character a base model
    # per character holds 3 more copies (at least 2 more, whatever the first training's transients)
    assert own["peak_mib"][3] >= cached["peak_mib"][3] + 2 * base
