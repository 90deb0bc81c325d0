"""How work is spread over the host: device leases (which GPU a task uses) and decode pools.

One place for the machinery every stage uses (STYLE.md): :mod:`.leases` hands out the GPUs of the
host, :mod:`.pools` feeds models with images decoded in worker processes over shared memory.
"""

from __future__ import annotations

from yokai_pipeline.runtime.leases import (
    ENV_FAKE_GPUS,
    ENV_LEASE_DIR,
    Lease,
    acquire,
    current_lease,
    device_slots,
    fake_gpus,
    gpu_count,
    host_device_id,
    lease_device,
    lease_dir,
    resolve_auto,
    stage_workers,
)
from yokai_pipeline.runtime.pools import (
    DecodePool,
    DeviceUploader,
    ImageLike,
    Prep,
    decode_pool,
    fill_rows,
    name_of,
    pixel_batches,
    shutdown_decode_pools,
)

__all__ = [
    "ENV_FAKE_GPUS",
    "ENV_LEASE_DIR",
    "fake_gpus",
    "gpu_count",
    "lease_dir",
    "Lease",
    "current_lease",
    "resolve_auto",
    "host_device_id",
    "acquire",
    "lease_device",
    "device_slots",
    "stage_workers",
    "ImageLike",
    "Prep",
    "name_of",
    "fill_rows",
    "DecodePool",
    "decode_pool",
    "shutdown_decode_pools",
    "pixel_batches",
    "DeviceUploader",
]
