"""The ss_* metadata sd-scripts writes into a LoRA (names and meanings as in train_network.py)."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any


def kohya_metadata(state: Any) -> dict[str, Any]:
    """The ss_* metadata sd-scripts writes into a LoRA (names and meanings as in train_network.py)."""
    args, st, specs, model = state.args, state.st, state.specs, state.model
    steps_per_epoch = state.steps_per_epoch
    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, dict[str, int]] = {}
    for spec in specs:
        for si, sub in enumerate(spec.subsets):
            items = [i for i in spec.train if i.subset == si]
            dirs[sub.image_dir.name] = {"n_repeats": int(sub.params["num_repeats"]), "img_count": len(items)}
            counter: Counter[str] = Counter()
            for i in items:
                counter.update(t.strip() for t in i.caption.split(",") if t.strip())
            tags[sub.image_dir.name] = dict(counter)
    reso = specs[0].resolution
    return {
        "ss_session_id": state.session_id,
        "ss_training_started_at": state.started_at,
        "ss_output_name": st.output_name,
        "ss_learning_rate": args.get("learning_rate"),
        "ss_text_encoder_lr": st.te_lr if st.train_te else None,
        "ss_unet_lr": st.unet_lr,
        "ss_num_train_images": sum(i.repeats for s in specs for i in s.train),
        "ss_num_validation_images": sum(len(s.validation) for s in specs),
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": steps_per_epoch,
        "ss_num_epochs": st.epochs,
        "ss_gradient_checkpointing": st.gradient_checkpointing,
        "ss_gradient_accumulation_steps": 1,
        "ss_max_train_steps": st.max_train_steps,
        "ss_lr_warmup_steps": st.lr_warmup_steps,
        "ss_lr_scheduler": st.lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": st.network_dim,
        "ss_network_alpha": st.network_alpha,
        "ss_network_train_unet_only": not st.train_te,
        "ss_mixed_precision": st.mixed_precision,
        "ss_v2": False,
        "ss_base_model_version": model.version,
        # sdxl_train_network.py ignores clip_skip.
        "ss_clip_skip": st.clip_skip if st.clip_skip > 1 and model.family.name == "sd15" else None,
        "ss_resolution": f"({reso[0]}, {reso[1]})",
        "ss_seed": st.seed,
        "ss_noise_offset": st.noise_offset or None,
        "ss_min_snr_gamma": st.min_snr_gamma or None,
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_max_grad_norm": st.max_grad_norm,
        "ss_sd_model_name": os.path.basename(str(model.name)),
        "ss_validation_seed": specs[0].params["validation_seed"],
        "ss_validation_split": specs[0].params["validation_split"],
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_tag_frequency": json.dumps(tags),
        "ss_training_comment": "trained by yokai_pipeline built-in trainer (diffusers + peft)",
    }
