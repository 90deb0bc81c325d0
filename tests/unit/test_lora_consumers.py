"""The LoRA files of the built-in trainer, read by the three consumers' own naming rules (no download).

- sd-scripts (networks/lora.py ``create_network_from_weights``): a module is created for every
  ``<prefix>_<module path>`` of a Linear / 1x1 Conv inside the UNet's Transformer2DModel blocks and
  the text encoders' attention + MLP, named after sd-scripts' own models (SD 1.x UNet: diffusers'
  names; SDXL UNet: SGM's input_blocks / middle_block / output_blocks); dims from ``lora_down``.
- diffusers (``load_lora_weights``, kohya -> diffusers conversion in loaders/lora_conversion_utils.py).
- ComfyUI (comfy/lora.py ``model_lora_keys_unet`` / ``model_lora_keys_clip`` with
  comfy/utils.py ``unet_to_diffusers``).

The expected key sets are re-derived here from the models' module names and configs, following
each consumer's own loops, never from the exporter.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_training import make_character, one_thread  # noqa: F401 (autouse fixture)
from yokai_pipeline import training

pytest.importorskip("diffusers", reason="the built-in trainer needs diffusers (pip install diffusers peft)")
pytest.importorskip("peft", reason="the built-in trainer needs peft (pip install diffusers peft)")

# comfy/lora.py LORA_CLIP_MAP values: the text-encoder modules every consumer names.
CLIP_MODULES = (
    "mlp_fc1",
    "mlp_fc2",
    "self_attn_k_proj",
    "self_attn_q_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
)
# comfy/utils.py: the weights of a transformer layer's Linear / 1x1 conv modules.
ATTENTION_WEIGHTS = ("proj_in.weight", "proj_out.weight")
TRANSFORMER_WEIGHTS = tuple(
    f"{a}.{m}.weight" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")
) + ("ff.net.0.proj.weight", "ff.net.2.weight")


def _train(root: Path, model_dir: Path, family: str, extra: dict) -> Path:
    cfg = make_character(
        root, model_dir, n_images=3, epochs=1, batch_size=2, validation_split=0.0, extra=extra
    )
    res = training.train_lora_builtin(cfg, device="cpu", family=family)
    assert res["status"] == "finished" and res["family"] == family
    return Path(res["checkpoint"])


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd15")
    model_dir = training.build_tiny_sd_model(root / "tiny-sd")
    return model_dir, _train(root / "run", model_dir, "sd15", {})


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sdxl")
    model_dir = training.build_tiny_sdxl_model(root / "tiny-sdxl")
    # both text encoders trained, so the file has all three parts
    return model_dir, _train(
        root / "run", model_dir, "sdxl", {"network_train_unet_only": False, "no_half_vae": True}
    )


def diffusers_modules(converted: dict) -> dict[str, set[str]]:
    """Module paths per part that diffusers injects for a converted kohya state dict.

    The steps of load_lora_weights after its kohya conversion: the UNet part through
    convert_unet_state_dict_to_peft, text-encoder parts through convert_state_dict_to_diffusers
    then convert_state_dict_to_peft.
    """
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    parts: dict[str, dict] = {}
    for key, value in converted.items():
        part, _, rest = key.partition(".")
        parts.setdefault(part, {})[rest] = value
    out = {}
    for part, sd in parts.items():
        peft_sd = (
            convert_unet_state_dict_to_peft(sd)
            if part == "unet"
            else convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        )
        out[part] = {k.split(".lora_")[0] for k in peft_sd}
    return out


def _lora_names(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            name, _, kind = key.partition(".")
            out.setdefault(name, {})[kind] = tuple(f.get_slice(key).get_shape())
    return out


# ------------------------------------------------------------------ consumers' rules, re-derived


def comfy_unet_to_diffusers(unet_cfg: dict) -> dict[str, str]:
    """comfy.utils.unet_to_diffusers restricted to transformer weights: diffusers key -> SGM key.

    ComfyUI's unet_config from the diffusers one: num_res_blocks per block, transformer depth per
    down / up layer (0 in blocks without cross-attention), the middle block's depth.
    """
    lpb = unet_cfg["layers_per_block"]
    n_blocks = len(unet_cfg["block_out_channels"])
    depths = unet_cfg["transformer_layers_per_block"]
    depths = [depths] * n_blocks if isinstance(depths, int) else list(depths)
    cross = ["CrossAttn" in t for t in unet_cfg["down_block_types"]]
    depth_in = [depths[x] if cross[x] else 0 for x in range(n_blocks) for _ in range(lpb)]
    depth_out = [depths[x] if cross[x] else 0 for x in range(n_blocks) for _ in range(lpb + 1)]
    out: dict[str, str] = {}

    def layer(diff: str, sgm: str, n_t: int) -> None:
        for w in ATTENTION_WEIGHTS:
            out[f"{diff}.{w}"] = f"{sgm}.{w}"
        for t in range(n_t):
            for w in TRANSFORMER_WEIGHTS:
                out[f"{diff}.transformer_blocks.{t}.{w}"] = f"{sgm}.transformer_blocks.{t}.{w}"

    for x in range(n_blocks):
        n = 1 + (lpb + 1) * x
        for i in range(lpb):
            d = depth_in.pop(0)
            if d:
                layer(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", d)
            n += 1
    layer("mid_block.attentions.0", "middle_block.1", depths[-1])
    for x in range(n_blocks):
        n = (lpb + 1) * x
        for i in range(lpb + 1):
            d = depth_out.pop()
            if d:
                layer(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", d)
            n += 1
    return out


def comfy_key_map(unet_cfg: dict, sdxl: bool, n_te_layers: int) -> set[str]:
    """The kohya-style LoRA names comfy/lora.py accepts for this model (UNet + CLIP)."""
    names = set()
    for diff, sgm in comfy_unet_to_diffusers(unet_cfg).items():
        names.add("lora_unet_" + diff[: -len(".weight")].replace(".", "_"))
        if sdxl:  # the SGM model's own state-dict keys (comfy's diffusion_model.* loop)
            names.add("lora_unet_" + sgm[: -len(".weight")].replace(".", "_"))
    prefixes = ("lora_te1", "lora_te2") if sdxl else ("lora_te", "lora_te1")
    for p in prefixes:
        names |= {f"{p}_text_model_encoder_layers_{b}_{c}" for b in range(n_te_layers) for c in CLIP_MODULES}
    return names


def sd_scripts_sdxl_unet_names(unet_cfg: dict) -> set[str]:
    """networks/lora.py on sdxl_original_unet: every Linear under a Transformer2DModel (SGM names)."""
    return {
        "lora_unet_" + sgm[: -len(".weight")].replace(".", "_")
        for sgm in comfy_unet_to_diffusers(unet_cfg).values()
    }


def sd_scripts_sd1_unet_names(unet) -> set[str]:
    """networks/lora.py on SD 1.x: Linear / 1x1 Conv children of Transformer2DModel, diffusers' names."""
    import torch

    names = set()
    for name, module in unet.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for child_name, child in module.named_modules():
            is_1x1 = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
            if isinstance(child, torch.nn.Linear) or is_1x1:
                names.add(f"lora_unet_{name}.{child_name}".replace(".", "_"))
    return names


