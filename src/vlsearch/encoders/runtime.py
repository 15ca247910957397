"""Inference runtimes for the frozen inference graphs: PyTorch, ONNX Runtime or OpenVINO.

Two graphs run outside PyTorch: the image backbone (indexing) and a text query's whole path (MiniLM plus
the dual encoder's text tower). Each is exported once to ONNX, in fp32, cached on disk under a key that
names its weights, and run by the chosen runtime. Training always runs in PyTorch.

``VLSEARCH_RUNTIME=auto|torch|onnxruntime|openvino`` picks the runtime for both graphs. ``auto`` picks,
per graph, what measured best on this machine (``vlsearch bench`` prints the three side by side):
- image backbone: ONNX Runtime (fp32), then OpenVINO (fp32), then PyTorch. Graph runtimes run it in
  fp32 only: OpenVINO's bf16 was 2.2x faster again but lost 2.4 RSUM on Flickr8k dev.
- text query: where the CPU has bf16 natively, OpenVINO in bf16 (fixed-shape models per token length);
  elsewhere ONNX Runtime with int8 matmuls (dynamic quantization, ``query_int8``): on a 2-core AVX2
  Zen, 5.83 ms p50 against 9.63 for its fp32 graph and 10.40 for OpenVINO's (one bench run), with
  Flickr8k dev recall held (RSUM 285.2 -> 286.1). Then PyTorch. Text in bf16 stays within cosine
  0.9999 of fp32, int8 within 0.98.
A runtime that is missing, or a graph that fails to export, falls back to PyTorch with one warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vlsearch.config import atomic_write_bytes
from vlsearch.errors import VLSearchError
from vlsearch.precision import use_bf16
from vlsearch.settings import home, model_threads
from vlsearch.version import __version__

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
OPSET = 17
# Rows per call of a split batch (CompiledGraph): 2-8 measured alike, 16 (a 32-row batch over 2 threads)
# 20-30% slower on a 2-core Zen 5
MICRO_BATCH = 4
# Bumped when an exported graph's inputs, outputs or meaning change, so old cached exports are not reused.
# 2: the decomposed deformer's query graph no longer cuts queries to the export example's length.
GRAPH_VERSION = 2


def available(runtime: str) -> bool:
    """Whether a runtime's package is installed (each graph runtime's name is its module's)."""
    return runtime == "torch" or importlib.util.find_spec(runtime) is not None


# auto's order per graph, best first (module doc)
PREFERENCE = {
    "image": ("onnxruntime", "openvino", "torch"),
    "query": ("openvino", "onnxruntime", "torch"),
}
# where the CPU has no native bf16, an int8 query on ONNX Runtime beats both fp32 graphs (module doc)
PREFERENCE_NO_BF16 = {**PREFERENCE, "query": ("onnxruntime", "openvino", "torch")}


def resolve(runtime: str | None = None, graph: str = "query") -> str:
    """The runtime for ``graph`` ('image' or 'query'): the argument, else ``$VLSEARCH_RUNTIME``, else
    ``auto`` (see the module doc)."""
    choice = (runtime or "auto").strip().lower()
    if choice == "auto":  # a config's "auto" defers to the environment too
        choice = (os.environ.get("VLSEARCH_RUNTIME") or "auto").strip().lower()
    if choice == "auto":
        order = PREFERENCE if use_bf16() else PREFERENCE_NO_BF16
        return next(r for r in order[graph] if available(r))
    if choice not in RUNTIMES:
        raise VLSearchError(f"unknown runtime {choice!r}: use auto, {', '.join(RUNTIMES)}")
    if not available(choice):
        raise VLSearchError(f"runtime {choice} is not installed: pip install {choice}")
    return choice


def precision(runtime: str, allow_bf16: bool = True) -> str:
    """'bf16' or 'fp32': what a runtime computes in on this CPU (ONNX Runtime's CPU kernels are fp32)."""
    if runtime == "onnxruntime" or not allow_bf16:
        return "fp32"
    return "bf16" if use_bf16() else "fp32"


def query_int8(runtime: str) -> bool:
    """Whether a text query's graph runs int8 matmuls: on ONNX Runtime where the CPU has no native bf16
    (``$VLSEARCH_QUERY_INT8``: auto, 1 or 0). Only the query: its recall was measured to hold (module
    doc); the image backbone's int8 did not (README)."""
    choice = (os.environ.get("VLSEARCH_QUERY_INT8") or "auto").strip().lower()
    if choice not in ("auto", "1", "0"):
        raise VLSearchError(f"VLSEARCH_QUERY_INT8 must be auto, 1 or 0, not {choice!r}")
    if runtime != "onnxruntime" or choice == "0":
        return False
    return choice == "1" or not use_bf16()


