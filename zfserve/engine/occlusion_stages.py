"""The stages of the occlusion engine's tile pipeline (:mod:`zfserve.engine.occlusion`), two ways: eager
PyTorch (any device) and small ONNX graphs run by ONNX Runtime on the CPU. Which stages exist follows the
model's layer table (:func:`zfserve.engine.occlusion_tiles.stages`):

- ``early``: the first conv -> ReLU -> a mask that zeroes the rows and columns outside the real map -> the
  pool after it -> its LRN if any (ZFNet's and AlexNet's block 1, read straight from the occluded image);
- ``conv``: conv -> ReLU (every other conv, VGG's first one included, on a crop of the image or of the cached
  map below with the new tile pasted in);
- ``pool_norm``: max-pool -> its LRN if any (the crop holds exactly the rows it reads, so no ceil mode);
- ``head``: the last pool (in its own mode) -> fc6 .. fc8 on full last-conv maps.

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
from ..model import LayeredCNN


def _lrn_of(model: LayeredCNN, geometry) -> dict | None:
    """The LRN after a pool, as keyword arguments (None when the pool has none)."""
    if geometry.norm is None:
        return None
    lrn = getattr(model, geometry.norm)
    return dict(size=lrn.size, alpha=lrn.alpha, beta=lrn.beta, k=lrn.k)


class TorchStages:
    """The stages as eager PyTorch on ``device``; numpy arrays in give numpy arrays out (the CPU glue)."""

    def __init__(self, model: LayeredCNN, plan, device: torch.device):
        self.device = device
        self.numpy = False   # whether the current call came with numpy arrays (CPU glue) or tensors
        self.geometry = {g.name: g for g in model.layer_chain()}
        self.lrn = {name: _lrn_of(model, g) for name, g in self.geometry.items() if g.kind == "pool"}
        self.fc = model.fc_layers
        self.p = {name: (getattr(model, name).weight.detach().to(device),
                         getattr(model, name).bias.detach().to(device)) for name in (*model.conv_layers, *self.fc)}

    def _in(self, a, first: bool = False):
        if first:
            self.numpy = isinstance(a, np.ndarray)
        return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a

    def _out(self, t):
        return t.numpy() if self.numpy and t is not None else t

    def _pool_norm(self, name, x):
        g = self.geometry[name]
        pool = F.max_pool2d(x, g.kernel, g.stride)
        lrn = self.lrn[name]
        return (pool if lrn is None else F.local_response_norm(pool, **lrn)), pool

    def early(self, conv_name: str, pool_name: str, x, mask, want_pool: bool, want_conv: bool):
        w, b = self.p[conv_name]
        conv = F.relu(F.conv2d(self._in(x, True), w, b, stride=self.geometry[conv_name].stride)) * self._in(mask)
        norm, pool = self._pool_norm(pool_name, conv)
        return self._out(norm), self._out(pool if want_pool else None), self._out(conv if want_conv else None)

    def conv(self, name: str, x):
        w, b = self.p[name]
        return self._out(F.relu(F.conv2d(self._in(x, True), w, b, stride=self.geometry[name].stride)))

    def pool_norm(self, name: str, x, want_pool: bool):
        norm, pool = self._pool_norm(name, self._in(x, True))
        return self._out(norm), self._out(pool if want_pool else None)

    def head(self, last, want: Sequence[str]):
        g = list(self.geometry.values())[-1]
        out = {g.name: F.max_pool2d(self._in(last, True), g.kernel, g.stride, ceil_mode=g.ceil_mode)}
        x = torch.flatten(out[g.name], 1)
        for name in self.fc[:-1]:
            x = out[name] = F.relu(F.linear(x, *self.p[name]))
        out["logits"] = F.linear(x, *self.p[self.fc[-1]])
        return {k: self._out(v) for k, v in out.items()}


class OrtStages:
    """The same stages as ONNX graphs under ONNX Runtime on the CPU (``threads`` intra-op threads, default
    PyTorch's)."""

    def __init__(self, model: LayeredCNN, plan, threads: int | None = None):
        threads = threads or torch.get_num_threads()
        chain = {g.name: g for g in model.layer_chain()}

        def session(graph):
            return ort_session(graph.SerializeToString(), threads=threads)

        self.sessions = {"head": session(_head_graph(model))}
        self.head_outputs = (model.layer_chain()[-1].name, *model.fc_layers[:-1])
        for stage in plan:
            if stage.kind == "early":
                self.sessions[stage.conv] = session(_early_graph(model, chain[stage.conv], chain[stage.name]))
            elif stage.kind == "pool":
                self.sessions[stage.name] = session(_pool_norm_graph(model, chain[stage.name]))
            else:
                self.sessions[stage.name] = session(_conv_graph(model, chain[stage.name]))

    def early(self, conv_name, pool_name, x, mask, want_pool, want_conv):
        names = ["norm"] + (["pool"] if want_pool else []) + (["conv"] if want_conv else [])
        got = dict(zip(names, self.sessions[conv_name].run(names, {"x": x, "mask": mask})))
        return got["norm"], got.get("pool"), got.get("conv")

    def conv(self, name, x):
        return self.sessions[name].run(["y"], {"x": x})[0]

    def pool_norm(self, name, x, want_pool):
        names = ["norm"] + (["pool"] if want_pool else [])
        got = self.sessions[name].run(names, {"x": x})
        return got[0], (got[1] if want_pool else None)

    def head(self, last, want):
        names = ["logits"] + [n for n in self.head_outputs if n in want]
        return dict(zip(names, self.sessions["head"].run(names, {"x": last})))


# ---------------------------------------------------------------------------------------------- graphs
def _parameters(graph: OnnxGraph, model: LayeredCNN, name: str) -> tuple[str, str]:
    layer = getattr(model, name)
    return (graph.const(layer.weight.detach().cpu().numpy().astype(np.float32), f"{name}.weight"),
            graph.const(layer.bias.detach().cpu().numpy().astype(np.float32), f"{name}.bias"))


def _conv(graph: OnnxGraph, model: LayeredCNN, g, x: str) -> str:
    return graph.op("Conv", x, *_parameters(graph, model, g.name), kernel_shape=[g.kernel, g.kernel],
                    strides=[g.stride, g.stride], pads=[0, 0, 0, 0])


def _pool(graph: OnnxGraph, g, x: str, out: str, **ceil_mode) -> str:
    return graph.op("MaxPool", x, out=out, kernel_shape=[g.kernel, g.kernel], strides=[g.stride, g.stride],
                    **ceil_mode)


def _norm(graph: OnnxGraph, model: LayeredCNN, g, pooled: str) -> None:
    """The pool's LRN as ``norm`` (the pool itself when it has none)."""
    lrn = _lrn_of(model, g)
    if lrn is None:
        graph.op("Identity", pooled, out="norm")
    else:
        lrn_to_onnx(graph, pooled, g.out_channels, **lrn, out="norm")


def _early_graph(model: LayeredCNN, conv, pool):
    g = OnnxGraph(f"{conv.name}.")
    masked = g.op("Mul", g.op("Relu", _conv(g, model, conv, "x")), "mask", out="conv")
    _norm(g, model, pool, _pool(g, pool, masked, "pool"))
    inputs = [tensor_info("x", ["n", conv.in_channels, "h", "w"]), tensor_info("mask", ["n", 1, "ch", "cw"])]
    return g.model(inputs, [tensor_info(o, None) for o in ("norm", "pool", "conv")])


def _pool_norm_graph(model: LayeredCNN, pool):
    g = OnnxGraph(f"{pool.name}.")
    _norm(g, model, pool, _pool(g, pool, "x", "pool"))
    return g.model([tensor_info("x", ["n", pool.in_channels, "h", "w"])],
                   [tensor_info(o, None) for o in ("norm", "pool")])


def _conv_graph(model: LayeredCNN, conv):
    g = OnnxGraph(f"{conv.name}.")
    g.op("Relu", _conv(g, model, conv, "x"), out="y")
    return g.model([tensor_info("x", ["n", conv.in_channels, "h", "w"])], [tensor_info("y", None)])


def _head_graph(model: LayeredCNN):
    pool = model.layer_chain()[-1]
    g = OnnxGraph("head.")
    x = g.op("Flatten", _pool(g, pool, "x", pool.name, ceil_mode=int(pool.ceil_mode)), axis=1)
    fc = model.fc_layers
    for name in fc:
        x = g.op("Gemm", x, *_parameters(g, model, name), transB=1, out="logits" if name == fc[-1] else None)
        if name != fc[-1]:
            x = g.op("Relu", x, out=name)
    return g.model([tensor_info("x", ["n", pool.in_channels, pool.in_size, pool.in_size])],
                   [tensor_info(o, None) for o in ("logits", pool.name, *fc[:-1])])
