"""Models published as ONNX: find the file, run it on onnxruntime (CPU) or in torch (CUDA).

The anime tools' detectors and CCIP are published only as ONNX files on the Hugging Face hub.
:func:`resolve_model_file` finds one locally (a path, or a hub repo looked up in the local
cache only: nothing is ever downloaded). :class:`OnnxModel` runs the graph with one of two
runtimes behind one ``run(x) -> outputs`` call:

* ``onnxruntime``: the CPU path (the CUDA provider when the installed build has it), batched
  when the graph's batch dimension is dynamic, image by image when it is fixed at 1.
* ``torch``: the same graph converted with onnx2torch (the initializers become parameters),
  run under bf16 autocast on CUDA. This is the GPU path on hosts whose onnxruntime is the CPU
  build; on CPU it runs in fp32 and must agree with onnxruntime (tested).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from yokai_pipeline.errors import BadInputError
from yokai_pipeline.runtime import batching

Runtime = Literal["auto", "onnxruntime", "torch"]


def resolve_model_file(source: str | Path, default_file: str | None = None) -> Path:
    """A local ONNX (or JSON) file from a path or a hub reference, never downloading.

    Args:
        source: a local file; or ``owner/repo`` (then ``default_file`` in that repo), or
            ``owner/repo/path/in/repo.onnx``, looked up in the local Hugging Face cache.
        default_file: the file inside the repo when ``source`` names only the repo.

    Raises:
        BadInputError: the file is not there (the message says which repo file was looked for).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve()
    text = str(source)
    parts = text.strip("/").split("/")
    # owner/repo, or owner/repo/<file in the repo>; "./x", "/x", "~/x" and "dir/file.onnx" are local paths.
    local = text.startswith((".", "/", "~")) or len(parts) < 2 or (len(parts) == 2 and bool(path.suffix))
    if local:
        raise BadInputError(source, "model file not found")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_file
    if not filename:
        raise BadInputError(source, "names a hub repo but no file inside it")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise ImportError("hub model references need huggingface_hub: pip install huggingface_hub") from exc
    found = try_to_load_from_cache(repo_id, filename)
    if not isinstance(found, str) or not Path(found).is_file():
        raise BadInputError(
            f"{repo_id}/{filename}",
            "no such local file, and not in the local Hugging Face cache (downloads are never made here; "
            f"fetch it with `huggingface-cli download {repo_id} {filename}` or pass a local file)",
        )
    return Path(found)


def read_onnx(path: Path) -> Any:
    """Load and check an ONNX graph; a wrong or damaged file names itself."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX models need onnx: pip install 'yokai-pipeline[ml]'") from exc
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - any parser failure means the same to the user
        raise BadInputError(path, f"not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    return model


def metadata(model: Any) -> dict[str, str]:
    """The graph's ``metadata_props`` (ultralytics stores ``imgsz`` and ``names`` there)."""
    return {p.key: p.value for p in model.metadata_props}