def tag(runtime: str, allow_bf16: bool = True) -> str:
    """The suffix naming a runtime's numerics in feature-cache folders and artefact configs. PyTorch's
    suffixes are the ones every earlier cache has ('' or '-bf16'), so those stay valid."""
    p = precision(runtime, allow_bf16)
    short = {"torch": "", "onnxruntime": "-ort", "openvino": "-ov"}[runtime]
    return short + ("-bf16" if p == "bf16" else "")


def query_threads_default() -> int:
    """Threads for one text query's graph (``$VLSEARCH_QUERY_THREADS``, else all cores): on 2 cores the
    second thread took a query from 7.5 to 4.2 ms (ONNX Runtime). ``vlsearch bench`` measures 1 and all."""
    return int(os.environ.get("VLSEARCH_QUERY_THREADS", 0)) or model_threads()


def weights_digest(module: torch.nn.Module) -> str:
    """sha1 over a module's parameters and buffers (names, shapes, bytes): the export cache key's core."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def runtime_dir() -> Path:
    return home() / "runtime"


class CompiledGraph:
    """``module(*inputs)`` exported to ONNX and run by ONNX Runtime or OpenVINO on numpy inputs.

    ``inputs`` are example arrays for the export; ``dynamic`` names each input's variable axes (for
    example ``{"images": {0: "batch"}}``). Calls return the outputs as a list of numpy arrays. Safe to
    call from several threads (OpenVINO gets one infer request per thread).

    ``static_lengths`` (OpenVINO): a single input row whose axis-1 length fits one of these is padded
    with zeros to it and runs on a model compiled for that fixed shape, 1.5-2x faster than the dynamic
    one for a text query. Only for inputs where zero padding is masked out (token ids + attention mask).

    ``split_batch``: a batch runs as micro-batches of ``MICRO_BATCH`` rows, ``threads`` of them side by
    side, each on one thread, instead of one batch on ``threads`` intra-op threads. For the image backbone,
    whose depthwise convolutions split badly across threads, one slice per thread measured 1.05x more
    images/s on 2 idle cores and 1.3-1.7x with other work on them; micro-batches, whose activations stay
    in the cores' caches, 1.2-1.4x more again (Zen 5, both runtimes: 254-280 -> 330-380 img/s).

    ``int8`` (ONNX Runtime): the fp32 export's matmuls are quantized dynamically (int8 weights per
    output channel, activations per call; 7-bit weights, which AVX2's u8 x s8 products need to stay clear
    of int16 saturation). Its outputs then differ from fp32's by what int8 gives, not by rounding.
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        inputs: Sequence[np.ndarray],
        input_names: Sequence[str],
        output_names: Sequence[str],
        dynamic: dict[str, dict[int, str]],
        runtime: str,
        threads: int | None = None,
        key_extra: str = "",
        allow_bf16: bool = True,
        static_lengths: Sequence[int] = (),
        split_batch: bool = False,
        int8: bool = False,
    ):
        if runtime not in ("onnxruntime", "openvino"):
            raise VLSearchError(f"CompiledGraph runs onnxruntime or openvino, not {runtime}")
        if int8 and runtime != "onnxruntime":
            raise VLSearchError(f"int8 graphs run on onnxruntime, not {runtime}")
        self.name, self.runtime, self.int8 = name, runtime, int8
        self.precision = "int8" if int8 else precision(runtime, allow_bf16)
        self.threads = threads or model_threads()
        self.split = split_batch and self.threads > 1
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=name) if self.split else None
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.static_lengths = tuple(sorted(static_lengths))
        key = hashlib.sha1(
            "|".join(
                [name, weights_digest(module), key_extra, torch.__version__, __version__, str(GRAPH_VERSION)]
                + [f"{n}:{a.dtype}:{a.shape[1:]}" for n, a in zip(input_names, inputs, strict=True)]
            ).encode()
        ).hexdigest()[:16]
        self.path = runtime_dir() / f"{name}-{key}{'-int8' if int8 else ''}.onnx"
        self.exported = False  # whether this call made the export (a cached one was checked when made)
        if self.path.exists():
            try:
                self._run = self._load()
                return
            except Exception as e:  # a damaged cached export: make it again
                log.warning("re-exporting %s (%s: %s)", self.path, type(e).__name__, e)
        self._export(module, inputs, dynamic)
        self.exported = True
        self._run = self._load()

    def _export(self, module, inputs, dynamic) -> None:
        import io

        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs),
                buf,
                input_names=self.input_names,
                output_names=self.output_names,
                dynamic_axes={**dynamic, **{n: {0: "batch"} for n in self.output_names}},
                opset_version=OPSET,
                dynamo=False,
            )
        data = buf.getvalue()
        if self.int8:
            data = _quantize_int8(data, self.path.parent)
        atomic_write_bytes(self.path, data)

    def _load(self) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
        if self.runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.session_threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            return lambda feed: session.run(self.output_names, feed)
        return _OpenVinoRunner(self)

    @property
    def session_threads(self) -> int:
        """Intra-op threads of each session: one when batches are split over threads."""
        return 1 if self.split else self.threads

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        feed = dict(zip(self.input_names, arrays, strict=True))
        n = len(arrays[0])
        if self._pool is None or n < 2:
            return self._run(feed)
        parts = [{k: v[a : a + MICRO_BATCH] for k, v in feed.items()} for a in range(0, n, MICRO_BATCH)]
        outs = list(self._pool.map(self._run, parts))
        return [np.concatenate([o[i] for o in outs]) for i in range(len(self.output_names))]


