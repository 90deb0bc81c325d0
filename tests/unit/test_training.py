"""Built-in LoRA trainer and checkpoint evidence, on a tiny random SD-1.5-style model (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image

from yokai_pipeline import training
from yokai_pipeline.errors import BadInputError

pytest.importorskip("diffusers", reason="the built-in trainer needs diffusers (pip install diffusers peft)")
pytest.importorskip("peft", reason="the built-in trainer needs peft (pip install diffusers peft)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared CPU: one thread avoids the sync cost of several (10x here).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return training.build_tiny_sd_model(tmp_path_factory.mktemp("model") / "tiny-sd")


def write_images(
    folder: Path, n: int, *, size=(40, 32), prefix="img", rgba=True, caption="char000, red hat"
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(prefix) + n)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 4 if rgba else 3), dtype=np.uint8)
        if rgba:
            arr[..., 3] = 0
            arr[4:-4, 6:-6, 3] = 255  # an opaque "character" on a transparent canvas
        p = folder / f"{prefix}_{i:03d}.png"
        Image.fromarray(arr, "RGBA" if rgba else "RGB").save(p)
        p.with_suffix(".txt").write_text(f"{caption}, pose {i}\n", encoding="utf-8")
        paths.append(p)
    return paths


def make_character(
    root: Path,
    base_model: Path | str,
    *,
    n_images: int = 4,
    repeats: int = 1,
    epochs: int = 2,
    batch_size: int = 2,
    validation_split: float = 0.25,
    lr: float = 1e-3,
    alpha_mask: bool = True,
    extra: dict | None = None,
) -> Path:
    """A packaged kohya character: RGBA images + .txt captions, dataset TOML, training TOML."""
    image_dir = root / "training_data" / f"{repeats}_char000"
    write_images(image_dir, n_images)
    cfg_dir = root / "training_data" / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    dataset = {
        "general": {"shuffle_caption": True, "keep_tokens": 1, "caption_extension": ".txt"},
        "datasets": [
            {
                "resolution": 32,
                "batch_size": batch_size,
                "validation_split": validation_split,
                "validation_seed": 7,
                "subsets": [{"image_dir": str(image_dir), "num_repeats": repeats, "alpha_mask": alpha_mask}],
            }
        ],
    }
    (cfg_dir / "char000_dataset.toml").write_bytes(tomli_w.dumps(dataset).encode())
    args = {
        "pretrained_model_name_or_path": str(base_model),
        "output_dir": str(root / "trained_models" / "char000"),
        "output_name": "char000",
        "save_model_as": "safetensors",
        "save_every_n_epochs": 1,
        "max_train_epochs": epochs,
        "train_batch_size": batch_size,
        "learning_rate": lr,
        "unet_lr": lr,
        "text_encoder_lr": lr / 2,
        "network_module": "networks.lora",
        "network_dim": 4,
        "network_alpha": 2.0,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "noise_offset": 0.05,
        "seed": 3,
        "logging_dir": str(root / "trained_models" / "char000" / "logs"),
        "sample_prompts": str(cfg_dir / "char000_prompts.txt"),
        "dataset_config": str(cfg_dir / "char000_dataset.toml"),
        "masked_loss": alpha_mask,
        "alpha_mask": alpha_mask,
        # as yokai_pipeline.kohya writes them
        "clip_skip": 2,
        "lr_scheduler": "cosine",
        "save_precision": "fp16",
        "cache_latents": True,
        "sample_sampler": "euler_a",
        "log_with": "tensorboard",
        **(extra or {}),
    }
    (cfg_dir / "char000_prompts.txt").write_text(
        "# evidence prompts\nchar000, standing --n lowres --w 32 --h 32 --d 1 --l 7 --s 2\n"
        "char000, smiling <b>wink</b> --w 32 --h 32 --d 2 --s 2\n",
        encoding="utf-8",
    )
    path = cfg_dir / "char000_config.toml"
    path.write_bytes(
        tomli_w.dumps(
            {
                "model": {k: v for k, v in args.items() if k.startswith("pre")},
                "train": {k: v for k, v in args.items() if not k.startswith("pre")},
            }
        ).encode()
    )
    return path


# ------------------------------------------------------------------ dataset reading (no model)


def test_dataset_is_read_with_kohya_fallbacks_and_split(tmp_path):
    cfg = make_character(tmp_path, "unused", n_images=10, repeats=3, validation_split=0.2)
    args = training.read_training_args(cfg)
    assert args["pretrained_model_name_or_path"] == "unused"  # sections are flattened
    specs = training.list_dataset_images(training.read_dataset_config(args, cfg))
    spec = specs[0]
    sub = spec.subsets[0].params
    assert sub["caption_extension"] == ".txt" and sub["keep_tokens"] == 1 and sub["shuffle_caption"] is True
    assert spec.resolution == (32, 32) and spec.batch_size == 2
    # kohya: train = first ceil(0.8 * 10) of a seeded shuffle, validation = last round(0.2 * 10)
    assert len(spec.train) == 8 and len(spec.validation) == 2
    train_paths = {i.path for i in spec.train}
    val_paths = {i.path for i in spec.validation}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 10
    assert all(i.repeats == 3 for i in spec.train) and all(i.repeats == 1 for i in spec.validation)
    assert spec.train[0].caption.startswith("char000, red hat, pose")
    # the same seed gives the same split, as in kohya
    again = training.list_dataset_images(training.read_dataset_config(args, cfg))[0]
    assert {i.path for i in again.validation} == val_paths
    # one epoch = images x repeats / batch size
    assert len(training.plan_epoch(specs, 0, 1)) == 8 * 3 // 2


def test_train_data_dir_folder_convention_skips_folders_without_repeats(tmp_path):
    data = tmp_path / "data"
    write_images(data / "5_char001 girl", 2, rgba=False)
    write_images(data / "validation", 3, rgba=False)
    (data / "5_char001 girl" / "img_000.txt").unlink()
    cfg = tmp_path / "cfg.toml"
    cfg.write_bytes(
        tomli_w.dumps(
            {"train_data_dir": str(data), "resolution": "32,32", "caption_extension": ".txt"}
        ).encode()
    )
    specs = training.list_dataset_images(training.read_dataset_config(training.read_training_args(cfg), cfg))
    items = specs[0].train
    assert len(items) == 2 and all(i.repeats == 5 for i in items)
    assert {i.path.parent.name for i in items} == {"5_char001 girl"}
    # no caption file -> class tokens from the folder name
    assert sorted(i.caption for i in items) == ["char000, red hat, pose 1", "char001 girl"]


def test_missing_resolution_names_the_dataset_file(tmp_path):
    cfg = make_character(tmp_path, "unused")
    ds = tmp_path / "training_data" / "configs" / "char000_dataset.toml"
    import tomllib

    data = tomllib.loads(ds.read_text())
    del data["datasets"][0]["resolution"]
    ds.write_bytes(tomli_w.dumps(data).encode())
    with pytest.raises(BadInputError, match="char000_dataset.toml.*resolution"):
        training.read_dataset_config(training.read_training_args(cfg), cfg)


def test_caption_keep_tokens_survive_shuffle():
    import random

    params = {"shuffle_caption": True, "keep_tokens": 1, "caption_separator": ","}
    seen = {training.process_caption("char000, a, b, c, d", params, random.Random(s)) for s in range(20)}
    assert all(c.startswith("char000, ") for c in seen)
    assert len(seen) > 1  # the rest is shuffled
    assert all(sorted(c.split(", ")) == sorted("char000, a, b, c, d".split(", ")) for c in seen)


def test_buckets_follow_aspect_ratio():
    buckets = training.make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and all(w * h <= 512 * 512 for w, h in buckets)
    reso, resized = training.select_bucket((300, 600), buckets)
    assert reso[1] > reso[0]
    assert resized[0] >= reso[0] and resized[1] >= reso[1]  # covers the bucket, then centre crop


def test_rgba_is_masked_or_composited(tmp_path):
    p = write_images(tmp_path, 1, size=(32, 32))[0]
    arr, mask = training.load_training_image(p, (32, 32), (32, 32), alpha_mask=True)
    assert mask is not None and mask[0, 0] == 0.0 and mask[16, 16] == 1.0
    flat, none = training.load_training_image(p, (32, 32), (32, 32), alpha_mask=False)
    assert none is None
    assert np.allclose(flat[0, 0], 1.0)  # transparent corner composited onto white
    assert arr.shape == (32, 32, 3) and arr.min() >= -1 and arr.max() <= 1


# ------------------------------------------------------------------ training on the tiny model


def _unet_output(pipe, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(
        ["char000, standing"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        enc = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([500]), enc).sample


def test_builtin_trainer_writes_kohya_lora_that_diffusers_loads(tmp_path, tiny_model):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    # UNet only: diffusers loads text-encoder LoRAs through transformers, which wants peft>=0.22
    # (the text-encoder part is checked in the resume test and by the evidence loader).
    cfg = make_character(tmp_path, tiny_model, n_images=4, epochs=2, extra={"network_train_unet_only": True})
    progress = []
    result = training.train_lora_builtin(cfg, device="cpu", on_progress=progress.append)
    out = tmp_path / "trained_models" / "char000"
    assert result["status"] == "finished" and result["global_step"] == 4  # 3 train images, batch 2, 2 epochs
    assert [p["step"] for p in progress if "val_loss" not in p] == [1, 2, 3, 4]
    final = out / "char000.safetensors"
    assert Path(result["checkpoint"]) == final and (out / "char000-000001.safetensors").is_file()

    with safe_open(str(final), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert not any(k.startswith("lora_te") for k in keys)
    assert float(alpha) == 2.0  # network_alpha, not the rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "char000"
    assert meta["ss_epoch"] == "2" and meta["ss_steps"] == "4" and float(meta["ss_training_started_at"]) > 0
    assert len(meta["sshs_model_hash"]) == 64

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    before = _unet_output(pipe)
    pipe.load_lora_weights(str(out), weight_name="char000.safetensors")
    after = _unet_output(pipe)
    assert (after - before).abs().max() > 1e-6

    val = json.loads((out / "validation_loss.json").read_text())
    assert [e["epoch"] for e in val["epochs"]] == [1, 2]
    assert all(isinstance(e["val_loss"], float) and np.isfinite(e["val_loss"]) for e in val["epochs"])
    assert val["best_epoch"] in (1, 2)
    assert json.loads((out / ".finished").read_text())["checkpoint"] == str(final)
    # finished character is skipped
    again = training.train_lora_builtin(cfg, device="cpu")
    assert again["status"] == "skipped" and again["checkpoint"] == str(final)


def test_interrupted_training_resumes_from_saved_step(tmp_path, tiny_model):
    from safetensors.torch import load_file

    full_cfg = make_character(tmp_path / "full", tiny_model, n_images=4, epochs=2)
    cut_cfg = make_character(tmp_path / "cut", tiny_model, n_images=4, epochs=2)
    full = training.train_lora_builtin(full_cfg, device="cpu")

    first = training.train_lora_builtin(cut_cfg, device="cpu", max_steps=3)  # stops mid-epoch 2
    out = tmp_path / "cut" / "trained_models" / "char000"
    assert first["status"] == "stopped" and first["global_step"] == 3
    assert (out / "char000-step00000003.safetensors").is_file() and not (out / ".finished").exists()
    state = json.loads((out / "char000-builtin-state" / "train_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (3, 2, 1)

    steps = []
    second = training.train_lora_builtin(cut_cfg, device="cpu", on_progress=steps.append)
    assert second["status"] == "finished" and second["resumed_from_step"] == 3
    assert [p["step"] for p in steps if "val_loss" not in p] == [4]
    a, b = load_file(full["checkpoint"]), load_file(second["checkpoint"])
    assert a.keys() == b.keys()
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in a)  # SD1 text-encoder naming
    for k in a:
        assert np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6), k
    val = json.loads((out / "validation_loss.json").read_text())
    assert [e["epoch"] for e in val["epochs"]] == [1, 2]


# ------------------------------------------------------------------ checkpoint evidence


def test_checkpoint_evidence_grid_marks_best_epoch(tmp_path, tiny_model):
    from yokai_pipeline import checkpoints

    cfg = make_character(tmp_path, tiny_model, n_images=4, epochs=2)
    training.train_lora_builtin(cfg, device="cpu")
    report = checkpoints.render_checkpoint_evidence(cfg, device="cpu", num_inference_steps=2)
    html = Path(report["html"]).read_text(encoding="utf-8")
    assert report["epochs"] == [1, 2] and len(report["prompts"]) == 2
    assert len(report["images"]) == 4 and all(Path(p).is_file() for p in report["images"])
    with Image.open(report["images"][0]) as im:
        assert im.size == (32, 32)
    assert "<polyline" in html and 'class="best"' in html
    assert f"epoch {report['best_epoch']}" in html
    assert "char000, standing" in html
    assert "&lt;b&gt;wink&lt;/b&gt;" in html and "<b>wink" not in html  # prompts are escaped

    # the text-encoder half of the LoRA is applied while sampling and removed afterwards
    import torch

    pipe = checkpoints.load_sampling_pipeline(str(tiny_model), "cpu")
    ids = pipe.tokenizer(["char000"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        final = tmp_path / "trained_models" / "char000" / "char000.safetensors"
        with checkpoints._LoraApplied(pipe, final):
            during = pipe.text_encoder(ids)[0]
        after = pipe.text_encoder(ids)[0]
    assert (during - before).abs().max() > 1e-6
    assert torch.allclose(after, before, atol=1e-5)


def test_sample_prompt_flags_parse_like_kohya():
    from yokai_pipeline.checkpoints import parse_sample_prompt

    p = parse_sample_prompt(
        "char000, standing pose --n lowres, bad <hands> --w 512 --h 768 --d 1 --l 7.5 --s 28 --ss euler_a"
    )
    assert p == {
        "prompt": "char000, standing pose",
        "negative_prompt": "lowres, bad <hands>",
        "width": 512,
        "height": 768,
        "seed": 1,
        "guidance_scale": 7.5,
        "steps": 28,
        "sampler": "euler_a",
    }


def test_cli_train_builtin_reports_stopped_run(tmp_path, tiny_model):
    import typer
    from typer.testing import CliRunner

    from yokai_pipeline.commands import train as train_cmd

    app = typer.Typer()
    train_cmd.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `train` a named subcommand
    cfg = make_character(tmp_path, tiny_model, n_images=4, epochs=2)
    res = CliRunner().invoke(
        app, ["train", str(cfg), "--max-steps", "1", "--device", "cpu"], env={"COLUMNS": "200"}
    )
    assert res.exit_code == 0, res.output
    assert "stopped" in res.output
    assert (tmp_path / "trained_models" / "char000" / "char000-step00000001.safetensors").is_file()
