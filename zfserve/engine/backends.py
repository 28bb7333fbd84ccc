"""The runtimes a :class:`~zfserve.engine.classifier.Classifier` runs its ONNX graph on.

- ONNX Runtime (``onnxruntime``): fp32 and int8 (the QDQ graph of :mod:`.quantize`), CPU or CUDA. Its CPU
  provider has no bf16 kernels (a bfloat16 Conv or MatMul fails to load with NOT_IMPLEMENTED), so bf16 is refused
  with that reason.
- OpenVINO (``openvino``, the optional extra ``zfserve[openvino]``): fp32, bf16 and int8 from the same ONNX
  files, CPU only. Its CPU plugin runs float graphs in bf16 by itself on CPUs with AMX or AVX-512 BF16, so fp32
  pins the inference precision to f32 and bf16 asks for bf16 explicitly.

Both take the serialized graph (bytes read once by the classifier), return float32 probabilities (``run``) or
named outputs (``run_outputs``: probabilities and the out-of-distribution features from the same pass) and are
safe to call from several threads at once. ``release_memory`` gives back what the largest batch so far made
the runtime hold (a server calls it when it goes idle after large batches).
"""

from __future__ import annotations

import os

import queue
import threading

import numpy as np

from ..config import ENGINES, PRECISIONS
from ..errors import InvalidArgumentError, ModelLoadError
from ..export import INPUT_NAME, PROBABILITIES, ort_session

OPENVINO_MISSING = "engine 'openvino' needs the openvino package: pip install 'zfserve[openvino]'"
BF16_ON_ORT = ("precision 'bf16' runs on --engine openvino only: ONNX Runtime's CPU provider has no bf16 kernels "
               "(a bfloat16 Conv or MatMul is NOT_IMPLEMENTED)")

_core = None
_core_lock = threading.Lock()


def available_threads() -> int:
    """The cores this process may run on (affinity aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def openvino_core():
    """The process's one OpenVINO Core (made on first use; it is costly and thread-safe)."""
    global _core
    with _core_lock:
        if _core is None:
            try:
                import openvino
            except ImportError:
                raise InvalidArgumentError(OPENVINO_MISSING, field="engine") from None
            _core = openvino.Core()
        return _core


def check_combination(engine: str, precision: str, device: str) -> None:
    """Refuse what the engines cannot run, naming the field and the reason."""
    if engine not in ENGINES:
        raise InvalidArgumentError(f"engine: {engine!r} not accepted; accepted: {', '.join(ENGINES)}", field="engine")
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision: {precision!r} not accepted; accepted: {', '.join(PRECISIONS)}",
                                   field="precision")
    if engine == "onnxruntime" and precision == "bf16":
        raise InvalidArgumentError(BF16_ON_ORT, field="precision")
    if precision == "int8" and device != "cpu":
        raise InvalidArgumentError("precision 'int8' runs on the CPU only: ONNX Runtime's CUDA provider has no "
                                   "int8 convolutions (the graph would run dequantized)", field="precision")
    if engine == "openvino" and device != "cpu":
        raise InvalidArgumentError(f"engine 'openvino' runs on the CPU only, not device {device!r}", field="device")


class OnnxRuntimeBackend:
    """An ONNX Runtime session (:func:`zfserve.export.ort_session`); on CUDA each call binds its own IO."""

    engine = "onnxruntime"

    def __init__(self, onnx_bytes: bytes, *, threads: int, device: str = "cpu", profile_prefix: str | None = None):
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        self.device = device
        self.session = ort_session(onnx_bytes, threads=threads, providers=providers, profile_prefix=profile_prefix)
        # ONNX Runtime's CPU arena keeps every region a run made it take (a batch of 32 ZFNet images: about
        # 250 MB) and shrinks only at the end of a run that asks for it.
        import onnxruntime as ort
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @property
    def outputs(self) -> dict:
        return {o.name: list(o.shape) for o in self.session.get_outputs()}

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch, [PROBABILITIES])[0]

    def run_outputs(self, batch: np.ndarray, names: list[str], run_options=None) -> list[np.ndarray]:
        """The graph outputs ``names`` of one pass over ``batch``."""
        if self.device == "cuda":
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, batch)
            for name in names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding, run_options)
            return binding.copy_outputs_to_cpu()
        return self.session.run(list(names), {INPUT_NAME: batch}, run_options)

    def release_memory(self, batch: np.ndarray) -> None:
        """Run ``batch`` (one small image) and then free every arena region no run is using."""
        self.run_outputs(batch, [PROBABILITIES], self._shrink)

    def end_profiling(self) -> str:
        return self.session.end_profiling()


class OpenVinoBackend:
    """An OpenVINO CPU compiled model: one stream of ``threads`` threads (latency first, as ONNX Runtime's
    session), the inference precision pinned (``f32`` for fp32 and the float parts of int8, ``bf16`` for bf16).
    Infer requests are pooled, one per concurrent caller. ``streams`` > 1: that many requests run at once, each
    on its own ``threads`` (for callers that keep several in flight, as the occlusion engine does)."""

    engine = "openvino"

    def __init__(self, onnx_bytes: bytes, *, threads: int, precision: str = "fp32", streams: int = 1):
        core = openvino_core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise InvalidArgumentError("precision 'bf16': this CPU has no bf16 support (OpenVINO's CPU "
                                       "capabilities lack BF16); use fp32 or int8", field="precision")
        try:
            model = core.read_model(onnx_bytes)
            self.compiled = core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": int(threads) * int(streams), "NUM_STREAMS": int(streams),
                "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"})
        except RuntimeError as exc:   # OpenVINO reports conversion and compilation failures as RuntimeError
            raise ModelLoadError(f"OpenVINO cannot compile the model ({str(exc).splitlines()[0]})") from None
        self.precision = precision
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def outputs(self) -> dict:
        return {name: [d.get_length() if d.is_static else None for d in out.get_partial_shape()]
                for out in self.compiled.outputs for name in out.get_names()}

    @property
    def providers(self) -> list[str]:
        return ["OpenVINO CPU"]

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch, [PROBABILITIES])[0]

    def run_outputs(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The graph outputs ``names`` of one pass over ``batch``."""
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            request.infer({INPUT_NAME: batch})
            return [np.array(request.get_tensor(self.compiled.output(name)).data, dtype=np.float32, copy=True)
                    for name in names]
        finally:
            self._idle.put(request)

    def release_memory(self, batch: np.ndarray) -> None:
        """Drop the pooled idle infer requests (each holds buffers for the largest batch it ran); new ones are
        made on demand. ``batch`` is unused (ONNX Runtime's needs a run)."""
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                return

    def end_profiling(self) -> str:
        raise InvalidArgumentError("profile_prefix: profiling is ONNX Runtime's; not available with OpenVINO",
                                   field="profile_prefix")