def _quantize_int8(model: bytes, scratch: Path) -> bytes:
    """An fp32 ONNX model's MatMuls as dynamically quantized int8 ones (CompiledGraph's ``int8``)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_dynamic logs a "pre-processing" hint on the root logger
        try:
            quantize_dynamic(
                src,
                dst,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
        finally:
            root.setLevel(level)
        return dst.read_bytes()


def compile_or_none(build: Callable[[], CompiledGraph], what: str) -> CompiledGraph | None:
    """``build()``, or None (PyTorch runs it) with one warning when the runtime cannot take the graph."""
    try:
        return build()
    except VLSearchError:
        raise
    except Exception as e:  # an exporter or runtime limitation: PyTorch still gives the same result
        log.warning("%s: falling back to PyTorch (%s: %s)", what, type(e).__name__, e)
        warnings.warn(f"{what}: falling back to PyTorch ({type(e).__name__}: {e})", stacklevel=2)
        return None


class _OpenVinoRunner:
    """OpenVINO models for one exported graph: the dynamic one, and a fixed-shape one for single rows of
    each static length. One infer request per thread and model."""

    def __init__(self, graph: CompiledGraph):
        import openvino as ov

        self.ov, self.graph = ov, graph
        self.core = ov.Core()
        # split batches: one single-thread stream per slice; else one stream on all threads
        streams = {"NUM_STREAMS": graph.threads} if graph.split else {"PERFORMANCE_HINT": "LATENCY"}
        self.config = {
            **streams,
            "INFERENCE_NUM_THREADS": graph.threads,
            "INFERENCE_PRECISION_HINT": "bf16" if graph.precision == "bf16" else "f32",
            "CACHE_DIR": str(runtime_dir() / "openvino"),  # compiled blobs: later starts skip compiling
        }
        # every fixed-length model now: a first query of a new length would otherwise wait for a compile
        self.models: dict[int | None, object] = {n: self._compile(n) for n in (None, *graph.static_lengths)}
        self.local = threading.local()

    def _compile(self, length: int | None):
        model = self.core.read_model(str(self.graph.path))
        if length is not None:
            model.reshape({n: self.ov.PartialShape([1, length]) for n in self.graph.input_names})
        return self.core.compile_model(model, "CPU", self.config)

    def _model(self, feed: dict[str, np.ndarray]):
        arrays = list(feed.values())
        length = arrays[0].shape[1] if arrays[0].ndim > 1 else None
        bucket = next((n for n in self.graph.static_lengths if length is not None and length <= n), None)
        if bucket is None or arrays[0].shape[0] != 1:
            return self.models[None], feed
        pad = {k: np.pad(v, ((0, 0), (0, bucket - v.shape[1]))) for k, v in feed.items()}
        return self.models[bucket], pad

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled, feed = self._model(feed)
        requests = self.local.__dict__.setdefault("requests", {})
        request = requests.get(id(compiled))
        if request is None:
            request = requests[id(compiled)] = compiled.create_infer_request()
        result = request.infer(feed)
        return [np.array(result[compiled.output(n)]) for n in self.graph.output_names]  # copies
