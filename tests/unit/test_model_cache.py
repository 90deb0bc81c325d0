"""Built-in trainer: one base model per process per device, no LoRA leaking from one character to the next."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the built-in trainer needs diffusers (pip install diffusers peft)")
pytest.importorskip("peft", reason="the built-in trainer needs peft (pip install diffusers peft)")

from yokai_pipeline import training  # noqa: E402
from yokai_pipeline.training import model_cache  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return training.build_tiny_sd_model(tmp_path_factory.mktemp("model") / "tiny-sd")


def _character(root: Path, model: Path, n_images: int) -> Path:
    from tests.unit.test_training import make_character

    return make_character(root, model, n_images=n_images, epochs=1, lr=5e-3)


def _lora(cfg: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(cfg.parents[2] / "trained_models" / "char000" / "char000.safetensors"))


def _train(cfg: Path) -> dict:
    result = training.train_lora_builtin(cfg, device="cpu")
    assert result["status"] == "finished", result
    return _lora(cfg)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_characters_in_one_process_train_as_they_would_alone(tmp_path, tiny_model):
    chars = {n: _character(tmp_path / f"alone-{n}", tiny_model, n) for n in (4, 5)}
    alone = {}
    for n, cfg in chars.items():
        model_cache.clear()  # a fresh process each: its own base model
        alone[n] = _train(cfg)
    assert not _same(alone[4], alone[5]), "different characters must give different LoRAs"

    model_cache.clear()
    loads = model_cache.load_count()
    together = {n: _train(_character(tmp_path / f"together-{n}", tiny_model, n)) for n in (4, 5)}
    assert model_cache.load_count() - loads == 1, "the second character reuses the first one's base model"
    assert _same(together[4], alone[4]) and _same(together[5], alone[5])


def test_model_stays_the_size_of_the_base_as_characters_are_added(tmp_path, tiny_model):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    base_params = sum(p.numel() for p in base.parameters())
    model_cache.clear()
    loads = model_cache.load_count()
    for i in range(4):
        _train(_character(tmp_path / f"c{i}", tiny_model, 4 + i % 2))
        assert model_cache.load_count() - loads == 1  # one base model however many characters
        with model_cache.base_model(tiny_model, "sd15", "cpu", "torch.float32") as model:
            # no adapter of an earlier character is left: the UNet holds exactly the base weights
            assert sum(p.numel() for p in model.unet.parameters()) == base_params
            assert not any(".lora_" in k for k in model.unet.state_dict())
            assert not any(".lora_" in k for te in model.text_encoders for k in te.state_dict())
    model_cache.clear()
