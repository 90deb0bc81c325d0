"""Checkpoint evidence: sample images per saved LoRA epoch next to the validation-loss curve.

For one character's training config: every ``<output_name>[-NNNNNN].safetensors`` in its
output folder is loaded into a diffusers StableDiffusionPipeline in turn, the character's kohya
sample prompts are rendered with fixed seeds, and ``evidence/index.html`` shows an
epochs x prompts grid beside the validation-loss curve with the lowest-loss epoch highlighted,
so the best epoch can be picked by eye and by number.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import BadInputError, ConfigError
from yokai_pipeline.fsio import atomic_write_json, atomic_write_text, read_json, save_image
from yokai_pipeline.training import (
    VALIDATION_FILE,
    config_family,
    encode_prompts,
    read_training_args,
    resolve_config_path,
)

log = logging.getLogger(__name__)

EVIDENCE_DIR = "evidence"

# kohya's sample_sampler names -> diffusers scheduler classes.
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}

_FLAGS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("steps", int),
    "ss": ("sampler", str),
}


def parse_sample_prompt(line: str) -> dict[str, Any] | None:
    """One line of a kohya sample-prompt file -> ``{prompt, negative_prompt, width, ...}``.

    Flags are split on `` --`` as in sd-scripts (--n negative, --w/--h size, --d seed, --l CFG
    scale, --s steps, --ss sampler); unknown flags are ignored. Comments and blank lines -> None.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = line.split(" --")
    out: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        m = re.match(r"(ss|n|w|h|d|l|s)\s+(.*)$", part.strip(), re.DOTALL)
        if not m:
            continue
        key, conv = _FLAGS[m.group(1)]
        try:
            out[key] = conv(m.group(2).strip())
        except ValueError:
            log.warning("ignoring bad sample prompt flag --%s in %r", m.group(1), line)
    return out


def read_sample_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read a kohya sample-prompt file (.txt lines, or .json / .toml lists of prompt tables)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise BadInputError(path, "sample prompts file not found") from exc
    if path.suffix.lower() == ".json":
        items = json.loads(text)
    elif path.suffix.lower() == ".toml":
        import tomllib

        items = tomllib.loads(text).get("prompt", [])
    else:
        return [p for p in (parse_sample_prompt(line) for line in text.splitlines()) if p]
    prompts = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("prompt"):
            p = {"prompt": str(item["prompt"])}
            for src, dst in (
                ("negative_prompt", "negative_prompt"),
                ("width", "width"),
                ("height", "height"),
                ("seed", "seed"),
                ("scale", "guidance_scale"),
                ("sample_steps", "steps"),
                ("sample_sampler", "sampler"),
            ):
                if item.get(src) is not None:
                    p[dst] = item[src]
            prompts.append(p)
    if not prompts:
        raise BadInputError(path, "no prompts found")
    return prompts


def list_checkpoints(output_dir: str | Path, output_name: str) -> list[tuple[int, Path]]:
    """(epoch, file) of each epoch checkpoint; the epoch comes from the file's ss_epoch metadata."""
    from safetensors import safe_open

    output_dir = Path(output_dir)
    found: dict[int, Path] = {}
    pattern = re.compile(re.escape(output_name) + r"(-(\d{6}))?\.safetensors$")
    for path in sorted(output_dir.glob(f"{output_name}*.safetensors")):
        m = pattern.fullmatch(path.name)
        if not m:
            continue  # step checkpoints and other names
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
        except Exception as exc:  # noqa: BLE001 - a broken file must not lose the other epochs
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        epoch = int(meta.get("ss_epoch") or (m.group(2) or 0))
        if m.group(2) is None and epoch in found:
            continue
        found[epoch] = path
    return sorted(found.items())


