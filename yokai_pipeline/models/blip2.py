"""BLIP-2 captioning model: loading (memoised per process) and batched generation.

Weights come from a hub id (``Salesforce/blip2-opt-2.7b``, ``blip2-opt-6.7b``,
``blip2-flan-t5-xl``; the hub cache is used, and a download happens only outside tests) or
a local folder saved with ``save_pretrained`` (loaded with ``local_files_only``).
Preprocessing is the checkpoint's own processor. bf16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CACHE: dict[tuple[str, str, str], Blip2Bundle] = {}
_LOCK = threading.Lock()


@dataclass
class Blip2Bundle:
    """A loaded BLIP-2 model with its processor."""

    model: Any
    processor: Any
    device: Any
    dtype: Any
    # One generate() at a time per model: the static KV cache and compiled graphs are per model,
    # and parallel tasks (Prefect's thread runner) must not interleave on them.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.model.config.text_config.is_encoder_decoder)


def _import_torch_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "the blip2 caption backend needs torch and transformers: pip install 'yokai-pipeline[ml]'"
        ) from exc
    return torch, transformers


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> the leased device (``yokai_pipeline.runtime``), else ``cuda`` when visible, else ``cpu``."""
    from yokai_pipeline.runtime import resolve_auto

    torch, _ = _import_torch_transformers()
    device = resolve_auto(device, torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        from yokai_pipeline.errors import ConfigError

        raise ConfigError(f"device={device!r} asked for but no CUDA GPU is visible; use --device cpu")
    return device


def default_dtype(device: str) -> Any:
    """bf16 on CUDA (the H100's fast path), fp32 elsewhere (CPU bf16 matmuls are slow)."""
    torch, _ = _import_torch_transformers()
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_blip2(model: str | Path, device: str = "auto", dtype: Any = None) -> Blip2Bundle:
    """Load BLIP-2 and its processor once per (model, device, dtype) in this process.

    Args:
        model: Hub id or local folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: torch dtype; default bf16 on CUDA, fp32 on CPU.

    Returns:
        The loaded bundle (model in eval mode on ``device``; the tokenizer pads on the left,
        which batched generation with decoder-only language models needs).
    """
    torch, transformers = _import_torch_transformers()
    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    key = (str(model), dev, str(dtype))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        local = Path(model).expanduser().is_dir()
        kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
        src = str(Path(model).expanduser()) if local else str(model)
        try:
            processor = transformers.AutoProcessor.from_pretrained(src, **kwargs)
            net = transformers.Blip2ForConditionalGeneration.from_pretrained(src, dtype=dtype, **kwargs)
        except OSError as exc:
            from yokai_pipeline.errors import ConfigError

            raise ConfigError(
                f"cannot load BLIP-2 model {src!r}: {exc}. Give a hub id that is downloadable or in the "
                "Hugging Face cache, or a local folder saved with save_pretrained."
            ) from exc
        net.to(dev).eval()
        tok = processor.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        bundle = Blip2Bundle(model=net, processor=processor, device=torch.device(dev), dtype=dtype)
        _CACHE[key] = bundle
        return bundle


def clear_cache() -> None:
    """Forget loaded models (tests, or to free GPU memory)."""
    with _LOCK:
        _CACHE.clear()


def preprocess(
    bundle: Blip2Bundle, images: list[Any], prompts: list[str], *, on_device: bool = False
) -> dict[str, Any]:
    """The checkpoint's processor: pixel values + prompt tokens.

    Args:
        bundle: Loaded model.
        images: RGB PIL images.
        prompts: One prompt per image.
        on_device: Resize and normalise on the model's device (the processor's torchvision
            backend); the CPU then only decodes. Call it from the thread that runs the model:
            CUDA work from a second thread can break the compiled decode step's graph capture.
            Otherwise everything runs on CPU (in a prefetch thread) and the tensors are pinned
            for an asynchronous copy.
    """
    torch, _ = _import_torch_transformers()
    kwargs: dict[str, Any] = {"device": bundle.device} if on_device else {}
    enc = bundle.processor(images=images, text=prompts, return_tensors="pt", padding=True, **kwargs)
    out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    if bundle.device.type == "cuda" and not on_device:
        out = {k: v.pin_memory() for k, v in out.items()}
    return out


def generate_captions(
    bundle: Blip2Bundle,
    inputs: dict[str, Any],
    *,
    max_new_tokens: int = 40,
    min_new_tokens: int = 0,
    static_cache: bool = False,
) -> list[str]:
    """Batched greedy generation; returns only the newly generated text per image.

    Args:
        bundle: Loaded model.
        inputs: Output of :func:`preprocess`.
        max_new_tokens: Length limit.
        min_new_tokens: Forces at least this many tokens (benchmarks).
        static_cache: Static KV cache; on CUDA transformers then compiles the decode step
            (once per input shape, so callers keep batch shapes fixed).
    """
    torch, _ = _import_torch_transformers()
    dev = bundle.device
    feed = {k: v.to(dev, non_blocking=True) for k, v in inputs.items()}
    feed["pixel_values"] = feed["pixel_values"].to(bundle.dtype)
    extra = {"cache_implementation": "static"} if static_cache else {}
    with bundle.lock, torch.inference_mode():
        out = bundle.model.generate(
            **feed,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=bundle.processor.tokenizer.pad_token_id,
            **extra,
        )
    if not bundle.is_encoder_decoder and "input_ids" in feed and out.shape[1] > feed["input_ids"].shape[1]:
        # Decoder-only generate() returns prompt + answer; keep the answer.
        prompt_len = feed["input_ids"].shape[1]
        if torch.equal(out[:, :prompt_len], feed["input_ids"]):
            out = out[:, prompt_len:]
    texts = bundle.processor.tokenizer.batch_decode(out.cpu(), skip_special_tokens=True)
    return [t.strip() for t in texts]


# --- random models for tests and benchmarks (no download) ----------------------------------

_TOKENIZER_CORPUS = (
    "Question: describe this character's hair, clothing, facial expression and pose. Answer: "
    "Question: describe this yokai's colours, body shape and distinctive features. Answer: "
    "a young anime boy with brown hair wearing a blue soccer uniform smiling standing pose "
    "a red cat-like yokai with two tails distinctive yellow eyes cheerful expression fire pattern "
    "green round small large tall wide black white pink purple orange grey background simple"
)


def build_tokenizer(vocab_size: int = 400) -> Any:
    """A small byte-level BPE tokenizer trained here on a few sentences (tests, benchmarks).

    Has ``<pad>``, ``</s>`` (bos/eos, as OPT), ``<unk>`` and ``<image>`` (BLIP-2's query slot).
    """
    _, transformers = _import_torch_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    # OPT tokenizers start every text with </s>; do the same so prompts look like the real ones.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


# Sizes as the released checkpoints' configs (blip2-opt-2.7b) and a tiny one for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        "qformer": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            vocab_size=100,
            max_position_embeddings=64,
        ),
        "text": dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=256,
        ),
        "num_query_tokens": 4,
    },
    "opt-2.7b": {
        "vision": dict(
            hidden_size=1408,
            intermediate_size=6144,
            num_hidden_layers=39,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        ),
        "qformer": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            encoder_hidden_size=1408,
        ),
        "text": dict(
            hidden_size=2560,
            ffn_dim=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            word_embed_proj_dim=2560,
            max_position_embeddings=2048,
            vocab_size=50272,
        ),
        "num_query_tokens": 32,
    },
}