def sd_scripts_te_names(prefix: str, n_layers: int) -> set[str]:
    """networks/lora.py on CLIPAttention + CLIPMLP (q/k/v/out_proj, fc1/fc2) of each layer."""
    return {f"{prefix}_text_model_encoder_layers_{b}_{c}" for b in range(n_layers) for c in CLIP_MODULES}


def _check_shapes(names: dict[str, dict[str, tuple[int, ...]]], dim: int) -> None:
    for name, parts in names.items():
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"}, name
        assert parts["lora_down.weight"][0] == dim and parts["lora_up.weight"][1] == dim, name
        assert parts["alpha"] == (), name


# ------------------------------------------------------------------ SD 1.5


def test_sd15_lora_names_follow_sd_scripts_and_comfy(sd15):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    model_dir, lora = sd15
    names = _lora_names(lora)
    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    n_layers = CLIPTextConfig.from_pretrained(str(model_dir / "text_encoder")).num_hidden_layers
    expected = sd_scripts_sd1_unet_names(unet) | sd_scripts_te_names("lora_te", n_layers)
    assert set(names) == expected  # same modules as kohya's networks.lora: same capacity at a dim
    assert any("proj_in" in n for n in names) and any("ff_net_2" in n for n in names)
    _check_shapes(names, dim=4)
    assert set(names) <= comfy_key_map(dict(unet.config), sdxl=False, n_te_layers=n_layers)


