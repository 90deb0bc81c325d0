"""Training tasks: one LoRA per character on a GPU slot, and the checkpoint evidence page."""

from __future__ import annotations

import time

from prefect import get_run_logger, task

from yokai_pipeline import checkpoints, kohya_launch, runtime, training
from yokai_pipeline.config import TrainingConfig


def _progress_logger(name: str, every_s: float = 10.0):
    log = get_run_logger()
    last = {"t": 0.0}

    def on_progress(p: dict) -> None:
        now = time.monotonic()
        if now - last["t"] >= every_s or "val_loss" in p or p.get("step") == p.get("total_steps"):
            last["t"] = now
            figs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
            log.info(f"{name}: {figs}")

    return on_progress


def _run_record(config_file: str, lease: runtime.Lease) -> dict:
    """Devices and batch of one run as trained: DDP multiplies the batch, not the learning rate."""
    args = training.read_training_args(config_file)
    batch = int(args.get("train_batch_size", 1))
    n = max(1, len(lease.indices))
    return {
        "device": lease.label,
        "gpus": n,
        "train_batch_size": batch,
        "effective_batch_size": batch * n,
        "learning_rate": args.get("learning_rate"),
        "unet_lr": args.get("unet_lr"),
    }


@task(name="train-lora", tags=["gpu"], retries=1, retry_delay_seconds=30, task_run_name="train-{name}")
def train_task(config_file: str, name: str, cfg: TrainingConfig) -> dict:
    """Train one character's LoRA on its leased GPU(s); finished characters are skipped."""
    on_progress = _progress_logger(name)
    log = get_run_logger()
    per_run = cfg.gpus_per_run if cfg.backend == "kohya" else 1  # the built-in trainer is one device
    with runtime.lease_device(cfg.device, per_run) as lease:
        log.info(f"{name}: training on {lease.label}")
        if cfg.backend == "kohya":
            res = kohya_launch.launch_kohya(
                config_file,
                sd_scripts=cfg.sd_scripts,
                python=cfg.python,
                base_model=cfg.base_model,
                on_progress=on_progress,
                on_line=log.info,
                env=lease.env(),
                accelerate_args=kohya_launch.accelerate_device_args(lease.host_ids),
            )
        else:
            res = training.train_lora_builtin(
                config_file,
                base_model_override=cfg.base_model,
                max_steps=cfg.max_steps,
                device=lease.resolve(cfg.device),
                on_progress=on_progress,
                resolution=cfg.resolution,
            )
    return {**res, "run": _run_record(config_file, lease)}


@task(name="checkpoint-evidence", tags=["gpu"], task_run_name="evidence-{name}")
def evidence_task(
    config_file: str, name: str, cfg: TrainingConfig, num_inference_steps: int | None = None
) -> dict:
    """Sample every saved checkpoint and write the epochs x prompts grid with the validation-loss curve."""
    with runtime.lease_device(cfg.device) as lease:
        res = checkpoints.render_checkpoint_evidence(
            config_file,
            base_model_override=cfg.base_model,
            device=lease.resolve(cfg.device),
            num_inference_steps=num_inference_steps,
        )
    get_run_logger().info(
        f"{name}: evidence at {res['html']} (best epoch by validation loss: {res.get('best_epoch')})"
    )
    return res