def build_random_blip2(
    preset: str = "tiny", *, device: str = "cpu", dtype: Any = None, seed: int = 0
) -> Blip2Bundle:
    """A BLIP-2 with random weights built from configs, with a local tokenizer and image processor.

    Args:
        preset: ``tiny`` (tests) or ``opt-2.7b`` (the released model's sizes, for benchmarks).
        device: Where to build it.
        dtype: Default bf16 on CUDA, fp32 on CPU.
        seed: Weight seed.

    Returns:
        A bundle usable like :func:`load_blip2`'s (not memoised).
    """
    torch, transformers = _import_torch_transformers()
    p = PRESETS[preset]
    tokenizer = build_tokenizer()
    image_size = p["vision"]["image_size"]
    image_processor = transformers.BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = transformers.Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=p["num_query_tokens"]
    )
    text = dict(p["text"])
    text.setdefault("vocab_size", len(tokenizer))
    text.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.Blip2Config(
        vision_config=p["vision"],
        qformer_config=p["qformer"],
        text_config=transformers.OPTConfig(**text),
        num_query_tokens=p["num_query_tokens"],
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    dtype = dtype or default_dtype(device)
    torch.manual_seed(seed)
    # Build straight on the device in the target dtype: a 3.8B model built in fp32 on CPU takes minutes.
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            net = transformers.Blip2ForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(prev)
    net.eval()
    return Blip2Bundle(model=net, processor=processor, device=torch.device(device), dtype=dtype)


def save_bundle(bundle: Blip2Bundle, folder: str | Path) -> Path:
    """Save model (safetensors), tokenizer and processor so :func:`load_blip2` can read the folder."""
    folder = Path(folder)
    bundle.model.save_pretrained(folder, safe_serialization=True)
    bundle.processor.save_pretrained(folder)
    return folder
