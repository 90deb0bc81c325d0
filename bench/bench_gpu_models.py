"""GPU throughput (images/s) of the issue-15 neural models: anime detector, anime IS-Net, CCIP.

Usage (on the GPU host; needs torch, onnx, onnx2torch, numpy, Pillow; onnxruntime and timm optional):
    python bench/bench_gpu_models.py                                   # all models, CUDA
    python bench/bench_gpu_models.py --models isnet --batch-sizes 4 8 16
    python bench/bench_gpu_models.py --device cpu --quick              # smoke run on a CPU

Random weights, published architectures and input sizes (nothing is downloaded):

- ``detector``: YOLOv8 at 640 x 640 (``--yolo-scale s`` is the head detector's size, ``m`` the
  person detector's), built in torch, exported to ONNX the way ultralytics exports it
  (``images`` -> ``output0`` [N, 5, 8400]), then run through ``load_detector`` on the torch
  path (onnx2torch conversion of that ONNX graph, bf16 autocast): rows for the model on device
  tensors and for ``detect()`` end to end from decoded 1280 x 720 uint8 frames on the host
  (upload, batched bicubic resize on the device, model, NMS on the host) at batch 1 / 16 / 64
  (``--detector-batch-sizes``), in frames/s.
- ``isnet``: ``build_isnet()`` (44.0 M parameters) at 1024 x 1024, ``predict_masks`` on uint8
  frames already on the device (letterbox, bf16, sigmoid, resize back).
- ``ccip``: CCIP's backbone family, timm ``caformer_m36`` at 384 x 384 with a 768-d head (the
  published ``ccip-caformer-24-randaug-pruned`` is a pruned variant, so this bounds its cost
  from above), exported to ONNX and run through ``load_ccip``'s torch path (onnx2torch, bf16).

Each ONNX model is also checked once: onnxruntime (CPU, fp32) vs the onnx2torch module
(fp32, same device) on the same batch; the largest difference is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# --------------------------------------------------------------------------- YOLOv8 (benchmark stand-in)


def build_yolov8(scale: str = "s", nc: int = 1):  # noqa: ANN201 - torch is imported lazily
    """YOLOv8 detect model of ultralytics' yolov8.yaml at ``scale`` n/s/m/l (random weights)."""
    import torch
    from torch import nn

    depth, width, max_ch = {"n": (0.33, 0.25, 1024), "s": (0.33, 0.5, 1024), "m": (0.67, 0.75, 768),
                            "l": (1.0, 1.0, 512)}[scale]  # fmt: skip

    def ch(c: int) -> int:
        return int(math.ceil(min(c, max_ch) * width / 8) * 8)

    def reps(n: int) -> int:
        return max(round(n * depth), 1)

    class Conv(nn.Sequential):
        def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
            super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())

    class Bottleneck(nn.Module):
        def __init__(self, c: int, shortcut: bool):
            super().__init__()
            self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

        def forward(self, x):
            y = self.cv2(self.cv1(x))
            return x + y if self.add else y

    class C2f(nn.Module):
        def __init__(self, c1: int, c2: int, n: int, shortcut: bool):
            super().__init__()
            self.c = c2 // 2
            self.cv1, self.cv2 = Conv(c1, 2 * self.c), Conv((2 + n) * self.c, c2)
            self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            for m in self.m:
                y.append(m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c1: int, c2: int):
            super().__init__()
            self.cv1, self.cv2 = Conv(c1, c1 // 2), Conv(c1 // 2 * 4, c2)
            self.m = nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            y = [self.cv1(x)]
            for _ in range(3):
                y.append(self.m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class Detect(nn.Module):
        def __init__(self, chs: list[int]):
            super().__init__()
            c2, c3 = max(16, chs[0] // 4, 64), max(chs[0], min(nc, 100))
            self.box = nn.ModuleList(
                nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 64, 1)) for c in chs
            )
            self.cls = nn.ModuleList(
                nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in chs
            )
            self.register_buffer("bins", torch.arange(16, dtype=torch.float32).view(1, 1, 16, 1))

        def forward(self, feats):
            boxes, scores, anchors, strides = [], [], [], []
            for f, box, cls, stride in zip(feats, self.box, self.cls, (8, 16, 32), strict=True):
                n, _, h, w = f.shape
                boxes.append(box(f).view(n, 64, -1))
                scores.append(cls(f).view(n, nc, -1))
                ys, xs = torch.meshgrid(
                    torch.arange(h, device=f.device), torch.arange(w, device=f.device), indexing="ij"
                )
                anchors.append(torch.stack((xs, ys)).view(2, -1).float() + 0.5)
                strides.append(torch.full((1, h * w), float(stride), device=f.device))
            box, score = torch.cat(boxes, 2), torch.cat(scores, 2)
            anchor, stride = torch.cat(anchors, 1)[None], torch.cat(strides, 1)
            # Distribution focal loss decode: expected distance over 16 bins per side.
            dist = (box.view(box.shape[0], 4, 16, -1).softmax(2) * self.bins).sum(2)
            lt, rb = dist.chunk(2, 1)
            xy = (anchor + (rb - lt) / 2) * stride
            wh = (lt + rb) * stride
            return torch.cat((xy, wh, score.sigmoid()), 1)

    class YOLOv8(nn.Module):
        def __init__(self):
            super().__init__()
            c = [ch(x) for x in (64, 128, 256, 512, 1024)]
            self.b0, self.b1 = Conv(3, c[0], 3, 2), Conv(c[0], c[1], 3, 2)
            self.b2, self.b3 = C2f(c[1], c[1], reps(3), True), Conv(c[1], c[2], 3, 2)
            self.b4, self.b5 = C2f(c[2], c[2], reps(6), True), Conv(c[2], c[3], 3, 2)
            self.b6, self.b7 = C2f(c[3], c[3], reps(6), True), Conv(c[3], c[4], 3, 2)
            self.b8, self.b9 = C2f(c[4], c[4], reps(3), True), SPPF(c[4], c[4])
            self.h12 = C2f(c[4] + c[3], c[3], reps(3), False)
            self.h15 = C2f(c[3] + c[2], c[2], reps(3), False)
            self.h16, self.h18 = Conv(c[2], c[2], 3, 2), C2f(c[2] + c[3], c[3], reps(3), False)
            self.h19, self.h21 = Conv(c[3], c[3], 3, 2), C2f(c[3] + c[4], c[4], reps(3), False)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.detect = Detect([c[2], c[3], c[4]])

        def forward(self, x):
            p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
            p4 = self.b6(self.b5(p3))
            p5 = self.b9(self.b8(self.b7(p4)))
            h12 = self.h12(torch.cat((self.up(p5), p4), 1))
            h15 = self.h15(torch.cat((self.up(h12), p3), 1))
            h18 = self.h18(torch.cat((self.h16(h15), h12), 1))
            h21 = self.h21(torch.cat((self.h19(h18), p5), 1))
            return self.detect([h15, h18, h21])

    return YOLOv8().eval()


def export_onnx(
    model, shape: tuple[int, ...], path: Path, in_name: str, out_name: str, meta: dict | None = None
) -> Path:
    """Export with a dynamic batch (legacy exporter: the new one needs onnxscript) and add metadata."""
    import onnx
    import torch

    with torch.no_grad():
        torch.onnx.export(model, torch.zeros(shape), str(path), dynamo=False, opset_version=17,
                          input_names=[in_name], output_names=[out_name],
                          dynamic_axes={in_name: {0: "N"}, out_name: {0: "N"}})  # fmt: skip
    graph = onnx.load(str(path))
    for k, v in (meta or {}).items():
        p = graph.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(graph, str(path))
    return path


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def rate(fn, n_images: int, iters: int, device: str, warmup: int = 2) -> tuple[float, float]:
    """(images/s, ms per call) of ``fn()`` processing ``n_images`` per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    dt = time.perf_counter() - t0
    return n_images * iters / dt, 1000 * dt / iters


def ort_vs_torch(path: Path, x: np.ndarray, device: str) -> str:
    """Largest |onnxruntime - onnx2torch| (both fp32) on one batch, or why it was not measured."""
    from yokai_pipeline.models.onnx_graph import OnnxModel

    try:
        ort = OnnxModel(path, device="cpu", runtime="onnxruntime", batch_size=len(x))
    except ImportError as exc:
        return f"not measured ({exc})"
    pt = OnnxModel(path, device=device, runtime="torch", batch_size=len(x), bf16=False)
    a, b = ort.run(x)[0], pt.run(x)[0]
    return (
        f"max |ort - torch fp32| = {float(np.abs(a - b).max()):.2e} (max |ort| {float(np.abs(a).max()):.2e})"
    )


# --------------------------------------------------------------------------- models


def bench_detector(args, work: Path, results: list) -> None:
    import torch

    from yokai_pipeline.models.detector import load_detector

    path = export_onnx(build_yolov8(args.yolo_scale), (1, 3, 640, 640), work / "yolo.onnx", "images", "output0",
                       {"imgsz": "[640, 640]", "names": "{0: 'person'}"})  # fmt: skip
    rng = np.random.default_rng(0)
    print(
        f"detector yolov8{args.yolo_scale}: "
        + ort_vs_torch(path, rng.random((2, 3, 640, 640), dtype=np.float32), args.device)
    )
    sizes = args.detector_batch_sizes
    frames = [rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8) for _ in range(max(sizes))]
    for bs in sizes:
        det = load_detector(path, "person", device=args.device, batch_size=bs, runtime="torch")
        x = torch.rand(bs, 3, 640, 640, device=args.device)
        cuda = args.device.startswith("cuda")

        def model_only(det=det, x=x, cuda=cuda):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                det.model._module(x)

        r, ms = rate(model_only, bs, args.iters, args.device)
        results.append((f"detector yolov8{args.yolo_scale} 640", "model, onnx2torch bf16", bs, r, ms))
        r, ms = rate(
            lambda det=det, bs=bs: det.detect(frames[:bs]), bs, max(2, args.iters // 4), args.device, 1
        )
        results.append(
            (f"detector yolov8{args.yolo_scale} 640", "detect() 1280x720 uint8 -> boxes", bs, r, ms)
        )
        print(f"detector detect() batch {bs}: {r:,.1f} frames/s ({ms:,.1f} ms/batch)", flush=True)


def bench_isnet(args, work: Path, results: list) -> None:
    import torch
    from safetensors.torch import save_file

    from yokai_pipeline.models import isnet

    path = work / "isnetis.safetensors"
    save_file({k: v.contiguous() for k, v in isnet.build_isnet().state_dict().items()}, str(path))
    model = isnet.load_isnet(path, device=args.device)
    side = 256 if args.quick else None
    for bs in args.batch_sizes:
        frames = torch.randint(0, 256, (bs, 720, 1280, 3), dtype=torch.uint8, device=args.device)
        r, ms = rate(
            lambda f=frames: isnet.predict_masks(model, f, input_size=side), bs, args.iters, args.device
        )
        results.append((f"isnet {side or 1024}", "predict_masks 1280x720 uint8 on device, bf16", bs, r, ms))


def bench_ccip(args, work: Path, results: list) -> None:
    import torch

    try:
        import timm
    except ImportError:
        print("ccip: skipped (the CCIP backbone stand-in needs timm)")
        return
    from yokai_pipeline.models import ccip

    size = 128 if args.quick else ccip.SIZE
    body = timm.create_model(
        "caformer_s18" if args.quick else "caformer_m36", pretrained=False, num_classes=768
    )
    folder = work / "ccip"
    folder.mkdir(exist_ok=True)
    export_onnx(body.eval(), (1, 3, size, size), folder / ccip.FEATURE_FILE, "input", "output")
    export_onnx(cosine_metric(), (4, 768), folder / ccip.METRIC_FILE, "input", "output")
    (folder / ccip.METRICS_JSON).write_text(json.dumps({"threshold": 0.178}))
    rng = np.random.default_rng(0)
    print(
        "ccip feature: "
        + ort_vs_torch(
            folder / ccip.FEATURE_FILE, rng.random((2, 3, size, size), dtype=np.float32), args.device
        )
    )
    cuda = args.device.startswith("cuda")
    for bs in args.batch_sizes:
        model = ccip.load_ccip(folder, device=args.device, batch_size=bs, runtime="torch")
        x = torch.rand(bs, 3, size, size, device=args.device)

        def model_only(m=model, x=x):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                m.feature._module(x)

        r, ms = rate(model_only, bs, args.iters, args.device)
        results.append((f"ccip caformer {size}", "features, onnx2torch bf16", bs, r, ms))


def cosine_metric():  # noqa: ANN201 - torch is imported lazily
    """Stand-in graph with CCIP's metric signature ([N, 768] -> [N, N] differences)."""
    import torch

    class CosineMetric(torch.nn.Module):
        def forward(self, x):
            u = x / x.norm(dim=1, keepdim=True)  # F.normalize exports a Clip onnx2torch cannot convert
            return 1 - u @ u.T

    return CosineMetric().eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models", nargs="+", default=["detector", "isnet", "ccip"], choices=["detector", "isnet", "ccip"]
    )
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--detector-batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--yolo-scale", default="m", choices=["n", "s", "m", "l"])
    ap.add_argument("--quick", action="store_true", help="Small inputs and counts (CPU smoke run).")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device visible; pass --device cpu --quick for a smoke run")
    if args.quick:
        args.batch_sizes, args.iters = [min(b, 2) for b in args.batch_sizes[:2]], 2
        args.detector_batch_sizes = [min(b, 2) for b in args.detector_batch_sizes[:2]]
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    results: list = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_models_") as tmp:
        for m in args.models:
            {"detector": bench_detector, "isnet": bench_isnet, "ccip": bench_ccip}[m](
                args, Path(tmp), results
            )
    print(f"\nNeural models of issue 15, {name}, {time.strftime('%Y-%m-%d')}\n")
    print("| model | measure | batch | images/s | ms/batch |")
    print("|---|---|---:|---:|---:|")
    for model, measure, bs, r, ms in results:
        print(f"| {model} | {measure} | {bs} | {r:,.1f} | {ms:,.1f} |")


if __name__ == "__main__":
    main()