def input_shape(model: Any) -> list[int | None]:
    """The first graph input's shape; ``None`` for a dynamic dimension."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def constants_as_initializers(model: Any) -> Any:
    """A copy of the graph with tensor ``Constant`` nodes and ``Identity`` copies of weights as initializers.

    onnx2torch reads conv weights and biases only from initializers; exporters leave some as
    Constant nodes, or (torch's TorchScript exporter, for equal tensors) as Identity nodes of
    one shared initializer.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    keep = []
    for node in out.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        src = None
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            src = value.t
        elif node.op_type == "Identity" and node.input[0] in inits:
            src = inits[node.input[0]]
        if src is None:
            keep.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(src)
        tensor.name = node.output[0]
        out.graph.initializer.append(tensor)
        inits[tensor.name] = tensor
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return with_inferred_shapes(out)


def with_inferred_shapes(model: Any) -> Any:
    """The graph with value_info from shape inference run at batch 1.

    onnx2torch takes some static sizes (LayerNormalization's normalised shape) from value_info.
    With a dynamic batch, the exporters' Shape -> Reshape chains leave those unknown; inferring
    at batch 1 fills in the per-sample sizes. The graph's own input keeps its dynamic batch,
    and reshapes still compute their sizes from the real input at run time.
    """
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for inp in probe.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def resolve_torch_device(device: str | None) -> str:
    if device in (None, "auto"):
        try:
            import torch
        except ImportError:
            return "cpu"
        from yokai_pipeline.runtime import resolve_auto  # the leased cuda:N inside a lease

        return resolve_auto(device, torch.cuda.is_available())
    return str(device)


class OnnxModel:
    """One ONNX graph with a single input, run on onnxruntime or (converted) in torch.

    Args:
        path: the ``.onnx`` file.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        runtime: ``auto`` = torch on CUDA, onnxruntime otherwise.
        batch_size: most rows per forward pass.
        bf16: autocast to bf16 on CUDA (torch runtime).
    """

    def __init__(
        self,
        path: Path,
        device: str = "auto",
        runtime: Runtime = "auto",
        batch_size: int = 16,
        bf16: bool = True,
    ):
        self.path = Path(path)
        self.graph = read_onnx(self.path)
        self.metadata = metadata(self.graph)
        self.input_name = self.graph.graph.input[0].name
        self.output_names = [o.name for o in self.graph.graph.output]
        self.input_shape = input_shape(self.graph)
        self.device = resolve_torch_device(device)
        self.runtime = (
            runtime if runtime != "auto" else ("torch" if self.device.startswith("cuda") else "onnxruntime")
        )
        # A graph exported with a fixed batch of 1 has reshapes baked for it: feed it one row at a time.
        self.batch_size = 1 if self.input_shape and self.input_shape[0] == 1 else batch_size
        self.bf16 = bf16
        # torch on CUDA: a forward pass that runs out of memory is retried in halves (batching.py)
        self._budget = batching.Budget(self.path.stem, self.device, self.batch_size)
        self._lock = threading.Lock()
        self._session: Any = None
        self._module: Any = None
        if self.runtime == "onnxruntime":
            self._session = self._open_session()
        else:
            self._module = self._convert()

    def _open_session(self) -> Any:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the CPU path of ONNX models needs onnxruntime: pip install onnxruntime"
            ) from exc
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        if not self.device.startswith("cuda"):
            providers = ["CPUExecutionProvider"]
        try:
            return ort.InferenceSession(self.graph.SerializeToString(), providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise BadInputError(
                self.path, f"onnxruntime cannot run it ({type(exc).__name__}: {exc})"
            ) from exc

    def _convert(self) -> Any:
        try:
            import torch  # noqa: F401
            from onnx2torch import convert
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the torch path of ONNX models needs torch and onnx2torch: pip install onnx2torch"
            ) from exc
        try:
            module = convert(constants_as_initializers(self.graph))
        except Exception as exc:  # noqa: BLE001
            raise BadInputError(self.path, f"cannot convert to torch ({type(exc).__name__}: {exc})") from exc
        return module.eval().to(self.device)

    def run(self, x: Any) -> list[np.ndarray]:
        """All outputs for a float32 batch, computed ``batch_size`` rows at a time, as float32 numpy.

        ``x`` is a numpy array or, for the torch runtime, a tensor already on the model's
        device (preprocessed there: no host round trip).
        """
        chunks: list[list[np.ndarray]] = []
        host = isinstance(x, np.ndarray) or self._session is not None
        with self._lock:
            for start in range(0, len(x), self.batch_size):
                part = x[start : start + self.batch_size]
                if host:
                    part = np.ascontiguousarray(np.asarray(part if isinstance(part, np.ndarray) else part.cpu()),
                                                dtype=np.float32)  # fmt: skip
                if self._session is None:
                    chunks.append(batching.run_in_parts(self._forward, part, self._budget, _join_outputs))
                else:
                    chunks.append(self._forward(part))
        if not chunks:
            raise ValueError("OnnxModel.run needs at least one row")
        return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]

    def run_whole(self, x: np.ndarray) -> list[np.ndarray]:
        """All outputs for the whole input at once (graphs whose output spans the rows, e.g. N x N)."""
        with self._lock:
            return self._forward(np.ascontiguousarray(x, dtype=np.float32))

    def _forward(self, part: Any) -> list[np.ndarray]:
        if self._session is not None:
            return [np.asarray(o, dtype=np.float32) for o in self._session.run(None, {self.input_name: part})]
        return [o.cpu().numpy() for o in self._forward_torch(part)]

    def _forward_torch(self, part: Any) -> list[Any]:
        import torch

        cuda = self.device.startswith("cuda")
        x = part if isinstance(part, torch.Tensor) else torch.from_numpy(part)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and self.bf16):
            out = self._module(x.to(self.device, torch.float32, non_blocking=True))
        outs = out if isinstance(out, list | tuple) else [out]
        return [o.float() for o in outs]

    def run_first_on_device(self, x: Any) -> Any:
        """The first output for a batch (at most ``batch_size`` rows) as a float32 tensor on the model's device.

        For post-processing on the device (a detector's thresholds and NMS), so only the few
        kept boxes cross to the host. Torch runtime only.
        """
        if self._session is not None:
            raise RuntimeError("run_first_on_device needs the torch runtime")
        import torch

        with self._lock:
            return batching.run_in_parts(lambda p: self._forward_torch(p)[0], x, self._budget, torch.cat)


def _join_outputs(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The outputs of a batch computed in parts, each output concatenated over the parts in order."""
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


_cache: dict[tuple, OnnxModel] = {}
_cache_lock = threading.Lock()


def load_onnx_model(
    path: Path, device: str = "auto", runtime: Runtime = "auto", batch_size: int = 16, bf16: bool = True
) -> OnnxModel:
    """An :class:`OnnxModel`, memoised per process (keyed on the file's size and mtime too)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, resolve_torch_device(device), runtime, batch_size, bf16)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = OnnxModel(path, device, runtime, batch_size, bf16)
        return _cache[key]
