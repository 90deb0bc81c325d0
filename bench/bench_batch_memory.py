"""GPU memory per item of the batched models, the "auto" batch sizes it gives, and the halving on OOM.

Usage (a CUDA host; torch, timm; no prefect, pydantic or open_clip needed):
    python3 bench/bench_batch_memory.py [--device cuda:0] [--side 640x360]

For each model with random weights (same activations as the real ones):

- ``MiB/item``: the growth of ``torch.cuda.max_memory_allocated`` per item between batch 8 and
  32, inference as the stages run it (U^2-Net / IS-Net ``predict_masks`` on uint8 frames: bf16
  autocast on CUDA; a CLIP-sized ViT image tower under bf16 autocast; CLIP's own tower is
  open_clip's, not on this host, timm's ``vit_*_clip_224`` has its shapes). Compare with the
  estimates of ``yokai_pipeline/layering.py:batch_cost`` (U^2-Net 150, IS-Net 448 at 1024 px)
  and ``yokai_pipeline/embedding.py:CLIP_BATCH_COST`` (24); the WD14 v3 large tagger's timm
  architecture (``eva02_large_patch14_448``) against ``yokai_pipeline/models/wd14.py:BATCH_COST``;
  the person detector (a YOLOv8m graph exported to ONNX and loaded as the detection stage loads it,
  onnx2torch, 640 px) against ``yokai_pipeline/models/detector.py:BATCH_COST`` (both read from
  the stages themselves; the segmenters' and CLIP's are copied below, their modules need pydantic).
- ``auto``: what ``batch_size = "auto"`` picks on this device with the estimate, and whether a
  forward pass at that size ran (its peak memory).
- ``halving``: ``run_in_parts`` started at a batch far too big for the device: the size it
  settled at and the seconds it took, the outputs checked against a plain run of the first items.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ESTIMATES_MIB = {
    "u2net": 150.0,
    "isnet": 448.0,
    "vit_b32_clip": 24.0,
    "vit_l14_clip": 24.0,
}
HOST_BYTES = 16 * 2**30  # the inputs of the halving run live in host memory
UPPER = {
    "u2net": 128,
    "isnet": 127,
    "vit_b32_clip": 512,
    "vit_l14_clip": 512,
}


def _models(device: str, side: tuple[int, int], work: Path):
    """(name, forward over a uint8 NHWC host batch, one input row) per model."""
    import timm
    import torch

    from yokai_pipeline.models import isnet, u2net

    w, h = side
    frame = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8)
    seg = u2net.build_u2net("u2net").to(device).eval()
    dis = isnet.build_isnet().to(device).eval()
    out = [
        ("u2net", lambda x: u2net.predict_masks(seg, x), frame),
        ("isnet", lambda x: isnet.predict_masks(dis, x), frame),
    ]
    pixels = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    for name, arch in (
        ("vit_b32_clip", "vit_base_patch32_clip_224"),
        ("vit_l14_clip", "vit_large_patch14_clip_224"),
    ):
        vit = timm.create_model(arch, pretrained=False, num_classes=0).to(device).eval()

        def tower(x, vit=vit):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return vit(x.to(device).float().div_(255)).float()

        out.append((name, tower, pixels))
    # the WD14 v3 large tagger's architecture (SmilingWolf/wd-eva02-large-tagger-v3) at its 448 px
    tagger = timm.create_model("eva02_large_patch14_448", pretrained=False, num_classes=10861)
    tagger = tagger.to(device).eval()
    tag_pixels = torch.randint(0, 256, (1, 3, 448, 448), dtype=torch.uint8)

    def tag(x, m=tagger):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.sigmoid(m(x.to(device).float().div_(255)).float())

    out.append(("wd14_eva02_l", tag, tag_pixels))
    out.append(("yolov8m_detector", *_detector(device, work)))
    return out


def _detector(device: str, work: Path):
    """The person detector as the stage runs it: ONNX graph -> onnx2torch module, bf16 on CUDA."""
    import torch
    from bench_gpu_models import build_yolov8, export_onnx

    from yokai_pipeline.models.detector import load_detector

    path = export_onnx(build_yolov8("m"), (1, 3, 640, 640), work / "yolo.onnx", "images", "output0",
                       {"imgsz": "[640, 640]", "names": "{0: 'person'}"})  # fmt: skip
    det = load_detector(path, "person", device=device, batch_size=8, runtime="torch")

    def forward(x, m=det.model._module):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return m(x.to(device).float().div_(255)).float()

    return forward, torch.randint(0, 256, (1, 3, 640, 640), dtype=torch.uint8)


def _cost(name: str):
    """The stage's own BatchCost where its module imports without pydantic, else the copy above."""
    from yokai_pipeline.runtime import batching

    if name == "wd14_eva02_l":
        from yokai_pipeline.models.wd14 import BATCH_COST

        return BATCH_COST
    if name == "yolov8m_detector":
        from yokai_pipeline.models.detector import BATCH_COST

        return BATCH_COST
    return batching.BatchCost(name, ESTIMATES_MIB[name], UPPER[name], cpu_default=16)


def _peak_mib(forward, row, n: int, device: str) -> float:
    import torch

    batch = row.expand(n, *row.shape[1:]).contiguous()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward(batch)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--side", default="640x360", help="frame size for the segmenters (WxH)")
    args = ap.parse_args()
    import torch

    from yokai_pipeline.runtime import batching

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    side = tuple(int(v) for v in args.side.split("x"))
    free, total = torch.cuda.mem_get_info(torch.device(args.device))
    print(f"{torch.cuda.get_device_name(args.device)}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    print(
        "| model | MiB/item measured | estimate | auto batch | peak at auto (GiB) | halving from | settled at | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="batch_memory_"))
    for name, forward, row in _models(args.device, side, work):
        forward(row.expand(2, *row.shape[1:]).contiguous())  # warm-up: cuDNN plans, lazy init
        per_item = (_peak_mib(forward, row, 32, args.device) - _peak_mib(forward, row, 8, args.device)) / 24
        cost = _cost(name)
        auto = batching.auto_batch_size(cost, args.device)
        at_auto = _peak_mib(forward, row, auto, args.device) / 1024
        # far beyond the device: the halving must find a size that fits and give every output
        start = int(2 * total / (max(per_item, 1.0) * 2**20)) + 1
        n = min(start, HOST_BYTES // row.nbytes)
        state = batching.Budget(name, args.device, n)
        rows = row.expand(n, *row.shape[1:]).contiguous()
        t0 = time.perf_counter()
        out = batching.run_in_parts(forward, rows, state, torch.cat)
        seconds = time.perf_counter() - t0
        plain = forward(rows[:2]).float().flatten(1)
        same = torch.nn.functional.cosine_similarity(out[:2].float().flatten(1), plain).min().item()
        assert out.shape[0] == n and same > 0.99, (out.shape, same)
        print(
            f"| {name} | {per_item:.1f} | {cost.per_item_mib:.0f} | {auto} | {at_auto:.2f} | {n} | "
            f"{state.size} | {seconds:.1f} |"
        )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