def read_validation_curve(
    output_dir: str | Path, logging_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """Per-epoch validation loss: the built-in trainer's JSON, else kohya's tensorboard scalars.

    Returns:
        ``[{"epoch": int, "val_loss": float}]`` sorted by epoch (empty when none was recorded).
    """
    path = Path(output_dir) / VALIDATION_FILE
    if path.is_file():
        data = read_json(path)
        return [
            {"epoch": int(e["epoch"]), "val_loss": float(e["val_loss"])}
            for e in data.get("epochs", [])
            if e.get("val_loss") is not None
        ]
    if logging_dir is None:
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        log.info("tensorboard is not installed; no validation curve for %s", output_dir)
        return []
    curve: dict[int, float] = {}
    for events in sorted(Path(logging_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if "loss/validation/epoch_average" in acc.Tags().get("scalars", []):
            for ev in acc.Scalars("loss/validation/epoch_average"):
                curve[int(ev.step)] = float(ev.value)
    return [{"epoch": e, "val_loss": v} for e, v in sorted(curve.items())]


def loss_polyline(
    curve: list[dict[str, Any]], width: int = 360, height: int = 160, pad: int = 24
) -> dict[str, Any]:
    """SVG coordinates of the loss curve (points string and one dot per epoch)."""
    if not curve:
        return {"points": "", "dots": [], "width": width, "height": height}
    epochs = [c["epoch"] for c in curve]
    losses = [c["val_loss"] for c in curve]
    e0, e1 = min(epochs), max(epochs)
    l0, l1 = min(losses), max(losses)
    dots = []
    for c in curve:
        x = pad + (width - 2 * pad) * ((c["epoch"] - e0) / (e1 - e0) if e1 > e0 else 0.5)
        y = pad + (height - 2 * pad) * (1 - ((c["val_loss"] - l0) / (l1 - l0) if l1 > l0 else 0.5))
        dots.append({"x": round(x, 1), "y": round(y, 1), "epoch": c["epoch"], "val_loss": c["val_loss"]})
    return {
        "points": " ".join(f"{d['x']},{d['y']}" for d in dots),
        "dots": dots,
        "width": width,
        "height": height,
        "min": l0,
        "max": l1,
    }


_pipe_lock = threading.Lock()
_pipes: dict[tuple[str, str], Any] = {}


def load_sampling_pipeline(base_model: str, device: str = "auto", family: str = "sd15") -> Any:
    """A Stable Diffusion (XL for ``family="sdxl"``) pipeline for the base model, memoised per process."""
    try:
        import torch
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "checkpoint evidence needs diffusers and peft: pip install 'diffusers>=0.42' 'peft>=0.21'"
        ) from exc
    from yokai_pipeline.runtime import resolve_auto

    dev = resolve_auto(device, torch.cuda.is_available())
    key = (base_model, dev, family)
    with _pipe_lock:
        if key in _pipes:
            return _pipes[key]
        # SDXL's VAE overflows in fp16 (kohya's no_half_vae): bf16 there.
        half = torch.bfloat16 if family == "sdxl" else torch.float16
        dtype = half if dev.startswith("cuda") else torch.float32
        cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        extra = {} if family == "sdxl" else {"safety_checker": None}
        path = Path(base_model).expanduser()
        try:
            if path.is_file():
                pipe = cls.from_single_file(str(path), dtype=dtype, **extra)
            else:
                pipe = cls.from_pretrained(str(path) if path.is_dir() else base_model, dtype=dtype, **extra)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load base model {base_model!r} for sampling: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        pipe.to(dev)
        _pipes[key] = pipe
        return pipe


def _text_encoder_modules(text_encoder: Any) -> dict[str, Any]:
    """kohya module name (``text_model_encoder_layers_0_self_attn_q_proj``) -> Linear module."""
    out = {}
    for name, module in text_encoder.named_modules():
        if not name or not hasattr(module, "weight"):
            continue
        flat = name.replace(".", "_")
        out[flat if flat.startswith("text_model_") else "text_model_" + flat] = module
    return out


def _merge_text_encoder_lora(
    text_encoder: Any, state: dict[str, Any], sign: float, prefix: str = r"^lora_te1?_"
) -> int:
    """Add (sign=1) or remove (sign=-1) a kohya text-encoder LoRA by merging ``alpha/r * up @ down``.

    ``prefix`` selects the encoder's keys (SDXL: ``lora_te1_`` first encoder, ``lora_te2_`` second).
    """
    import torch

    modules = _text_encoder_modules(text_encoder)
    merged = 0
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        name = re.sub(prefix, "", base)
        module = modules.get(name) if name != base else None
        if module is None:
            continue
        up = state[base + ".lora_up.weight"]
        rank = down.shape[0]
        alpha = float(state.get(base + ".alpha", torch.tensor(rank)))
        with torch.no_grad():
            delta = (up.float() @ down.float()) * (alpha / rank)
            module.weight += sign * delta.to(module.weight.device, module.weight.dtype)
        merged += 1
    return merged


class _LoraApplied:
    """Context manager: the LoRA loaded into the pipeline (UNet through diffusers), removed on exit."""

    def __init__(self, pipe: Any, path: Path):
        self.pipe, self.path = pipe, path
        self.te_state: dict[str, Any] = {}

    def __enter__(self) -> _LoraApplied:
        from safetensors.torch import load_file

        try:
            self.pipe.load_lora_weights(
                str(self.path.parent), weight_name=self.path.name, adapter_name="evidence"
            )
        except ValueError as exc:
            # diffusers loads text-encoder LoRAs through transformers, whose peft floor may be newer than
            # the installed peft: load the UNet part through diffusers and merge the text-encoder part.
            log.info("loading the text-encoder part of %s by merging (%s)", self.path.name, exc)
            self.pipe.unload_lora_weights()
            state = load_file(str(self.path))
            unet_part = {k: v for k, v in state.items() if k.startswith("lora_unet_")}
            self.te_state = {k: v for k, v in state.items() if k.startswith("lora_te")}
            self.pipe.load_lora_weights(unet_part, adapter_name="evidence")
            self._merge(1.0)
        return self

    def _merge(self, sign: float) -> None:
        _merge_text_encoder_lora(self.pipe.text_encoder, self.te_state, sign)
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            _merge_text_encoder_lora(self.pipe.text_encoder_2, self.te_state, sign, prefix=r"^lora_te2_")

    def __exit__(self, *exc: object) -> None:
        self.pipe.unload_lora_weights()
        if self.te_state:
            self._merge(-1.0)


def _prompt_kwargs(pipe: Any, p: dict[str, Any], clip_skip: int, family: str) -> dict[str, Any]:
    """SDXL: the pipeline encodes with both encoders as sdxl_train_network.py trains (no clip_skip).
    SD 1.5: embeddings computed as the trainer does (kohya clip_skip), passed to the pipeline."""
    import torch

    negative = p.get("negative_prompt") or ""
    if family == "sdxl":
        return {"prompt": p["prompt"], "negative_prompt": negative}
    with torch.no_grad():
        pos, neg = (
            encode_prompts(pipe.tokenizer, pipe.text_encoder, [t], clip_skip=clip_skip)
            for t in (p["prompt"], negative)
        )
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg}


def _evidence_plan(
    config_file: Path, base_model_override: str | None, prompts_file: str | Path | None
) -> dict[str, Any]:
    """What one character's evidence page samples: checkpoints, prompts, curve, base model, family.

    Raises:
        BadInputError: output_dir or sample_prompts unset, or no checkpoint to sample.
        ConfigError: no base model (neither the config's nor an override).
    """
    args = read_training_args(config_file)
    if not args.get("output_dir"):
        raise BadInputError(config_file, "output_dir is not set")
    output_dir = resolve_config_path(args["output_dir"], config_file)
    name = str(args.get("output_name") or "last")
    pf = prompts_file or args.get("sample_prompts")
    if not pf:
        raise BadInputError(config_file, "sample_prompts is not set and no prompts file was given")
    prompts = read_sample_prompts(resolve_config_path(pf, config_file))
    ckpts = list_checkpoints(output_dir, name)
    if not ckpts:
        raise BadInputError(output_dir, f"no {name}*.safetensors checkpoints to sample")
    logging_dir = args.get("logging_dir")
    curve = read_validation_curve(
        output_dir, resolve_config_path(logging_dir, config_file) if logging_dir else None
    )
    base = base_model_override or args.get("pretrained_model_name_or_path")
    if not base:
        raise ConfigError(f"{config_file}: pretrained_model_name_or_path is not set; pass a base model")
    return {
        "args": args,
        "output_dir": output_dir,
        "name": name,
        "prompts": prompts,
        "ckpts": ckpts,
        "curve": curve,
        "best": min(curve, key=lambda c: c["val_loss"])["epoch"] if curve else None,
        "base": str(base),
        "family": config_family(args),
    }


def _sample_prompt(pipe: Any, p: dict[str, Any], pi: int, plan: dict[str, Any], steps: int | None) -> Any:
    """One prompt line sampled as kohya's sampler would: its sampler, size (multiple of 8), seed, steps."""
    import diffusers
    import torch

    args = plan["args"]
    sampler = str(p.get("sampler") or args.get("sample_sampler") or "ddim").lower()
    cls_name = SAMPLERS.get(sampler, "DDIMScheduler")
    pipe.scheduler = getattr(diffusers, cls_name).from_config(plan["base_scheduler"].config)
    return pipe(
        **_prompt_kwargs(pipe, p, int(args.get("clip_skip") or 1), plan["family"]),
        width=max(8, int(p.get("width", 512)) // 8 * 8),
        height=max(8, int(p.get("height", 512)) // 8 * 8),
        num_inference_steps=steps or int(p.get("steps", 30)),
        guidance_scale=float(p.get("guidance_scale", 7.5)),
        generator=torch.Generator("cpu").manual_seed(int(p.get("seed", pi))),
    ).images[0]


def _write_evidence_page(
    plan: dict[str, Any], rows: list[dict[str, Any]], images: list[str]
) -> dict[str, Any]:
    """``index.html`` (grid, loss curve, best epoch) and ``evidence.json``, both atomic."""
    import jinja2

    evidence = plan["output_dir"] / EVIDENCE_DIR
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
    )
    html = env.get_template("checkpoints.html.j2").render(
        name=plan["name"],
        base_model=plan["base"],
        family=plan["family"],
        prompts=plan["prompts"],
        rows=rows,
        best_epoch=plan["best"],
        curve=plan["curve"],
        svg=loss_polyline(plan["curve"]),
    )
    html_path = atomic_write_text(evidence / "index.html", html)
    report = {
        "html": str(html_path),
        "epochs": [e for e, _ in plan["ckpts"]],
        "prompts": [p["prompt"] for p in plan["prompts"]],
        "images": images,
        "best_epoch": plan["best"],
        "curve": plan["curve"],
        "family": plan["family"],
    }
    atomic_write_json(evidence / "evidence.json", report)
    return report


def render_checkpoint_evidence(
    config_file: str | Path,
    *,
    base_model_override: str | None = None,
    prompts_file: str | Path | None = None,
    device: str = "auto",
    num_inference_steps: int | None = None,
    on_image: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Sample every epoch checkpoint of one character and write its HTML evidence page.

    Args:
        config_file: the character's training-args TOML (output_dir, output_name, sample_prompts).
        base_model_override: base model instead of ``pretrained_model_name_or_path``.
        prompts_file: prompt file instead of the config's ``sample_prompts``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        num_inference_steps: overrides every prompt's ``--s`` (fast previews, tests).
        on_image: called after each image with ``{epoch, prompt_index, path}``.

    Returns:
        ``{html, epochs, prompts, images, best_epoch, curve}``.
    """
    config_file = Path(config_file)
    plan = _evidence_plan(config_file, base_model_override, prompts_file)
    pipe = load_sampling_pipeline(plan["base"], device, plan["family"])
    plan["base_scheduler"] = pipe.scheduler
    evidence, name, curve = plan["output_dir"] / EVIDENCE_DIR, plan["name"], plan["curve"]
    rows, images = [], []
    for epoch, path in plan["ckpts"]:
        cells = []
        with _LoraApplied(pipe, path):
            for pi, p in enumerate(plan["prompts"]):
                image = _sample_prompt(pipe, p, pi, plan, num_inference_steps)
                dest = evidence / f"{name}_e{epoch:06d}_p{pi:02d}.png"
                save_image(dest, image)
                images.append(str(dest))
                cells.append({"src": dest.name, "prompt": p["prompt"]})
                if on_image:
                    on_image({"epoch": epoch, "prompt_index": pi, "path": str(dest)})
        pipe.scheduler = plan["base_scheduler"]
        val = next((c["val_loss"] for c in curve if c["epoch"] == epoch), None)
        rows.append(
            {
                "epoch": epoch,
                "checkpoint": path.name,
                "val_loss": val,
                "best": epoch == plan["best"],
                "cells": cells,
            }
        )
    return _write_evidence_page(plan, rows, images)
