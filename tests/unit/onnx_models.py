"""Tiny random ONNX graphs with the signatures of the published detectors and CCIP models.

Built with onnx.helper in the test run (nothing is downloaded): the same input / output names,
layouts and metadata as deepghs' exports, random weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

onnx = __import__("pytest").importorskip("onnx", reason="ONNX models need onnx (pip install '.[ml]')")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

OPSET = [helper.make_opsetid("", 17)]


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _save(graph: onnx.GraphProto, path: Path, meta: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="yokai-tests")
    model.ir_version = 8
    for k, v in (meta or {}).items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def yolo_detector(
    path: Path, imgsz: int = 64, n_classes: int = 1, seed: int = 0, batch: int | None = None
) -> Path:
    """A YOLOv8-shaped detector: ``images`` [N, 3, S, S] -> ``output0`` [N, 4 + classes, (S/8)^2].

    Box channels are ``sigmoid * S`` (centre x, y, width, height in model pixels), class
    channels a sigmoid score, like ultralytics' exported head.
    """
    rng = np.random.default_rng(seed)
    c = 4 + n_classes
    n = batch if batch is not None else "N"
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["feat"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Sigmoid", ["feat"], ["sig"]),
        helper.make_node("Reshape", ["sig", "shape"], ["flat"]),
        helper.make_node("Mul", ["flat", "scale"], ["output0"]),
    ]
    scale = np.ones((1, c, 1), dtype=np.float32)
    scale[0, :4, 0] = imgsz
    graph = helper.make_graph(
        nodes,
        "tiny_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [n, 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [n, c, (imgsz // 8) ** 2])],
        [
            _init("w", rng.normal(0, 0.2, (c, 3, 8, 8)).astype(np.float32)),
            _init("b", rng.normal(0, 0.5, (c,)).astype(np.float32)),
            _init("shape", np.array([0, c, -1], dtype=np.int64)),
            _init("scale", scale),
        ],
    )
    names = "{" + ", ".join(f"{i}: 'class{i}'" for i in range(n_classes)) + "}"
    if n_classes == 1:
        names = "{0: 'person'}"
    return _save(graph, path, {"imgsz": f"[{imgsz}, {imgsz}]", "names": names, "task": "detect"})


def ccip_feature(path: Path, size: int = 384, dim: int = 768, seed: int = 0) -> Path:
    """CCIP's feature model signature: ``input`` [N, 3, 384, 384] -> ``output`` [N, 768].

    Random weights with one property that makes identity tests meaningful: 1x1 colour filters
    that answer 0 on the white CCIP puts behind a layer, then a mean over the image, so a
    character's feature direction depends on its colours and not on its size or position.
    """
    rng = np.random.default_rng(seed)
    k = 64
    w = rng.normal(0, 1.0, (k, 3, 1, 1)).astype(np.float32)
    white = (1.0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array(
        [0.26862954, 0.26130258, 0.27577711]
    )
    bias = -(w[:, :, 0, 0] @ white).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        # Centred over the filters: what all colours share would otherwise dominate every feature.
        helper.make_node("ReduceMean", ["f"], ["fm"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["f", "fm"], ["fc"]),
        helper.make_node("MatMul", ["fc", "proj"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_ccip_feat",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", dim])],
        [_init("w", w), _init("b", bias), _init("proj", rng.normal(0, 1.0, (k, dim)).astype(np.float32))],
    )
    return _save(graph, path)


def ccip_metric(path: Path, dim: int = 768) -> Path:
    """CCIP's metric model signature: ``input`` [N, 768] -> ``output`` [N, N] differences (1 - cosine)."""
    nodes = [
        helper.make_node("ReduceL2", ["input"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["input", "norm"], ["unit"]),
        helper.make_node("Transpose", ["unit"], ["unit_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["unit", "unit_t"], ["sim"]),
        helper.make_node("Sub", ["one", "sim"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_ccip_metric",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "N"])],
        [_init("one", np.array(1.0, dtype=np.float32))],
    )
    return _save(graph, path)


def fake_hub_cache(root: Path, repo_id: str, filename: str, src: Path) -> Path:
    """Put ``src`` where huggingface_hub's cache keeps ``repo_id/filename``: refs/main -> snapshots/<commit>/."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    dest = repo / "snapshots" / ("0" * 40) / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(Path(src).read_bytes())
    return dest