def test_sd15_lora_loads_in_diffusers_unet_and_text_encoder(sd15):
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    model_dir, lora = sd15
    state = load_file(str(lora))
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(state))
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    injected = diffusers_modules(converted)
    assert set(injected) == {"unet", "text_encoder"}
    assert injected["unet"] <= dict(pipe.unet.named_modules()).keys()
    te_modules = {n.removeprefix("text_model.") for n, _ in pipe.text_encoder.named_modules()}
    assert {m.removeprefix("text_model.") for m in injected["text_encoder"]} <= te_modules
    n_te = sum(k.startswith("lora_te_") and k.endswith("lora_down.weight") for k in state)
    assert n_te and len(injected["text_encoder"]) == n_te

    ids = pipe.tokenizer(["char000"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        enc = pipe.text_encoder(ids)[0]
        before = pipe.unet(x, torch.tensor([500]), enc).sample
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        after = pipe.unet(x, torch.tensor([500]), enc).sample
    lora_layers = [m for m in pipe.unet.modules() if hasattr(m, "lora_A")]
    assert len(lora_layers) == sum(
        k.startswith("lora_unet_") and k.endswith("lora_down.weight") for k in state
    )
    assert (after - before).abs().max() > 1e-6


# ------------------------------------------------------------------ SDXL


def test_sdxl_lora_names_follow_sd_scripts_sgm_unet_and_comfy(sdxl):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    model_dir, lora = sdxl
    names = _lora_names(lora)
    cfg = dict(UNet2DConditionModel.load_config(str(model_dir), subfolder="unet"))
    n1 = CLIPTextConfig.from_pretrained(str(model_dir / "text_encoder")).num_hidden_layers
    n2 = CLIPTextConfig.from_pretrained(str(model_dir / "text_encoder_2")).num_hidden_layers
    expected = (
        sd_scripts_sdxl_unet_names(cfg)
        | sd_scripts_te_names("lora_te1", n1)
        | sd_scripts_te_names("lora_te2", n2)
    )
    assert set(names) == expected
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert any(n.startswith("lora_unet_middle_block_1_") for n in names)
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)
    _check_shapes(names, dim=4)
    assert set(names) <= comfy_key_map(cfg, sdxl=True, n_te_layers=max(n1, n2))


def test_sdxl_lora_loads_in_diffusers(sdxl):
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from safetensors.torch import load_file

    model_dir, lora = sdxl
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    state = load_file(str(lora))
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(state), pipe.unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    injected = diffusers_modules(converted)
    assert set(injected) == {"unet", "text_encoder", "text_encoder_2"}
    assert injected["unet"] <= dict(pipe.unet.named_modules()).keys()
    for part in ("text_encoder", "text_encoder_2"):
        own = {n.removeprefix("text_model.") for n, _ in getattr(pipe, part).named_modules()}
        assert {m.removeprefix("text_model.") for m in injected[part]} <= own, part
        assert len(injected[part]) == sum(
            k.startswith(f"lora_te{part[-1] if part[-1] == '2' else '1'}_") and k.endswith("lora_down.weight")
            for k in state
        )

    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        before = pipe.unet(x, torch.tensor([500]), hidden, added_cond_kwargs=added).sample
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        after = pipe.unet(x, torch.tensor([500]), hidden, added_cond_kwargs=added).sample
    lora_layers = [m for m in pipe.unet.modules() if hasattr(m, "lora_A")]
    assert len(lora_layers) == sum(
        k.startswith("lora_unet_") and k.endswith("lora_down.weight") for k in state
    )
    assert (after - before).abs().max() > 1e-6
