"""Built-in trainer: the SDXL family on a tiny random SDXL model (CPU), families and bad input, re-training
after re-packaging, kohya's min-SNR weighting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.unit.test_training import make_character, one_thread  # noqa: F401 (autouse fixture)
from yokai_pipeline import training
from yokai_pipeline.errors import BadInputError, ConfigError

pytest.importorskip("diffusers", reason="the built-in trainer needs diffusers (pip install diffusers peft)")
pytest.importorskip("peft", reason="the built-in trainer needs peft (pip install diffusers peft)")

SDXL_ARGS = {"network_train_unet_only": True, "cache_text_encoder_outputs": True, "no_half_vae": True}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return training.build_tiny_sdxl_model(tmp_path_factory.mktemp("model") / "tiny-sdxl")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return training.build_tiny_sd_model(tmp_path_factory.mktemp("model") / "tiny-sd")


def test_tiny_sdxl_trains_unet_only_with_cached_text_encoder_outputs(tmp_path, tiny_sdxl):
    cfg = make_character(tmp_path, tiny_sdxl, n_images=4, epochs=2, extra=SDXL_ARGS)
    assert training.config_family(training.read_training_args(cfg)) == "sdxl"
    progress = []
    result = training.train_lora_builtin(cfg, device="cpu", on_progress=progress.append)
    assert result["status"] == "finished" and result["family"] == "sdxl" and result["global_step"] == 4
    with safe_open(result["checkpoint"], "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # UNet only
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_train_unet_only"] == "True"
    assert meta["ss_clip_skip"] == "None"  # sdxl_train_network.py ignores clip_skip
    val = json.loads((tmp_path / "trained_models" / "char000" / "validation_loss.json").read_text())
    assert [e["epoch"] for e in val["epochs"]] == [1, 2] and all(e["val_loss"] > 0 for e in val["epochs"])
    assert [p["step"] for p in progress if "val_loss" not in p] == [1, 2, 3, 4]

    # evidence: every epoch's checkpoint sampled by the SDXL pipeline, the page marks the best epoch
    from PIL import Image

    from yokai_pipeline import checkpoints

    report = checkpoints.render_checkpoint_evidence(cfg, device="cpu", num_inference_steps=2)
    assert report["family"] == "sdxl" and report["epochs"] == [1, 2]
    assert len(report["images"]) == 4 and all(Path(p).is_file() for p in report["images"])
    with Image.open(report["images"][0]) as im:
        assert im.size == (32, 32)
    html = Path(report["html"]).read_text(encoding="utf-8")
    assert "(sdxl)" in html and 'class="best"' in html and f"epoch {report['best_epoch']}" in html


def test_sdxl_batches_carry_size_and_crop_conditioning(tmp_path, tiny_sdxl):
    from yokai_pipeline.training.loop import load_batch, prepare_state

    # 40 x 32 images at a 32 px square bucket: resized to 40 x 32, centre crop 4 px from the left
    cfg = make_character(tmp_path, tiny_sdxl, n_images=2, validation_split=0.0, extra=SDXL_ARGS)
    state = prepare_state(cfg, training.load_base_model(tiny_sdxl, "sdxl"), device="cpu", resolution=None)
    items = state.specs[0].train
    batch = load_batch(state, 0, items, 1, True, 0)
    # SDXL add_time_ids: original (h, w), crop (top, left), target (h, w)
    assert batch["time_ids"].tolist() == [[32.0, 40.0, 0.0, 4.0, 32.0, 32.0]] * len(items)


def test_sdxl_text_encoder_outputs_match_the_reference_recipe(tiny_sdxl):
    import torch
    from diffusers import StableDiffusionXLPipeline

    model = training.load_base_model(tiny_sdxl, "sdxl")
    hidden, pooled = training.encode_sdxl_prompts(model, ["char000, standing"])
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    # diffusers' own SDXL prompt encoding (penultimate layers concatenated, pooled from encoder 2)
    ref, _, ref_pooled, _ = pipe.encode_prompt("char000, standing", do_classifier_free_guidance=False)
    assert hidden.shape == ref.shape == (1, 77, 64)
    assert torch.allclose(hidden, ref, atol=1e-5) and torch.allclose(pooled, ref_pooled, atol=1e-5)


# ------------------------------------------------------------------ bad input, before any step


def test_sd15_base_model_for_family_sdxl_fails_before_training(tmp_path, tiny_sd):
    cfg = make_character(tmp_path, tiny_sd, extra=SDXL_ARGS)
    with pytest.raises(ConfigError, match=r"is an SD 1.x model .*family is 'sdxl'"):
        training.train_lora_builtin(cfg, device="cpu")
    out = tmp_path / "trained_models" / "char000"
    assert not out.exists() or not any(out.iterdir())  # nothing ran


def test_sdxl_base_model_for_family_sd15_fails_too(tmp_path, tiny_sdxl):
    cfg = make_character(tmp_path, tiny_sdxl)
    with pytest.raises(ConfigError, match="is an SDXL model"):
        training.train_lora_builtin(cfg, device="cpu")


def test_unknown_family_and_missing_base_model(tmp_path, tiny_sd):
    cfg = make_character(tmp_path, tiny_sd)
    with pytest.raises(ConfigError, match=r"unknown model family 'sd3'.*\['sd15', 'sdxl'\]"):
        training.train_lora_builtin(cfg, device="cpu", family="sd3")
    missing = tmp_path / "no-such-model"
    with pytest.raises(BadInputError, match="base model not found") as err:
        training.train_lora_builtin(cfg, device="cpu", base_model_override=str(missing))
    assert str(missing) in str(err.value)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(BadInputError, match="not a diffusers model folder"):
        training.check_base_model(not_a_model, "sd15")


def test_single_file_family_is_read_from_its_keys(tmp_path):
    import torch
    from safetensors.torch import save_file

    xl, sd1 = tmp_path / "xl.safetensors", tmp_path / "sd1.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(xl))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, str(sd1))
    assert training.detect_family(xl) == "sdxl" and training.detect_family(sd1) == "sd15"
    with pytest.raises(ConfigError, match="is an SDXL model"):
        training.check_base_model(xl, "sd15")


# ------------------------------------------------------------------ re-packaging re-trains


def test_changed_dataset_or_config_trains_again(tmp_path, tiny_sd):
    cfg = make_character(tmp_path, tiny_sd, n_images=3, epochs=1, validation_split=0.0)
    first = training.train_lora_builtin(cfg, device="cpu")
    assert first["status"] == "finished"
    assert training.train_lora_builtin(cfg, device="cpu")["status"] == "skipped"

    caption = sorted((tmp_path / "training_data" / "1_char000").glob("*.txt"))[0]
    caption.write_text("char000, blue hat, re-captioned\n", encoding="utf-8")
    again = training.train_lora_builtin(cfg, device="cpu")
    assert again["status"] == "finished" and again["resumed_from_step"] is None and again["global_step"] == 2
    assert training.train_lora_builtin(cfg, device="cpu")["status"] == "skipped"

    cfg.write_text(cfg.read_text().replace("seed = 3", "seed = 4"), encoding="utf-8")
    assert training.train_lora_builtin(cfg, device="cpu")["status"] == "finished"


# ------------------------------------------------------------------ kohya's min-SNR weighting


def test_min_snr_weight_follows_kohya_for_epsilon_and_v_prediction():
    import torch

    snr = torch.tensor([4.0, 9.0])
    # kohya apply_snr_weight: min(snr, gamma) / snr; v-prediction: min(snr, gamma) / (snr + 1)
    assert torch.allclose(training.snr_weight(snr, 5.0, False), torch.tensor([1.0, 5 / 9]))
    assert torch.allclose(training.snr_weight(snr, 5.0, True), torch.tensor([4 / 5, 5 / 10]))
