"""The stages of the occlusion engine's tile pipeline (:mod:`zfserve.engine.occlusion`), two ways: eager
PyTorch (any device) and small ONNX graphs run by ONNX Runtime on the CPU.

- ``early``: conv -> ReLU -> a mask that zeroes the rows and columns outside the real map -> 3x3/2 max-pool
  -> LRN (block 1, read straight from the occluded image);
- ``conv``: conv -> ReLU (conv2 .. conv5, on a crop of the cached map below with the new tile pasted in);
- ``pool_norm``: 3x3/2 max-pool -> LRN (the end of block 2; the crop holds exactly the rows it reads);
- ``head``: pool5 (ceil mode) -> fc6 .. fc8 on full conv5 maps.

Tile inputs arrive already padded, so every conv runs with padding 0. Arrays between stages are "native":
numpy on the CPU (thousands of small slice copies cost microseconds there, while torch's small CPU ops pay
thread-pool overhead each), torch tensors on a GPU. ONNX Runtime is used on CPUs because eager PyTorch's
ceil-mode max-pool and LRN are slow there; LRN is the exporter's lowering (``zfserve.export.lrn_to_onnx``).
Spatial sizes are dynamic, so one session per stage serves every tile shape.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..export import OnnxGraph, lrn_to_onnx, ort_session, tensor_info
from ..model import CONV_GEOMETRY, CONV_LAYERS, LRN_PARAMS, POOL_GEOMETRY, ZFNet

WEIGHTED = CONV_LAYERS + ("fc6", "fc7", "fc8")


class TorchStages:
    """The stages as eager PyTorch on ``device``; numpy arrays in give numpy arrays out (the CPU glue)."""

    def __init__(self, model: ZFNet, device: torch.device):
        self.device = device
        self.numpy = False   # whether the current call came with numpy arrays (CPU glue) or tensors
        self.p = {name: (getattr(model, name).weight.detach().to(device),
                         getattr(model, name).bias.detach().to(device)) for name in WEIGHTED}

    def _in(self, a, first: bool = False):
        if first:
            self.numpy = isinstance(a, np.ndarray)
        return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a

    def _out(self, t):
        return t.numpy() if self.numpy and t is not None else t

    def early(self, name: str, x, mask, want_pool: bool, want_conv: bool):
        w, b = self.p[name]
        conv = F.relu(F.conv2d(self._in(x, True), w, b, stride=CONV_GEOMETRY[name][1])) * self._in(mask)
        pool = F.max_pool2d(conv, POOL_GEOMETRY[0], POOL_GEOMETRY[1])
        norm = F.local_response_norm(pool, **LRN_PARAMS)
        return self._out(norm), self._out(pool if want_pool else None), self._out(conv if want_conv else None)

    def conv(self, name: str, x):
        w, b = self.p[name]
        return self._out(F.relu(F.conv2d(self._in(x, True), w, b, stride=CONV_GEOMETRY[name][1])))

    def pool_norm(self, name: str, x, want_pool: bool):
        pool = F.max_pool2d(self._in(x, True), POOL_GEOMETRY[0], POOL_GEOMETRY[1])
        return self._out(F.local_response_norm(pool, **LRN_PARAMS)), self._out(pool if want_pool else None)

    def head(self, c5, want: Sequence[str]):
        out = {"pool5": F.max_pool2d(self._in(c5, True), POOL_GEOMETRY[0], POOL_GEOMETRY[1], ceil_mode=True)}
        x = torch.flatten(out["pool5"], 1)
        for name in ("fc6", "fc7"):
            x = out[name] = F.relu(F.linear(x, *self.p[name]))
        out["logits"] = F.linear(x, *self.p["fc8"])
        return {k: self._out(v) for k, v in out.items()}


class OrtStages:
    """The same stages as ONNX graphs under ONNX Runtime on the CPU (``threads`` intra-op threads, default
    PyTorch's)."""

    def __init__(self, model: ZFNet, threads: int | None = None):
        threads = threads or torch.get_num_threads()

        def session(graph):
            return ort_session(graph.SerializeToString(), threads=threads)

        self.sessions = {"conv1": session(_early_graph(model, "conv1")),
                         **{name: session(_conv_graph(model, name)) for name in CONV_LAYERS[1:]},
                         "pool2": session(_pool_norm_graph(model, "pool2")), "head": session(_head_graph(model))}

    def early(self, name, x, mask, want_pool, want_conv):
        names = ["norm"] + (["pool"] if want_pool else []) + (["conv"] if want_conv else [])
        got = dict(zip(names, self.sessions[name].run(names, {"x": x, "mask": mask})))
        return got["norm"], got.get("pool"), got.get("conv")

    def conv(self, name, x):
        return self.sessions[name].run(["y"], {"x": x})[0]

    def pool_norm(self, name, x, want_pool):
        names = ["norm"] + (["pool"] if want_pool else [])
        got = self.sessions[name].run(names, {"x": x})
        return got[0], (got[1] if want_pool else None)

    def head(self, c5, want):
        names = ["logits"] + [n for n in ("pool5", "fc6", "fc7") if n in want]
        return dict(zip(names, self.sessions["head"].run(names, {"x": c5})))


# ---------------------------------------------------------------------------------------------- graphs
def _parameters(graph: OnnxGraph, model: ZFNet, name: str) -> tuple[str, str]:
    layer = getattr(model, name)
    return (graph.const(layer.weight.detach().cpu().numpy().astype(np.float32), f"{name}.weight"),
            graph.const(layer.bias.detach().cpu().numpy().astype(np.float32), f"{name}.bias"))


def _conv(graph: OnnxGraph, model: ZFNet, name: str, x: str) -> str:
    kernel, stride, _ = CONV_GEOMETRY[name]
    return graph.op("Conv", x, *_parameters(graph, model, name), kernel_shape=[kernel, kernel],
                    strides=[stride, stride], pads=[0, 0, 0, 0])


def _pool(graph: OnnxGraph, x: str, out: str, **ceil_mode) -> str:
    kernel, stride, _ = POOL_GEOMETRY
    return graph.op("MaxPool", x, out=out, kernel_shape=[kernel, kernel], strides=[stride, stride], **ceil_mode)


def _early_graph(model: ZFNet, name: str):
    g = OnnxGraph(f"{name}.")
    masked = g.op("Mul", g.op("Relu", _conv(g, model, name, "x")), "mask", out="conv")
    lrn_to_onnx(g, _pool(g, masked, "pool"), getattr(model, name).out_channels, **LRN_PARAMS, out="norm")
    inputs = [tensor_info("x", ["n", getattr(model, name).in_channels, "h", "w"]),
              tensor_info("mask", ["n", 1, "ch", "cw"])]
    return g.model(inputs, [tensor_info(o, None) for o in ("norm", "pool", "conv")])


def _pool_norm_graph(model: ZFNet, name: str):
    g = OnnxGraph(f"{name}.")
    channels = model.channels()[name]
    lrn_to_onnx(g, _pool(g, "x", "pool"), channels, **LRN_PARAMS, out="norm")
    return g.model([tensor_info("x", ["n", channels, "h", "w"])], [tensor_info(o, None) for o in ("norm", "pool")])


def _conv_graph(model: ZFNet, name: str):
    g = OnnxGraph(f"{name}.")
    g.op("Relu", _conv(g, model, name, "x"), out="y")
    return g.model([tensor_info("x", ["n", getattr(model, name).in_channels, "h", "w"])], [tensor_info("y", None)])


def _head_graph(model: ZFNet):
    g = OnnxGraph("head.")
    x = g.op("Flatten", _pool(g, "x", "pool5", ceil_mode=1), axis=1)
    for name in ("fc6", "fc7", "fc8"):
        x = g.op("Gemm", x, *_parameters(g, model, name), transB=1, out="logits" if name == "fc8" else None)
        if name != "fc8":
            x = g.op("Relu", x, out=name)
    size = model.spatial_sizes()["conv5"]
    return g.model([tensor_info("x", ["n", model.conv5.out_channels, size, size])],
                   [tensor_info(o, None) for o in ("logits", "pool5", "fc6", "fc7")])
